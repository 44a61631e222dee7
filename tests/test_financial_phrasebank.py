"""scripts/financial_phrasebank.py: the LLM demo's data from the release's `sentence@label` files."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import REPO_ROOT
from common.data import DataError, read_records

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from financial_phrasebank import balanced_split, read_phrasebank  # noqa: E402

SCRIPT = REPO_ROOT / "scripts" / "financial_phrasebank.py"


def _release(path: Path, per_label: int) -> Path:
    lines = [f"Sentence {label} {i} , with an @ inside .@{label}" for label in ("negative", "neutral", "positive")
             for i in range(per_label)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_label_follows_the_last_at_sign(tmp_path: Path):
    rows = read_phrasebank(_release(tmp_path / "s.txt", 1))
    assert rows[0] == ("Sentence negative 0 , with an @ inside .", "negative")
    assert [label for _, label in rows] == ["negative", "neutral", "positive"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("Fine .@neutral\nNo label here\n", "row 2: no '@' before the label"),
        ("Fine .@neutral\n\nShares rose .@bullish\n", "row 3: label 'bullish' is not one of negative, neutral, positive"),
        ("@positive\n", "row 1: no sentence before '@'"),
        ("\n\n", "no sentences"),
    ],
)
def test_malformed_rows_give_one_line_errors_naming_file_and_row(tmp_path: Path, content: str, expected: str):
    path = tmp_path / "Sentences_AllAgree.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_phrasebank(path)
    assert str(err.value) == f"{path}: {expected}"


def test_latin1_release_file_is_named_with_the_fix(tmp_path: Path):
    path = tmp_path / "Sentences_50Agree.txt"
    path.write_bytes("Sales fell in Espoo , in the caf\xe9 .@negative\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"Sentences_50Agree.txt: not UTF-8 text \(byte \d+\); convert with iconv"):
        read_phrasebank(path)


def test_split_is_balanced_disjoint_and_counts_a_repeated_sentence_once():
    rows = [(f"s{label}{i}", label) for label in ("negative", "neutral", "positive") for i in range(6)]
    rows += [("sneutral0", "neutral")] * 3  # repeats: would otherwise land in both splits
    train, test = balanced_split(rows, train_per_label=4, test_per_label=2, seed=1)
    assert sorted(label for _, label in test) == ["negative"] * 2 + ["neutral"] * 2 + ["positive"] * 2
    assert sorted(label for _, label in train) == ["negative"] * 4 + ["neutral"] * 4 + ["positive"] * 4
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert balanced_split(rows, 4, 2, seed=1) == (train, test)


def test_too_few_sentences_of_a_label_is_refused():
    rows = [("a", "negative"), ("b", "neutral"), ("c", "positive")]
    with pytest.raises(DataError, match="1 distinct negative sentences, fewer than the 1 \\+ 1 asked for"):
        balanced_split(rows, 1, 1)


def test_script_writes_csv_that_fedtune_reads(tmp_path: Path):
    source = _release(tmp_path / "s.txt", 5)
    subprocess.run([sys.executable, SCRIPT, source, tmp_path / "out", "--train-per-label", "3",
                    "--test-per-label", "2"], check=True, capture_output=True)
    train = read_records(tmp_path / "out" / "train.csv", "text", "category")
    assert len(train) == 9 and set(train.labels) == {"negative", "neutral", "positive"}
    assert "with an @ inside" in train.texts[0]
    with (tmp_path / "out" / "test.csv").open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 6


def test_script_reports_a_bad_file_in_one_line(tmp_path: Path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Nothing to split\n", encoding="utf-8")
    result = subprocess.run([sys.executable, SCRIPT, bad, tmp_path / "out"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == f"financial_phrasebank: {bad}: row 1: no '@' before the label"


def test_demo_data_is_the_committed_split():
    """data/financial_phrasebank/ holds the split SOURCE.md describes: balanced, disjoint."""
    folder = REPO_ROOT / "data" / "financial_phrasebank"
    train = read_records(folder / "train.csv", "text", "category")
    test = read_records(folder / "test.csv", "text", "category")
    assert len(train) == 600 and len(test) == 150
    assert {label: train.labels.count(label) for label in set(train.labels)} == {
        "negative": 200, "neutral": 200, "positive": 200}
    assert not set(train.texts) & set(test.texts)
