"""Scores (pruning/scoring.py): SparseGPT's saliency and its reconstruction against a plain numpy reference."""
import numpy as np
import pytest
import torch
from conftest import tiny_model

from hybridprune import PruneConfig
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.engine import prune
from hybridprune.pruning.scoring import (
    InputStats,
    inverse_hessian,
    score,
    sparsegpt_score,
)


def test_sparsegpt_score_is_the_obs_saliency_not_wanda():
    torch.manual_seed(0)
    X = torch.randn(200, 8) @ torch.randn(8, 8)
    st = InputStats(8, "cpu", hessian=True)
    st.add(X)
    W = torch.randn(4, 8)
    hinv = inverse_hessian(st.H, 0.01)
    U = torch.linalg.cholesky(torch.linalg.inv(st.H + 0.01 * st.H.diag().mean() * torch.eye(8)), upper=True)
    expect = W ** 2 / torch.diag(U)[None, :] ** 2
    assert torch.allclose(score("sparsegpt", W, st, hinv), expect, rtol=1e-4)
    assert torch.equal(sparsegpt_score(W, hinv), score("sparsegpt", W, st, hinv))
    assert not torch.allclose(score("sparsegpt", W, st, hinv), score("wanda", W, st))
    with pytest.raises(HybridPruneError, match="inverse Hessian"):
        score("sparsegpt", W, st)


def test_three_tier_sparsegpt_ranks_by_its_own_score(samples):
    """Block tiers and in-tier masks of three-tier + SparseGPT come from the SparseGPT saliency (recorded as
    such), not from Wanda's score."""
    assert PruneConfig(method="sparsegpt", pattern="three-tier").record()["tier_metric"] == "sparsegpt"
    maps = {}
    for method in ("wanda", "sparsegpt"):
        model = tiny_model("llama")
        res = prune(model, PruneConfig(method=method, pattern="three-tier", nsamples=6, seqlen=24, batch_size=2,
                                       device="cpu", refit=0), samples=samples)
        maps[method] = res.tier_maps
    assert any(not torch.equal(maps["wanda"][k], maps["sparsegpt"][k]) for k in maps["wanda"])


def _sparsegpt_reference(W, H, sparsity, blocksize, group, percdamp=0.01):
    """SparseGPT written out plainly in numpy (float64): column by column, mask chosen at each block start from
    the current weights by w^2 / U_jj^2, error propagated through the upper Cholesky factor U of H^-1."""
    W = W.astype(np.float64).copy()
    rows, cols = W.shape
    H = H.astype(np.float64) + percdamp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    keep = np.ones_like(W, dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        sal = W[:, i1:i2] ** 2 / np.diag(U)[i1:i2] ** 2
        if group == "row":
            k = int(i2 * sparsity) - int(i1 * sparsity)
            for r in range(rows):
                keep[r, i1 + np.argsort(sal[r], kind="stable")[:k]] = False
        else:
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
            flat = np.ones(sal.size, dtype=bool)
            flat[np.argsort(sal.ravel(), kind="stable")[:k]] = False
            keep[:, i1:i2] = flat.reshape(sal.shape)
        for j in range(i1, i2):
            err = W[:, j] * ~keep[:, j] / U[j, j]
            W[:, j:] -= np.outer(err, U[j, j:])
    W[~keep] = 0
    return W, keep


@pytest.mark.parametrize("group", ["matrix", "row"])
def test_sparsegpt_equals_a_plain_numpy_reference(group):
    from hybridprune.pruning.scoring import sparsegpt_prune
    torch.manual_seed(0)
    X = torch.randn(512, 48, dtype=torch.float64) @ torch.randn(48, 48, dtype=torch.float64)
    H = (2 * X.T @ X / 512)
    W = torch.randn(24, 48, dtype=torch.float64)
    ref_W, ref_keep = _sparsegpt_reference(W.numpy(), H.numpy(), 0.5, 16, group)
    out = W.float().clone()
    keep = sparsegpt_prune(out, H.float(), PruneConfig(method="sparsegpt", group=group).build_pattern(), blocksize=16)
    assert (keep.numpy() == ref_keep).mean() > 0.995  # float32 vs float64 may flip a near-tie
    same = keep.numpy() == ref_keep
    rows_same = same.all(1)
    assert rows_same.sum() >= 20
    assert np.allclose(out.numpy()[rows_same], ref_W[rows_same], atol=1e-3, rtol=1e-3)
