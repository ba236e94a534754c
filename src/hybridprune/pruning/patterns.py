"""Sparsity patterns: turn a score matrix [out, in] into a keep-mask of the same shape.

- Unstructured: the lowest-scoring fraction of each comparison group (a row, as in Wanda, or the matrix).
- N:M: in every group of M consecutive weights along the input dimension keep the N best.
- Tiered blocks (three-tier hybrid, block, block-topk): cut the matrix into BxB blocks, rank blocks by their
  mean score and put them in tiers: 0 = dense, 1 = N:M inside the block, 2 = only the top-k of the block.

All masks are computed with tensor ops (no Python loop over rows, groups or blocks) and are exact:
the number of pruned weights is fixed by the configuration, not by a threshold that ties could move.
"""
from __future__ import annotations

import math

import torch

from hybridprune.core import specs
from hybridprune.core.errors import HybridPruneError, require
from hybridprune.core.specs import PATTERNS, parse_nm, parse_tiers  # noqa: F401

DENSE, NM_TIER, TOPK_TIER = 0, 1, 2


# ----------------------------------------------------------------------------- unstructured and N:M

def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k lowest scores of each row (ties go to the lower index).

    kthvalue + comparison is about twice as fast as topk on CPU; the tie fix-up keeps the count exact.
    """
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thresh = torch.kthvalue(score, k, dim=-1, keepdim=True).values
    below = score < thresh
    need = k - below.sum(-1, keepdim=True)
    eq = score == thresh
    return below | (eq & (eq.cumsum(-1) <= need))


def unstructured_keep(score: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune exactly int(group_size * sparsity) weights of each comparison group."""
    if group == "row":
        return ~lowest_k(score, int(score.shape[1] * sparsity))
    if group == "matrix":
        return ~lowest_k(score.reshape(-1), int(score.numel() * sparsity)).reshape(score.shape)
    raise HybridPruneError(f"unknown comparison group {group!r}; use row or matrix")


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n best of every m consecutive weights along dim 1; a trailing partial group keeps min(n, len)."""
    rows, cols = score.shape
    pad = (-cols) % m
    s = torch.nn.functional.pad(score, (0, pad), value=-math.inf) if pad else score
    groups = s.reshape(rows, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, -1)[:, :cols]


def check_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """True if every full group of m along dim 1 has at most n kept weights."""
    cols = keep.shape[1] - keep.shape[1] % m
    return bool((keep[:, :cols].reshape(keep.shape[0], -1, m).sum(-1) <= n).all())


# ----------------------------------------------------------------------------- N:M channel permutation (RIA)
#
# N:M groups are M consecutive input columns. Reordering the columns before the groups are cut lets every
# group hold columns of mixed importance, so fewer large scores compete for the same N places (Zhang et al.,
# ICLR 2024, section 3.3). The mask is N:M in the permuted order `index`: column index[j] sits at position j,
# so W[:, index] has valid groups and y = x[:, index] @ W[:, index].T. The index is stored with the model.

LSA_COLUMNS = 1024  # columns per assignment problem (the reference code splits large matrices the same way)


def reallocate_channels(score: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation: columns sorted by their summed score, cut into M equal slices;
    slice q fills positions q, q+M, q+2M, ... (odd slices reversed), so each group takes one column per slice."""
    cols = score.shape[1]
    order = torch.sort(score.float().sum(0), stable=True).indices
    index = torch.empty_like(order)
    for q in range(m):
        part = order[cols * q // m: cols * (q + 1) // m]
        index[q::m] = part.flip(0) if q % 2 else part
    return index


def assign_position(s: torch.Tensor, n: int, m: int, c: int) -> torch.Tensor:
    """One round of RIA's linear-sum-assignment refinement on a score matrix whose columns are already in group
    order: the columns at position c of every group are re-assigned to groups so that the total kept score is
    largest, the other M-1 columns of each group staying where they are. Returns the new column order.

    Placing column v in a group whose other columns are A (a_n their n-th largest) keeps top-n(A) + relu(v - a_n)
    in each row, so only the second term depends on the assignment.
    """
    linear_sum_assignment = require("scipy.optimize", "lsa", "--channel-permutation lsa").linear_sum_assignment
    rows, cols = s.shape
    groups = cols // m
    g = s.float().reshape(rows, groups, m)
    others = torch.cat([g[:, :, :c], g[:, :, c + 1:]], dim=2)
    a_n = others.topk(n, dim=2).values[:, :, n - 1]            # [rows, groups]
    v = g[:, :, c]                                             # [rows, groups]: the movable columns
    gain = torch.empty(groups, groups, dtype=torch.float64)    # [candidate, group]
    step = max(1, (1 << 24) // max(rows * groups, 1))          # bounds the [rows, step, groups] temporary
    for h0 in range(0, groups, step):
        h1 = min(h0 + step, groups)
        gain[h0:h1] = (v[:, h0:h1, None] - a_n[:, None, :]).clamp_min(0).sum(0).double().cpu()
    src, dst = linear_sum_assignment(gain.numpy(), maximize=True)
    order = torch.arange(cols, device=s.device)
    order[torch.as_tensor(dst, device=s.device) * m + c] = torch.as_tensor(src, device=s.device) * m + c
    return order


def permute_channels(score: torch.Tensor, n: int, m: int, lsa: bool = False) -> torch.Tensor:
    """The column order for an N:M mask: heuristic reallocation, then (lsa) one assignment round per position
    inside the group, on slices of at most LSA_COLUMNS columns. Returns index [in] (int64)."""
    index = reallocate_channels(score, m)
    if lsa:
        width = max(m, LSA_COLUMNS // m * m)
        for c in range(m):
            for start in range(0, index.numel(), width):
                part = index[start:start + width]
                index[start:start + width] = part[assign_position(score[:, part], n, m, c)]
    return index


# ----------------------------------------------------------------------------- blocks

def to_blocks(x: torch.Tensor, b: int, fill: float = 0.0) -> torch.Tensor:
    """[out, in] -> [R, C, b*b], padding the edge blocks with `fill`."""
    rows, cols = x.shape
    pr, pc = (-rows) % b, (-cols) % b
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr), value=fill)
    r, c = x.shape[0] // b, x.shape[1] // b
    return x.reshape(r, b, c, b).permute(0, 2, 1, 3).reshape(r, c, b * b)


def from_blocks(x: torch.Tensor, rows: int, cols: int, b: int) -> torch.Tensor:
    r, c = x.shape[:2]
    return x.reshape(r, c, b, b).permute(0, 2, 1, 3).reshape(r * b, c * b)[:rows, :cols]


def block_scores(score: torch.Tensor, b: int) -> torch.Tensor:
    """Mean score of each block over its real weights (edge blocks are not diluted by padding)."""
    sums = to_blocks(score.float(), b).sum(-1)
    counts = to_blocks(torch.ones_like(score, dtype=torch.float32), b).sum(-1)
    return sums / counts


def tier_counts(n_blocks: int, tiers: tuple[float, float, float]) -> tuple[int, int, int]:
    """Blocks per tier by cumulative rounding, so the three counts always add up to n_blocks."""
    n_topk = round(tiers[2] * n_blocks)
    n_nm = round((tiers[1] + tiers[2]) * n_blocks) - n_topk
    return n_blocks - n_nm - n_topk, n_nm, n_topk


def assign_tiers(scores: torch.Tensor, counts: tuple[int, int, int], floor: torch.Tensor | None = None) -> torch.Tensor:
    """Tier of each block (flat). Lowest scores go to the top-k tier, the next to N:M, the rest stay dense.

    `floor` is each block's current tier in a progressive schedule: a block never moves back up, so blocks
    already in a tier are placed there first and the remaining places go to the lowest-scoring others.
    Ties break by block index (stable sort), so the result is deterministic.
    """
    n = scores.numel()
    floor = torch.zeros(n, dtype=torch.int8, device=scores.device) if floor is None else floor.reshape(-1)
    tiers = torch.zeros(n, dtype=torch.int8, device=scores.device)
    free = torch.ones(n, dtype=torch.bool, device=scores.device)
    for tier, want in ((TOPK_TIER, counts[2]), (NM_TIER, counts[1])):
        forced = free & (floor >= tier)
        key = scores.float().masked_fill(forced, -math.inf).masked_fill(~free, math.inf)
        take = max(want, int(forced.sum()))
        idx = torch.sort(key, stable=True).indices[:take]
        tiers[idx] = tier
        free[idx] = False
    return tiers


def topk_in_blocks(score: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Keep exactly the k best weights of every block (all of them if an edge block holds fewer than k).

    Implemented as "prune the b*b - k lowest" so ties are settled by index, as in lowest_k.
    """
    rows, cols = score.shape
    blocks = to_blocks(score.float(), b, fill=-math.inf)  # padding is always pruned first
    keep = ~lowest_k(blocks, b * b - k)
    return from_blocks(keep, rows, cols, b)


def expand_tiers(tiers: torch.Tensor, rows: int, cols: int, b: int) -> torch.Tensor:
    return tiers.repeat_interleave(b, 0).repeat_interleave(b, 1)[:rows, :cols]


# ----------------------------------------------------------------------------- pattern configs

class Unstructured(specs.Unstructured):
    """The lowest-scoring fraction of each comparison group: a row (Wanda) or the matrix."""

    def keep(self, score, inner=None, floor=None, budget=None):
        return unstructured_keep(score, self.sparsity, self.group), None


class NM(specs.NM):
    """In every group of M consecutive inputs keep the N best."""

    def keep(self, score, inner=None, floor=None, budget=None):
        if score.shape[1] % self.m:
            raise HybridPruneError(
                f"a matrix with {score.shape[1]} inputs does not split into groups of {self.m}; "
                "leave it dense with --skip or choose another M")
        return nm_keep(score, self.n, self.m), None


class TieredBlocks(specs.TieredBlocks):
    """Three-tier hybrid: blocks ranked by mean score -> dense / N:M / top-k (block and block-topk: no N:M tier)."""

    def block_scores(self, score: torch.Tensor) -> torch.Tensor:
        if self.block_score == "row":
            # Wanda compares weights within an output row; dividing each row by its mean score lets a block
            # of a weak row compete with one of a strong row on how much it matters to that row.
            score = score.float() / score.float().mean(1, keepdim=True).clamp_min(1e-30)
        return block_scores(score, self.block_size)

    def keep(self, score, inner=None, floor=None, budget=None):
        """Keep-mask and tier map [R, C] (int8) for one matrix.

        `budget` overrides the per-tier block counts (used by layer and model scope), `floor` is the tier map of
        the previous progressive round.
        """
        bs = self.block_scores(score)
        counts = budget if budget is not None else tier_counts(bs.numel(), self.tiers)
        tiers = assign_tiers(bs.reshape(-1), counts, None if floor is None else floor.to(bs.device)).reshape(bs.shape)
        return self.apply_tiers(score, inner, tiers, floor), tiers

    def apply_tiers(self, score, inner, tiers, floor=None):
        rows, cols = score.shape
        b = self.block_size
        inner = score if inner is None else inner
        nm = nm_keep(inner, self.n, self.m)
        if self.retention is not None:
            # Adaptive rule: an N:M candidate whose N:M mask keeps too little of its score stays dense.
            kept = block_scores(score * nm, b)
            whole = block_scores(score, b).clamp_min(1e-30)
            stay_dense = (tiers == NM_TIER) & (kept / whole < self.retention)
            if floor is not None:
                stay_dense &= floor.to(tiers.device) < NM_TIER
            tiers[stay_dense] = DENSE
        full = expand_tiers(tiers, rows, cols, b)
        keep = torch.ones_like(score, dtype=torch.bool)
        keep = torch.where(full == NM_TIER, nm, keep)
        if (tiers == TOPK_TIER).any():
            keep = torch.where(full == TOPK_TIER, topk_in_blocks(inner, b, self.topk), keep)
        return keep


KINDS = (Unstructured, NM, TieredBlocks)


def make_pattern(name: str, sparsity: float = 0.5, **opts):
    """The pattern of a CLI name (core.specs.make_pattern), as the classes here that compute masks."""
    return specs.make_pattern(name, sparsity, kinds=KINDS, **opts)


def pattern_of(config) -> Unstructured | NM | TieredBlocks:
    """The mask-making pattern of a PruneConfig (its build_pattern() gives the same spec without masks)."""
    return make_pattern(config.pattern, config.sparsity, **config.pattern_options())


def block_pattern(sparsity: float, block_size: int = 16, **kw) -> TieredBlocks:
    return specs.block_pattern(sparsity, block_size, kind=TieredBlocks, **kw)


def block_topk_pattern(sparsity: float, block_size: int = 16, topk: int = 15, **kw) -> TieredBlocks:
    return specs.block_topk_pattern(sparsity, block_size, topk, kind=TieredBlocks, **kw)
