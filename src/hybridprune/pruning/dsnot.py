"""DSnoT, dynamic sparse no training (Zhang et al., ICLR 2024): a training-free prune-and-grow refinement of a mask.

For every output row i of a pruned matrix, the expected reconstruction error is
    e_i = sum over pruned j of D_ij,   D_ij = W_ij * mu_j,   mu_j = the sum of input j over a calibration sequence,
          averaged over sequences
and each cycle swaps one weight to shrink |e_i|:
    grow   a pruned weight whose D has the sign of e_i, the one with the largest |D_ij| / var_j ** power
           (var_j: input j's variance within a sequence, averaged over sequences);
    prune  a kept weight whose D has the opposite sign, the one with the lowest initial score (Wanda's |W| ||X||),
           so that e_i moves back toward 0;
the swap is made only while |e_i| > threshold; a row stops at its first refused swap, and all rows stop after
max_cycles. Swaps inside groups (N:M, block tiers) must also keep e_i's first sign, as in the reference code's N:M
branch; its unstructured branch runs with `without_same_sign` (its default), so there e_i may cross 0 and the next
swap pulls it back. Defaults are the reference code's: 50 cycles, threshold 0.1, power 1, and its default of
leaving the MLP matrices with their initial mask (`skip`).

Every swap removes one weight and restores one in the same row, so the sparsity is exact. Pattern rules hold
because the pruned weight is chosen inside the grown weight's group: N:M, its group of M (as the reference code's
N:M variant does); block tiers, its N:M group in an N:M block and its row within a top-k block (a row of a top-k
block without a kept weight cannot swap). Unstructured masks swap anywhere in the row. Candidates are only
weights pruned (to grow) or kept (to prune) by the initial mask; a row whose candidates run out stops.
"""
from __future__ import annotations

import torch

from hybridprune.core.specs import DSNOT_CYCLES, DSNOT_SKIP, DSNOT_THRESHOLD  # noqa: F401

DSNOT_POWER = 1.0


def _ordered(values: torch.Tensor, allowed: torch.Tensor, descending: bool, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first k column indices where `allowed`, ordered by value; and how many are allowed. A list
    gives one candidate a cycle at most, so k = cycles is all a row can use (a top-k, not a sort of the row;
    equal values, which real weights and activations practically never give, come in either order)."""
    key = values.masked_fill(~allowed, float("inf") if not descending else float("-inf"))
    order = torch.topk(key, min(k, key.shape[1]), dim=1, largest=descending, sorted=True).indices
    return order, allowed.sum(1)


def _next(lists, ptr, side, rows):
    """Each row's next candidate from the list its side picks (one element per row, so a cycle costs O(rows)),
    whether the list still had one, and the pointer moved on."""
    pos = ptr[rows, side]
    at = pos.clamp(max=lists[0][0].shape[1] - 1)
    idx = torch.where(side == 1, lists[1][0][rows, at], lists[0][0][rows, at])
    ok = pos < torch.where(side == 1, lists[1][1], lists[0][1])
    ptr[rows, side] += 1
    return idx, ok


def refine(W: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, initial: torch.Tensor,
           groups: torch.Tensor | None = None, cycles: int = DSNOT_CYCLES, threshold: float = DSNOT_THRESHOLD,
           power: float = DSNOT_POWER, same_sign: bool | None = None) -> torch.Tensor:
    """The refined keep-mask. W, keep, initial: [R, C]; mean, var: [C]; groups: [R, C] int64 ids of the sets a swap
    must stay inside (-1: no swap there), None for anywhere in the row. same_sign: refuse a swap that flips the
    error's first sign (None: the reference's choice, only inside groups)."""
    if same_sign is None:
        same_sign = groups is not None
    keep = keep.clone()
    rows = torch.arange(W.shape[0], device=W.device)
    D = W * mean.to(W.dtype)[None, :]  # in W's dtype: float32 from the engine, as in the reference code
    grow_key = D / var.to(W.dtype).clamp_min(1e-30)[None, :] ** power
    pruned0 = ~keep
    if groups is not None:
        pruned0 &= groups >= 0
    err = (D * (~keep)).sum(1)
    sign0 = torch.sign(err)
    # grow lists: pruned with D > 0 by D/var descending (used when e > 0), pruned with D < 0 ascending (e <= 0)
    grow = [_ordered(grow_key, pruned0 & (D < 0), False, cycles), _ordered(grow_key, pruned0 & (D > 0), True, cycles)]
    gptr = torch.zeros(W.shape[0], 2, dtype=torch.long, device=W.device)
    if groups is None:  # prune lists: kept with D < 0 (used when e >= 0), kept with D > 0 (e < 0), lowest score first
        prune = [_ordered(initial, keep & (D < 0), False, cycles), _ordered(initial, keep & (D > 0), False, cycles)]
        pptr = torch.zeros_like(gptr)
    else:
        score = initial.to(W.dtype).masked_fill(~keep, float("inf"))  # only weights kept at the start may go
        # groups are runs of adjacent columns: each position's group start, found once
        cols_ = torch.arange(W.shape[1], device=W.device).expand_as(groups)
        new = torch.ones_like(groups, dtype=torch.bool)
        new[:, 1:] = groups[:, 1:] != groups[:, :-1]
        gstart = torch.where(new, cols_, torch.zeros_like(cols_)).cummax(1).values
        width = int((cols_ - gstart).max()) + 1
    active = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
    for _ in range(cycles):
        if not active.any():
            break
        side = (err > 0).long()  # grow from the positive list when e > 0
        g_idx, ok = _next(grow, gptr, side, rows)
        if groups is None:
            p_idx, p_ok = _next(prune, pptr, (err < 0).long(), rows)  # prune positive-D weights when e < 0
            ok &= p_ok
            movable = ok
        else:
            # the kept weight of the grown weight's group with the lowest score
            gid = groups[rows, g_idx]
            start = gstart[rows, g_idx]
            cols = (start[:, None] + torch.arange(width, device=W.device)[None, :]).clamp(max=W.shape[1] - 1)
            same = groups[rows[:, None], cols] == gid[:, None]
            cand = score[rows[:, None], cols].masked_fill(~same, float("inf"))
            best = cand.argmin(1)
            p_idx = cols[rows, best]
            movable = ok & torch.isfinite(cand[rows, best])  # a group with no kept weight: no swap this cycle
        after = err + D[rows, p_idx] - D[rows, g_idx]
        possible = ok & movable
        swap = active & possible & (err.abs() > threshold)
        if same_sign:
            swap &= torch.sign(after) == sign0
        # a row stops when its candidates run out or at its first refused swap (as in the reference); a grouped row
        # whose grown weight's group has no kept weight left goes on with the next candidate
        active &= ~(~ok | (possible & ~swap))
        r = rows[swap]
        keep[r, p_idx[swap]] = False
        keep[r, g_idx[swap]] = True
        if groups is not None:
            score[r, p_idx[swap]] = float("inf")
        err = torch.where(swap, after, err)
    return keep


def nm_groups(shape, m: int, device=None) -> torch.Tensor:
    """Group ids of N:M groups along the input dimension."""
    rows, cols = shape
    return (torch.arange(rows, device=device)[:, None] * cols + (torch.arange(cols, device=device) // m * m)[None, :]).long()


def tier_groups(tiers_full: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """Group ids for block tiers (expanded to [R, C]): an N:M block's groups of M, a top-k block's row inside the
    block; dense blocks take no swaps (-1)."""
    rows, cols = tiers_full.shape
    c = torch.arange(cols, device=tiers_full.device)
    r = torch.arange(rows, device=tiers_full.device)[:, None]
    nm = (r * cols + (c // m * m)[None, :]) * 2        # even ids: N:M groups (first column of the group)
    topk = (r * cols + (c // b * b)[None, :]) * 2 + 1   # odd ids: a row inside a top-k block
    out = torch.full((rows, cols), -1, dtype=torch.long, device=tiers_full.device)
    out = torch.where(tiers_full == 1, nm.expand(rows, cols), out)
    out = torch.where(tiers_full == 2, topk.expand(rows, cols), out)
    return out


def refine_permuted(W: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, initial: torch.Tensor,
                    perm: torch.Tensor, m: int, **kw) -> torch.Tensor:
    """refine() for N:M groups cut from the columns taken in the order `perm` (a channel permutation): the swaps
    run on the permuted columns, where each group is M adjacent ones, and the mask comes back in the original
    column order."""
    refined = refine(W[:, perm], keep[:, perm], mean[perm], var[perm], initial[:, perm],
                     nm_groups(W.shape, m, W.device), **kw)
    return torch.empty_like(keep).index_copy_(1, perm, refined)
