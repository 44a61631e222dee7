"""The frozen lower part of a model, run once per party over its records and cached on disk.

Only the upper layers carry trainable weights, so the lower layers' output never changes during a
job. Each party runs them once (`frozen_features`), and trains and evaluates its kind's
`UpperStack` on the cached hidden states: the same function as the whole model at a fraction of
the cost, which is what makes DP-SGD with large Poisson batches affordable on a CPU.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ENCODE_BATCH = 64
FEATURES_FORMAT = 3  # bump when what is cached changes meaning
IGNORE = -100  # a token target that counts for no loss (cross_entropy's ignore_index)

FrozenForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Features:
    """What the frozen part of the model computes for a list of records, one row per real token.

    Packed (no padding) because records are short and uneven; `batch` pads only to the longest
    record asked for. Rows are float32 so that batches need no conversion, with one zero row at
    the end that padding positions point at. `targets` (causal LMs only) holds each token's next
    token when that one is part of the response, else IGNORE.
    """

    values: torch.Tensor  # [tokens of all records + 1, width]
    lengths: torch.Tensor  # [records]
    targets: torch.Tensor | None = None  # [tokens of all records + 1]

    @classmethod
    def pack(cls, per_record: list[torch.Tensor], targets: list[list[int]] | None = None) -> Features:
        width = per_record[0].shape[-1]
        values = torch.cat([*per_record, torch.zeros(1, width, dtype=per_record[0].dtype)])
        packed_targets = None
        if targets is not None:
            packed_targets = torch.tensor([t for record in targets for t in record] + [IGNORE])
        return cls(values.float(), torch.tensor([len(t) for t in per_record]), packed_targets)

    def __post_init__(self) -> None:
        self.values = self.values.float()
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def in_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every row once, in batches of similar length: each batch pads only to its own longest
        record (evaluation; sums over records do not depend on the order)."""
        order = torch.argsort(self.lengths, stable=True)
        yield from torch.split(order, batch_size)

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(hidden [records, tokens, width], mask [records, tokens][, targets [records, tokens]]) for `rows`."""
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 1
        positions = torch.arange(width)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
        index = torch.where(mask, self.offsets[rows].unsqueeze(1) + positions, len(self.values) - 1)
        out = (self.values[index].to(device), mask.long().to(device))
        if self.targets is None:
            return out
        return (*out, self.targets[index].to(device))


def frozen_features(
    forward: FrozenForward, tokens: Sequence[Sequence[int]], device: torch.device,
    targets: list[list[int]] | None = None,
) -> Features:
    """Run `forward(ids, mask)` over token lists in batches of similar length (little padding)."""
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    per_record: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    with torch.no_grad():
        for start in range(0, len(order), ENCODE_BATCH):
            rows = order[start : start + ENCODE_BATCH]
            width = max(len(tokens[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, : len(tokens[i])] = torch.tensor(tokens[i])
                mask[j, : len(tokens[i])] = 1
            out = forward(ids.to(device), mask.to(device)).to("cpu", torch.float16)
            for j, i in enumerate(rows):
                per_record[i] = out[j, : len(tokens[i])]
    return Features.pack(per_record, targets)


def features_key(settings: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{FEATURES_FORMAT}|{settings}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def cached(key: str, compute: Callable[[], Features], cache_dir: Path | None) -> Features:
    """`compute()`, or its result from `cache_dir` if there.

    Written atomically, so concurrent or killed writers never leave a half file behind.
    """
    if cache_dir is None:
        return compute()
    cache_file = Path(cache_dir) / "features" / f"{key}.pt"
    if cache_file.is_file():
        return Features(**torch.load(cache_file))
    features = compute()
    # Hidden states of every record: owner only, whatever the umask of the process writing them.
    Path(cache_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    cache_file.parent.mkdir(mode=0o700, exist_ok=True)
    cache_file.parent.chmod(0o700)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.touch(mode=0o600)
    torch.save({"values": features.values.half(), "lengths": features.lengths, "targets": features.targets}, tmp)
    os.replace(tmp, cache_file)
    return features
