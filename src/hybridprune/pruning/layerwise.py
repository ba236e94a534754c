"""OWL, outlier-weighed layer-wise sparsity (Yin et al., ICML 2024): layers with more outliers keep more weights.

    outlier ratio of layer l   D_l = share of the layer's Wanda scores |W_ij| * ||X_j|| (all its matrices
                               together) above M times their mean; scores of the dense model (one scoring pass)
    keep ratios                D_l rescaled linearly onto [0, 2 lambda], then shifted so that their mean over all
                               prunable weights is 1 - s: the layers' sparsities span 2 lambda around s (within
                               [s - lambda, s + lambda] unless the ratios are skewed, as in the reference code)
                               and the weights pruned add up to exactly s of the total (the reference code
                               averages over layers, which is the same for layers of one size, as in LLaMA)
    block patterns             the layer's tier ratios move instead: Delta s_l / (1 - N/M) of the blocks go
                               from the dense to the N:M tier (or back; `block`/`block-topk`, which have no
                               N:M tier: to the top-k tier), so a layer with more outliers gets more dense
                               blocks at the same overall sparsity
Defaults are the paper's: M = 5, lambda = 0.08.
"""
from __future__ import annotations

import dataclasses

import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import OWL_LAMBDA, OWL_M, check_owl, tier_move  # noqa: F401
from hybridprune.core.specs import Unstructured

def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all the layer's scores above m times their mean."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    mean = total / max(count, 1)
    return sum(int((s > m * mean).sum()) for s in scores) / max(count, 1)


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsity from outlier ratios: keep ratios on [0, 2 lambda] by outliers, shifted so that the
    size-weighted mean sparsity is exactly `sparsity`."""
    if len(ratios) < 2:
        raise HybridPruneError("--layer-sparsity owl needs at least two decoder layers to redistribute sparsity "
                               "between; this model has one")
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    keep = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    keep = keep - (keep * w).sum() / w.sum() + (1 - sparsity)
    return [float(1 - k) for k in keep]


def layer_pattern(pattern, sparsity: float):
    """The pattern with one layer's sparsity: unstructured directly, block tiers by moving blocks between the dense
    and N:M tiers."""
    if isinstance(pattern, Unstructured):
        return dataclasses.replace(pattern, sparsity=sparsity)
    j, gain = tier_move(pattern)
    delta = (sparsity - pattern.expected_sparsity) / gain
    tiers = list(pattern.tiers)
    tiers[0], tiers[j] = max(tiers[0] - delta, 0.0), max(tiers[j] + delta, 0.0)
    return dataclasses.replace(pattern, tiers=tuple(tiers))
