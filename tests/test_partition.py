import numpy as np
import pytest

from common.partition import dirichlet_partition

LABELS = np.repeat(np.arange(20), 50).tolist()  # 20 labels x 50 records


def test_split_is_a_deterministic_partition():
    parts = dirichlet_partition(LABELS, 4, alpha=0.5, seed=3, min_size=10)
    again = dirichlet_partition(LABELS, 4, alpha=0.5, seed=3, min_size=10)
    assert parts == again
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(LABELS)))  # disjoint and complete
    assert min(len(p) for p in parts) >= 10
    assert dirichlet_partition(LABELS, 4, alpha=0.5, seed=4, min_size=10) != parts


def _label_skew(parts: list[list[int]]) -> float:
    """Mean total-variation distance between each institution's label mix and the global one."""
    labels = np.asarray(LABELS)
    global_mix = np.bincount(labels, minlength=20) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=20) / len(p) - global_mix).sum() for p in parts]))


def test_small_alpha_is_more_skewed_than_large_alpha():
    skew_small = np.mean([_label_skew(dirichlet_partition(LABELS, 4, 0.1, s)) for s in range(5)])
    skew_large = np.mean([_label_skew(dirichlet_partition(LABELS, 4, 100.0, s)) for s in range(5)])
    assert skew_small > 0.4
    assert skew_large < 0.1


def test_impossible_requests_fail_clearly():
    with pytest.raises(ValueError, match="cannot give 4 institutions 300 records"):
        dirichlet_partition(LABELS, 4, 1.0, 0, min_size=300)
    with pytest.raises(ValueError, match="raise alpha or lower federation.min_examples"):
        dirichlet_partition(LABELS, 3, 0.01, 0, min_size=330)
