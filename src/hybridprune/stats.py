"""Paired statistics for comparing models evaluated on the same examples, and mask overlap.

- paired_bootstrap: mean per-example difference a - b with a percentile bootstrap interval (fixed seed), the
  standard way to compare two systems scored on the same test items.
- mcnemar: exact two-sided McNemar test on paired 0/1 outcomes (accuracies), from the discordant pairs.
- jaccard: |A & B| / |A | B| of two pruned sets (boolean masks of pruned weights).
"""
from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{'diff': mean(a - b), 'lo', 'hi': the `level` percentile interval, 'n'}; resamples examples, not runs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples need the same non-zero length, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(d))}


def mcnemar(a, b) -> dict:
    """Exact McNemar test: b01 = #(a=1, b=0), b10 = #(a=0, b=1); p = two-sided binomial tail at 1/2."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n01 + n10, min(n01, n10)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": n01, "b_only": n10, "p": p}


def jaccard_counts(a, b) -> tuple[int, int]:
    """(|A & B|, |A | B|) of two boolean sets (tensors or arrays): sums of these give the Jaccard index of
    a union of matrices, which is not the mean of per-matrix indices."""
    return int((a & b).sum()), int((a | b).sum())


def jaccard(a, b) -> float:
    """Jaccard index of two boolean sets; 1.0 when both are empty."""
    inter, union = jaccard_counts(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool))
    return 1.0 if union == 0 else inter / union
