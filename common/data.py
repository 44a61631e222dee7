"""Reading labelled text records from a local CSV, TSV or JSONL file.

Every problem with a file becomes a one-line `DataError` that names the file, the row and the
column, so an institution operator can fix the file without reading a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import DataConfig

SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}


class DataError(ValueError):
    """A data file that cannot be used; the message names file, row and column."""


Turn = tuple[str, str]  # (role, content) of one chat message
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Records:
    """Texts with their labels as strings, in file order. For a causal LM the text is the prompt and
    the label the response; chat records also keep the messages before the response (`chats`)."""

    source: Path
    texts: list[str]
    labels: list[str]
    chats: list[tuple[Turn, ...]] | None = None

    def prompt(self, i: int) -> tuple[Turn, ...]:
        """Record i's prompt as chat messages."""
        return self.chats[i] if self.chats is not None else (("user", self.texts[i]),)

    def __len__(self) -> int:
        return len(self.texts)

    def label_ids(self, label_set: Sequence[str]) -> list[int]:
        index = {label: i for i, label in enumerate(label_set)}
        ids = []
        for row, label in enumerate(self.labels, start=1):
            if label not in index:
                raise DataError(
                    f"{self.source}: record {row}: label {label!r} is not one of the job's {len(index)} labels"
                )
            ids.append(index[label])
        return ids

    def subset(self, indices: Sequence[int]) -> Records:
        chats = None if self.chats is None else [self.chats[i] for i in indices]
        return Records(self.source, [self.texts[i] for i in indices], [self.labels[i] for i in indices], chats)


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict); line numbers count the header as line 1 for CSV/TSV."""
    delimiter = SUFFIXES[path.suffix.lower()]
    with path.open(encoding="utf-8", newline="") as handle:
        if delimiter is None:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: row {line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: row {line_no}: expected a JSON object, got {type(row).__name__}")
                yield line_no, row
        else:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                if None in row:
                    raise DataError(f"{path}: row {reader.line_num}: more fields than the header has columns")
                if None in row.values():
                    raise DataError(f"{path}: row {reader.line_num}: fewer fields than the header has columns")
                yield reader.line_num, row


def read_records(path: Path, text_column: str, label_column: str) -> Records:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    texts: list[str] = []
    labels: list[str] = []
    try:
        for row_no, row in _rows(path):
            for column in (text_column, label_column):
                if column not in row:
                    raise DataError(
                        f"{path}: row {row_no}: no column {column!r} (columns: {', '.join(map(str, row))})"
                    )
            text, label = row[text_column], row[label_column]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}: row {row_no}: column {text_column!r} is empty or not text")
            if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
                raise DataError(f"{path}: row {row_no}: column {label_column!r} is empty or not a label")
            texts.append(text)
            labels.append(str(label).strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not texts:
        raise DataError(f"{path}: no records")
    return Records(path, texts, labels)


def read_job_records(path: Path, data: DataConfig) -> Records:
    """A job's records as its data settings describe them: columns, or chats; the prompt template applied."""
    if data.messages_column is not None:
        return read_chats(path, data.messages_column)
    records = read_records(path, data.text_column, data.label_column)
    if data.prompt_template == "{text}":
        return records
    texts = [data.prompt_template.replace("{text}", text) for text in records.texts]
    return Records(records.source, texts, records.labels)


def read_chats(path: Path, column: str) -> Records:
    """JSONL records holding a chat `messages` list as TRL takes it: the last message, the
    assistant's, is the response; the messages before it are the prompt, and every assistant
    message among them trains too (common/models/decoder.py)."""
    path = Path(path)
    if SUFFIXES.get(path.suffix.lower(), ",") is not None:
        raise DataError(f"{path}: chat records (data.messages_column) must be a .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    texts, responses, chats = [], [], []
    try:
        for row_no, row in _rows(path):
            messages = row.get(column)
            if not isinstance(messages, list) or len(messages) < 2:
                raise DataError(f"{path}: row {row_no}: column {column!r} is not a list of 2 or more messages")
            turns = []
            for k, message in enumerate(messages, start=1):
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str) and message["content"].strip()):
                    raise DataError(f"{path}: row {row_no}: message {k} is not a {{role, content}} object with text")
                if message["role"] not in ROLES:
                    raise DataError(f"{path}: row {row_no}: message {k} has role {message['role']!r}, not one of "
                                    f"{', '.join(ROLES)}")
                turns.append((message["role"], message["content"]))
            if all(role != "assistant" for role, _ in turns):
                raise DataError(f"{path}: row {row_no}: no 'assistant' message: nothing to train on")
            if turns[-1][0] != "assistant":
                raise DataError(f"{path}: row {row_no}: the last message's role is {turns[-1][0]!r}, not 'assistant'")
            chats.append(tuple(turns[:-1]))
            texts.append(turns[-2][1])
            responses.append(turns[-1][1].strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not texts:
        raise DataError(f"{path}: no records")
    return Records(path, texts, responses, chats)


def label_set(records: Records) -> list[str]:
    """Distinct labels in a stable order: numerically when all are integers, else alphabetically."""
    distinct = set(records.labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def file_fingerprint(path: Path) -> str:
    """SHA-256 of the file's bytes: names the data set in caches and privacy ledgers."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
