"""Weight scores and the SparseGPT solver.

- magnitude: |W|
- wanda:     |W| * ||X_j||_2, the input feature's norm over all calibration tokens (Sun et al., 2023)
- ria:       relative importance and activations (Zhang et al., 2024):
             (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a, a = 0.5
- sparsegpt: OBS pruning with weight reconstruction from the Hessian H = 2/n X^T X (Frantar & Alistarh, 2023);
             its score is the OBS saliency w^2 / [U]_jj^2 that the reference code ranks by (U the upper Cholesky
             factor of the damped H^-1), here computed once on the unpruned weights
- refit:     after any mask, a least-squares refit of the surviving weights on the same Hessian

Statistics are accumulated per *input*, not per matrix: q/k/v (and gate/up) read the same tensor, so one
norm vector or one Hessian serves them all.
"""
from __future__ import annotations

import math

import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import METHODS, needs_calibration  # noqa: F401
from hybridprune.core.specs import NM, Unstructured
from hybridprune.pruning.patterns import lowest_k

RIA_POWER = 0.5  # the paper's a


class InputStats:
    """Running statistics of one input tensor: squared column norms, for SparseGPT the Hessian, for DSnoT the
    per-sequence moments."""

    def __init__(self, features: int, device, hessian: bool, moments: bool = False):
        self.tokens = 0
        self.sq = torch.zeros(features, dtype=torch.float32, device=device)
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None
        # DSnoT's statistics, per calibration sequence as its reference code keeps them: the sum of x over all
        # tokens and the sum of within-sequence variances
        self.sequences = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device) if moments else None
        self.var_sum = torch.zeros(features, dtype=torch.float64, device=device) if moments else None

    def add(self, x: torch.Tensor) -> None:
        if self.sum is not None:
            # each sequence's sum and variance (two passes: its mean, then squared deviations) in float32, as the
            # reference code computes them; totals in float64
            seqs = (x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]).float()
            total = seqs.sum(1)
            dev = seqs - (total / seqs.shape[1])[:, None, :]
            self.sum += total.sum(0).double()
            self.var_sum += (dev * dev).mean(1).sum(0).double()
            del dev
            self.sequences += seqs.shape[0]
            del seqs
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.sq += (x * x).sum(0)
        if self.H is not None:
            # Running mean of 2 X^T X, kept at the same scale whatever the number of tokens.
            self.H *= self.tokens / (self.tokens + n)
            x = x * math.sqrt(2 / (self.tokens + n))
            self.H.addmm_(x.t(), x)
        self.tokens += n


def magnitude_score(W: torch.Tensor) -> torch.Tensor:
    return W.abs().float()


def wanda_score(W: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
    if stats is None or stats.tokens == 0:
        return magnitude_score(W)  # e.g. an expert no calibration token was routed to
    return W.abs().float() * stats.sq.sqrt().to(W.device)[None, :]


def ria_score(W: torch.Tensor, stats: InputStats | None, power: float = RIA_POWER) -> torch.Tensor:
    """RIA: each weight relative to its output row's and its input column's total |W|, times ||X_j|| ** power."""
    A = W.abs().float()
    relative = A / A.sum(1, keepdim=True).clamp_min(1e-30) + A / A.sum(0, keepdim=True).clamp_min(1e-30)
    if stats is None or stats.tokens == 0:
        return relative  # no activations reached this matrix (an unrouted expert): the relative part alone
    return relative * stats.sq.sqrt().to(W.device)[None, :] ** power


def sparsegpt_score(W: torch.Tensor, hinv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """OBS saliency w_ij^2 / U_jj^2 (U, dead) = inverse_hessian(H): what SparseGPT's reference code ranks by.

    Used where a whole mask is chosen before any reconstruction (block tiers, and the in-tier masks); the
    unstructured and N:M SparseGPT solvers re-score column block by column block as the paper does.
    """
    U, dead = hinv
    s = W.float() ** 2 / torch.diagonal(U).to(W.device)[None, :] ** 2
    return s.masked_fill(dead.to(W.device)[None, :], 0.0)


def score(method: str, W: torch.Tensor, stats: InputStats | None, hinv=None) -> torch.Tensor:
    """The score `method` ranks weights by. SparseGPT needs `hinv` (inverse_hessian of the input's H)."""
    if method == "magnitude":
        return magnitude_score(W)
    if method == "wanda":
        return wanda_score(W, stats)
    if method == "ria":
        return ria_score(W, stats)
    if method == "sparsegpt":
        if hinv is None:
            raise HybridPruneError("the SparseGPT score needs the input's inverse Hessian")
        return sparsegpt_score(W, hinv)
    raise HybridPruneError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")


def inverse_hessian(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the damped H^-1, mask of dead input columns)."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
    except torch.linalg.LinAlgError:
        raise HybridPruneError("the Hessian is not positive definite; raise --percdamp (e.g. 0.1)") from None


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor | tuple, pattern, blocksize: int = 128,
                    percdamp: float = 0.01, fixed_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Prune W ([out, in], float32, modified in place) with OBS updates; returns the keep-mask.

    H is the Hessian or the (Hinv, dead) pair from inverse_hessian, so matrices sharing an input share it.
    Unstructured and N:M masks are chosen adaptively, column block by column block, from the saliency
    w^2 / [H^-1]_jj^2 of the already-updated weights. Unstructured keeps Wanda's per-row comparison group
    (group='row': every row loses exactly int(in * sparsity)) or compares a whole column block (group='matrix',
    the original SparseGPT rule, exact per matrix). Block patterns pass their mask as `fixed_keep`.
    """
    rows, cols = W.shape
    Hinv, dead = inverse_hessian(H, percdamp) if isinstance(H, torch.Tensor) else H
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool) if fixed_keep is None else fixed_keep.clone()
    sparsity = getattr(pattern, "sparsity", 0.0)
    adaptive_nm = fixed_keep is None and isinstance(pattern, NM)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # Work on the transposed block so that column i is a contiguous row and updates are BLAS rank-1 calls.
        Wt = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if fixed_keep is None and isinstance(pattern, Unstructured):
            sal = (Wt ** 2 / d[:, None] ** 2).t()
            if pattern.group == "row":
                k = int(i2 * sparsity) - int(i1 * sparsity)  # spreads exactly int(in * s) over the blocks
                keep[:, i1:i2] = ~lowest_k(sal, k)
            else:
                k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
                keep[:, i1:i2] = ~lowest_k(sal.reshape(-1), k).reshape(sal.shape)
        scale = (~keep[:, i1:i2]).t().float() / d[:, None]  # err_i = w_i / d_i on pruned weights, else 0
        Errt = torch.empty_like(Wt)
        for i in range(i2 - i1):
            if adaptive_nm and i % pattern.m == 0:
                m = min(pattern.m, i2 - i1 - i)
                sal = (Wt[i:i + m] ** 2 / d[i:i + m, None] ** 2).t()
                group = torch.zeros_like(sal, dtype=torch.bool)
                group.scatter_(1, torch.topk(sal, min(pattern.n, m), dim=1).indices, True)
                keep[:, i1 + i:i1 + i + m] = group
                scale[i:i + m] = (~group).t().float() / d[i:i + m, None]
            torch.mul(Wt[i], scale[i], out=Errt[i])
            if i + 1 < i2 - i1:
                Wt[i + 1:].addr_(Hinv1[i, i + 1:], Errt[i], alpha=-1)
        W[:, i1:i2] = Wt.t()
        if i2 < cols:
            W[:, i2:].addmm_(Errt.t(), Hinv[i1:i2, i2:], alpha=-1)
    W.mul_(keep)
    return keep


@torch.no_grad()
def refit_kept(W: torch.Tensor, W0: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, steps: int,
               percdamp: float = 0.01) -> bool:
    """Refit the kept weights of W in place: min (w - w0)^T H (w - w0) for every row, pruned weights held at 0.

    A mask throws away the part of each output that its pruned weights carried; letting the surviving weights of
    the row absorb it is what makes coarse patterns (whole 16x16 blocks cut to 15 weights) usable. All rows are
    solved at once by Jacobi-preconditioned conjugate gradients, one [rows, in] x [in, in] product per step.
    CG starts from the current W (the masked weights, or SparseGPT's reconstruction when both are asked for), so
    an earlier reconstruction is refined, never discarded. A few steps recover most of the error; more chase the
    calibration sample (README, three-tier section). Returns False (W left as it was) if the solve went non-finite.
    """
    H = H.float().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean() + 1e-8)  # dead inputs get a positive diagonal too
    P = keep.float()
    W0 = W0.float()
    d = H.diagonal()[None, :]
    X = W.float() * P
    r = P * ((W0 - X) @ H)        # minus the gradient, restricted to the kept weights
    z = r / d
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(steps):
        Ap = P * (p @ H)
        pAp = (p * Ap).sum(1, keepdim=True)
        # H is positive definite on the kept set, so pAp > 0 unless the row has converged (p = 0): step 0 there.
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X.add_(alpha * p)
        r.sub_(alpha * Ap)
        z = r / d
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
    if not torch.isfinite(X).all():
        return False
    W.copy_((X * P).to(W.dtype))
    return True

