"""Non-IID splits of one data set into institutions, for simulation.

The usual label-skew recipe (Hsu et al. 2019, "Measuring the effects of non-identical data
distribution"): for every label, draw the institutions' shares from Dirichlet(alpha) and deal
that label's records out accordingly. Small alpha gives each institution few labels; large
alpha approaches an IID split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_DRAWS = 1000


def dirichlet_partition(
    labels: Sequence[int], parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Record indices for each of `parts` institutions; each holds at least `min_size` records.

    Deterministic for a given seed, so every simulated institution can compute its own share
    without talking to the others.
    """
    if parts < 1 or alpha <= 0:
        raise ValueError("parts must be >= 1 and alpha > 0")
    if parts * min_size > len(labels):
        raise ValueError(f"{len(labels)} records cannot give {parts} institutions {min_size} records each")
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        shares: list[list[int]] = [[] for _ in range(parts)]
        for label in np.unique(labels_arr):
            members = rng.permutation(np.flatnonzero(labels_arr == label))
            proportions = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for share, chunk in zip(shares, np.split(members, cuts)):
                share.extend(chunk.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [sorted(s) for s in shares]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} records gave all {parts} institutions "
        f"{min_size} records in {MAX_DRAWS} draws; raise alpha or lower federation.min_examples"
    )
