import json
from pathlib import Path

import pytest

from common.data import DataError, file_fingerprint, label_set, read_records


def test_reads_csv_tsv_and_jsonl_alike(tmp_path: Path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",x\nbye,y\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello, world\tx\nbye\ty\n")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "hello, world", "label": "x"}) + "\n\n" + json.dumps({"text": "bye", "label": "y"}) + "\n"
    )
    for name in ("a.csv", "a.tsv", "a.jsonl"):
        records = read_records(tmp_path / name, "text", "label")
        assert records.texts == ["hello, world", "bye"]
        assert records.labels == ["x", "y"]


def test_integer_labels_sort_numerically(tmp_path: Path):
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps({"t": f"r{i}", "l": i}) + "\n" for i in (10, 2, 1)))
    records = read_records(path, "t", "l")
    assert label_set(records) == ["1", "2", "10"]
    assert records.label_ids(["1", "2", "10"]) == [2, 1, 0]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("x.csv", "text,label\nok,a\nfine\n", "row 3: fewer fields than the header"),
        ("x.csv", "text,label\nok,a\n,b\n", "row 3: column 'text' is empty"),
        ("x.csv", "text,label\nok,\n", "row 2: column 'label' is empty"),
        ("x.csv", "text,label\nok,a,extra\n", "row 2: more fields than the header"),
        ("x.csv", "words,label\nok,a\n", "row 2: no column 'text' (columns: words, label)"),
        ("x.jsonl", '{"text": "ok", "label": "a"}\n{"text": "ok" "label"}\n', "row 2: not valid JSON"),
        ("x.jsonl", '["ok", "a"]\n', "row 1: expected a JSON object"),
        ("x.csv", "text,label\n", "no records"),
        ("x.parquet", "", "unsupported file type"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, name: str, content: str, expected: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_records(path, "text", "label")
    assert str(err.value).startswith(str(path))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_non_utf8_and_missing_files_are_named(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(path, "text", "label")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "absent.csv", "text", "label")


def test_unknown_label_names_the_record(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\nok,a\nok,zzz\n")
    with pytest.raises(DataError, match=r"record 2: label 'zzz' is not one of the job's 1 labels"):
        read_records(path, "text", "label").label_ids(["a"])


def test_fingerprint_follows_content(tmp_path: Path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("text,label\nx,y\n")
    b.write_text("text,label\nx,y\n")
    assert file_fingerprint(a) == file_fingerprint(b)
    b.write_text("text,label\nx,z\n")
    assert file_fingerprint(a) != file_fingerprint(b)
