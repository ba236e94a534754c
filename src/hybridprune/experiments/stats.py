"""Paired statistics for comparing models evaluated on the same examples, and mask overlap.

- paired_bootstrap: mean per-example difference a - b with a percentile bootstrap interval (fixed seed), the
  standard way to compare two systems scored on the same test items. With `clusters`, whole clusters are
  resampled (SQuAD questions on one paragraph move together): examples that share a passage are not
  independent, and resampling them one by one makes the interval too narrow.
- seeds_bootstrap: the same over several seeds (calibration draw, fine-tuning initialisation) at once, a
  two-level bootstrap: resample the seeds, then the clusters within each drawn seed, and average. Its interval
  covers both the choice of examples and the run-to-run spread of pruning and training.
- mcnemar: exact two-sided McNemar test on paired 0/1 outcomes (accuracies), from the discordant pairs.
- jaccard: |A & B| / |A | B| of two pruned sets (boolean masks of pruned weights).
"""
from __future__ import annotations

import math

import numpy as np

MIN_UNITS = 20  # independent units per seed below which a paired interval is not read as a verdict


def _cluster_sums(d: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of d along its last axis and per-cluster example counts."""
    ids = np.unique(np.asarray(clusters), return_inverse=True)[1] if clusters is not None else np.arange(d.shape[-1])
    k = int(ids.max()) + 1
    sums = np.stack([np.bincount(ids, weights=row, minlength=k) for row in d.reshape(-1, d.shape[-1])])
    return sums.reshape(*d.shape[:-1], k), np.bincount(ids, minlength=k).astype(np.float64)


def _interval(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95, clusters=None) -> dict:
    """{'diff': mean(a - b), 'lo', 'hi': the `level` percentile interval, 'n', 'units'}; resamples examples (or
    whole clusters, given one cluster id per example), not runs."""
    return seeds_bootstrap([a], [b], n_boot, seed, level, clusters)


def seeds_bootstrap(a_seeds, b_seeds, n_boot: int = 2000, seed: int = 0, level: float = 0.95, clusters=None) -> dict:
    """a_seeds[s], b_seeds[s]: per-example values of two systems at seed s, on the same examples for every seed.
    diff is the mean over seeds of the mean paired difference; the interval comes from drawing n_seeds seeds
    with replacement and, for each drawn seed, the clusters with replacement (ratio of sums: clusters of
    different sizes weigh by their examples). With one seed this is the ordinary (cluster) paired bootstrap."""
    a, b = np.asarray(a_seeds, dtype=np.float64), np.asarray(b_seeds, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
        raise ValueError(f"paired samples need the same non-zero shape [seeds, examples], got {a.shape} and {b.shape}")
    if clusters is not None and len(clusters) != a.shape[1]:
        raise ValueError(f"{len(clusters)} cluster ids for {a.shape[1]} examples")
    d = a - b
    sums, counts = _cluster_sums(d, clusters)           # [seeds, k], [k]
    n_seeds, k = sums.shape
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    draws = rng.integers(0, k, size=(n_boot, n_seeds, k))
    means = (sums[picks[..., None], draws].sum(-1) / counts[draws].sum(-1)).mean(1)
    lo, hi = _interval(means, level)
    per_seed = d.mean(1)
    return {"diff": float(per_seed.mean()), "lo": lo, "hi": hi, "n": int(d.shape[1]), "units": int(k),
            "seeds": int(n_seeds), "per_seed": [float(x) for x in per_seed]}


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


def pair_counts(sets, chunk: int = 1 << 24) -> tuple:
    """For m boolean sets of equal size, stacked as [m, n]: the [m, m] matrices of |A & B| and |A | B| of every
    pair, from one matrix product (0/1 sums are exact in float32 below 2**24, so columns go in chunks of that)."""
    import torch
    sets = torch.as_tensor(sets).reshape(len(sets), -1)
    inter = torch.zeros(len(sets), len(sets), dtype=torch.int64)
    for lo in range(0, sets.shape[1], chunk):
        part = sets[:, lo:lo + chunk].to(torch.float32)
        inter += (part @ part.T).round().to(torch.int64)
    size = inter.diagonal()
    return inter, size[:, None] + size[None, :] - inter


def jaccard(a, b) -> float:
    """Jaccard index of two boolean sets; 1.0 when both are empty."""
    inter, union = jaccard_counts(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool))
    return 1.0 if union == 0 else inter / union
