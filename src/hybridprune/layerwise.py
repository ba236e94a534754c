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

from .errors import HybridPruneError
from .patterns import NM, TieredBlocks, Unstructured

OWL_M = 5.0
OWL_LAMBDA = 0.08


def check_owl(pattern, m: float, lam: float) -> None:
    """OWL's options against the pattern, before any model is read."""
    if not (m > 0):
        raise HybridPruneError(f"--owl-m must be > 0 (the paper uses {OWL_M}), got {m}")
    if isinstance(pattern, NM):
        raise HybridPruneError("--layer-sparsity owl needs a pattern whose sparsity can vary (unstructured or the "
                               f"block tiers); N:M fixes every layer at {pattern.expected_sparsity:g}")
    s = pattern.expected_sparsity
    if not (0 <= lam <= s):
        raise HybridPruneError(f"--owl-lambda must be within [0, {s:g}] (the sparsity), got {lam}")
    if s + lam >= 1:
        raise HybridPruneError(f"--owl-lambda {lam} leaves no weights in the sparsest layers (sparsity {s:g} + "
                               f"{lam} >= 1); use a smaller --owl-lambda")
    if isinstance(pattern, TieredBlocks):
        if pattern.scope == "model":
            raise HybridPruneError("--layer-sparsity owl sets each layer's tiers; --tier-scope model ranks blocks "
                                   "across layers instead. Use --tier-scope layer or matrix")
        j, gain = _tier_move(pattern)
        shift = lam / gain
        if pattern.tiers[0] < shift - 1e-12 or pattern.tiers[j] < shift - 1e-12:
            raise HybridPruneError(f"--owl-lambda {lam} moves up to {shift:.3f} of the blocks between the dense and "
                                   f"{'N:M' if j == 1 else 'top-k'} tiers, more than tiers {list(pattern.tiers)} hold; use a smaller "
                                   "--owl-lambda")


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
    j, gain = _tier_move(pattern)
    delta = (sparsity - pattern.expected_sparsity) / gain
    tiers = list(pattern.tiers)
    tiers[0], tiers[j] = max(tiers[0] - delta, 0.0), max(tiers[j] + delta, 0.0)
    return dataclasses.replace(pattern, tiers=tuple(tiers))


def _tier_move(pattern: TieredBlocks) -> tuple[int, float]:
    """Which tier trades blocks with the dense tier, and the sparsity one block gains by the move."""
    if pattern.tiers[1] > 0:
        return 1, 1 - pattern.n / pattern.m
    return 2, 1 - pattern.topk / pattern.block_size ** 2
