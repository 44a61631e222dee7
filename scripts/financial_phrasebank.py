"""Make the LLM demo's data: a class-balanced train/test split of Financial PhraseBank as CSV.

The release (Malo et al. 2014, CC BY-NC-SA 3.0) has one `sentence@label` per line and no split.
This reads one of its files, drops repeated sentences (so none is in both splits), and writes
`train.csv` and `test.csv` (columns `text`, `category`) with the same number of sentences of each
label, drawn with a fixed seed: the job fedtune reads, and what `data/financial_phrasebank/` holds.

    .venv/bin/python scripts/financial_phrasebank.py SOURCE.txt OUT_DIR [--train-per-label N] [--test-per-label M]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.data import DataError  # noqa: E402

LABELS = ("negative", "neutral", "positive")


def read_phrasebank(path: Path) -> list[tuple[str, str]]:
    """(sentence, label) per line, in file order; the label follows the line's last '@'."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); convert with iconv -f latin1 -t utf-8") from None
    rows = []
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")
        if not at:
            raise DataError(f"{path}: row {row}: no '@' before the label")
        if label.strip() not in LABELS:
            raise DataError(f"{path}: row {row}: label {label.strip()[:40]!r} is not one of {', '.join(LABELS)}")
        if not sentence.strip():
            raise DataError(f"{path}: row {row}: no sentence before '@'")
        rows.append((sentence.strip(), label.strip()))
    if not rows:
        raise DataError(f"{path}: no sentences")
    return rows


def balanced_split(rows: list[tuple[str, str]], train_per_label: int, test_per_label: int,
                   seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Each label's distinct sentences shuffled with `seed`: the first `test_per_label` to test, the
    next `train_per_label` to train; a repeated sentence counts once."""
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    seen: set[str] = set()
    for sentence, label in rows:
        if sentence not in seen:
            seen.add(sentence)
            by_label[label].append(sentence)
    generator = random.Random(seed)
    train, test = [], []
    for label, sentences in by_label.items():
        if len(sentences) < train_per_label + test_per_label:
            raise DataError(f"{len(sentences)} distinct {label} sentences, fewer than the "
                            f"{train_per_label} + {test_per_label} asked for")
        generator.shuffle(sentences)
        test += [(s, label) for s in sentences[:test_per_label]]
        train += [(s, label) for s in sentences[test_per_label : test_per_label + train_per_label]]
    return train, test


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerows(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a release file, e.g. Sentences_AllAgree.txt")
    parser.add_argument("out", type=Path, help="folder for train.csv and test.csv")
    parser.add_argument("--train-per-label", type=int, default=100)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        train, test = balanced_split(read_phrasebank(args.source), args.train_per_label, args.test_per_label, args.seed)
    except DataError as exc:
        raise SystemExit(f"financial_phrasebank: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "train.csv", train)
    write_csv(args.out / "test.csv", test)
    print(f"financial_phrasebank: {len(train)} train, {len(test)} test sentences in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
