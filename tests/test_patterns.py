import pytest
import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.patterns import (
    DENSE,
    NM_TIER,
    TOPK_TIER,
    TieredBlocks,
    Unstructured,
    assign_tiers,
    block_pattern,
    block_scores,
    block_topk_pattern,
    check_nm,
    expand_tiers,
    lowest_k,
    make_pattern,
    nm_keep,
    tier_counts,
    to_blocks,
)


def test_lowest_k_exact_with_ties():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0]])
    m = lowest_k(s, 3)
    assert m.sum() == 3 and m[0, 4]
    assert m.tolist() == [[True, True, False, False, True, False]]  # ties go to the lower index


@pytest.mark.parametrize("shape,s", [((7, 10), 0.5), ((16, 33), 0.3), ((5, 8), 0.0), ((3, 9), 0.9)])
def test_unstructured_row_and_matrix_exact(shape, s):
    score = torch.rand(shape)
    keep = Unstructured(s).keep(score)[0]
    assert ((~keep).sum(1) == int(shape[1] * s)).all()
    # the pruned ones are the lowest of their row
    for r in range(shape[0]):
        if (~keep[r]).any() and keep[r].any():
            assert score[r][~keep[r]].max() <= score[r][keep[r]].min()
    keep_m = Unstructured(s, group="matrix").keep(score)[0]
    assert int((~keep_m).sum()) == int(score.numel() * s)


def test_nm_valid_and_best():
    score = torch.rand(8, 16)
    keep = nm_keep(score, 2, 4)
    groups = keep.reshape(8, 4, 4)
    assert (groups.sum(-1) == 2).all()
    g = score.reshape(8, 4, 4)
    kept_min = torch.where(groups, g, torch.inf).min(-1).values
    pruned_max = torch.where(~groups, g, -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()
    assert check_nm(keep, 2, 4) and not check_nm(torch.ones(2, 8, dtype=torch.bool), 2, 4)


def test_nm_pattern_rejects_bad_shape():
    with pytest.raises(HybridPruneError, match="groups of 4"):
        make_pattern("2:4").keep(torch.rand(4, 10))
    with pytest.raises(HybridPruneError):
        make_pattern("4:2")


def test_block_scores_edge_blocks_use_real_weights():
    score = torch.ones(20, 18)
    bs = block_scores(score, 16)
    assert bs.shape == (2, 2) and torch.allclose(bs, torch.ones(2, 2))


def test_tier_counts_add_up():
    for n in (1, 7, 100, 2304):
        assert sum(tier_counts(n, (0.35, 0.45, 0.20))) == n
    assert tier_counts(100, (0.35, 0.45, 0.20)) == (35, 45, 20)


def _check_three_tier(W_score, pattern):
    rows, cols = W_score.shape
    keep, tiers = pattern.keep(W_score)
    b = pattern.block_size
    full = expand_tiers(tiers, rows, cols, b)
    assert keep[full == DENSE].all()  # tier 1 untouched
    assert check_nm(keep & (full == NM_TIER), pattern.n, pattern.m)  # tier 2 valid N:M
    per_block = to_blocks(keep.float(), b).sum(-1)
    real = to_blocks(torch.ones(rows, cols), b).sum(-1)
    want = torch.clamp(real, max=pattern.topk)
    assert torch.equal(per_block[tiers == TOPK_TIER], want[tiers == TOPK_TIER])  # exactly k (or all it has)
    # ranking: every top-k block scores no higher than every N:M block, which scores no higher than dense
    bs = block_scores(W_score, b)
    if (tiers == TOPK_TIER).any() and (tiers == NM_TIER).any():
        assert bs[tiers == TOPK_TIER].max() <= bs[tiers == NM_TIER].min()
    if (tiers == NM_TIER).any() and (tiers == DENSE).any():
        assert bs[tiers == NM_TIER].max() <= bs[tiers == DENSE].min()
    return keep, tiers


def test_three_tier_exact_sparsity_on_divisible_shapes():
    torch.manual_seed(0)
    pattern = TieredBlocks()
    score = torch.rand(160, 320)  # 10 x 20 = 200 blocks -> 70 / 90 / 40
    keep, tiers = _check_three_tier(score, pattern)
    assert [int((tiers == t).sum()) for t in range(3)] == [70, 90, 40]
    assert abs(pattern.expected_sparsity - (0.45 * 0.5 + 0.20 * 241 / 256)) < 1e-12  # 41.33%
    assert int((~keep).sum()) == 90 * 128 + 40 * 241  # exactly the theoretical figure


@pytest.mark.parametrize("shape", [(37, 50), (16, 17), (5, 3), (33, 64)])
def test_three_tier_edge_shapes(shape):
    torch.manual_seed(1)
    _check_three_tier(torch.rand(shape), TieredBlocks())


def test_three_tier_inner_metric_differs_from_ranking():
    torch.manual_seed(2)
    rank, inner = torch.rand(32, 32), torch.rand(32, 32)
    keep, tiers = TieredBlocks().keep(rank, inner)
    full = expand_tiers(tiers, 32, 32, 16)
    assert torch.equal(keep[full == NM_TIER], nm_keep(inner, 2, 4)[full == NM_TIER])


def test_assign_tiers_never_moves_up():
    torch.manual_seed(0)
    scores = torch.rand(50)
    floor = torch.zeros(50, dtype=torch.int8)
    floor[:10] = TOPK_TIER
    floor[10:20] = NM_TIER
    scores[:20] = 10.0  # they would rank top if they were free
    t = assign_tiers(scores, (30, 10, 10), floor)
    assert (t >= floor).all()
    assert int((t == TOPK_TIER).sum()) == 10 and int((t == NM_TIER).sum()) == 10


def test_row_block_score_ranks_blocks_within_their_rows():
    torch.manual_seed(4)
    score = torch.rand(64, 64) + 0.5
    row_scale = torch.tensor([100.0] * 16 + [1.0] * 48)[:, None]  # one loud block row
    mean_tiers = TieredBlocks().keep(score * row_scale)[1]
    row_tiers = TieredBlocks(block_score="row").keep(score * row_scale)[1]
    assert (mean_tiers[0] == DENSE).all()  # by raw mean the loud rows take 4 of the 6 dense places
    assert torch.equal(row_tiers, TieredBlocks(block_score="row").keep(score)[1])  # row scale no longer matters
    assert (row_tiers[0] != DENSE).any()
    bs = TieredBlocks(block_score="row").block_scores(score * row_scale)
    assert torch.allclose(bs.mean(1), torch.ones(4), atol=0.05)  # each block row averages about 1


def test_block_and_block_topk():
    torch.manual_seed(0)
    score = torch.rand(64, 64)
    keep, tiers = block_pattern(0.5).keep(score)
    assert int((tiers == TOPK_TIER).sum()) == 8
    assert abs(1 - keep.float().mean().item() - 0.5) < 1e-9
    keep, tiers = block_topk_pattern(0.25, topk=4).keep(score)
    blocks = to_blocks(keep.float(), 16).sum(-1)
    assert (blocks[tiers == TOPK_TIER] == 4).all() and (blocks[tiers == DENSE] == 256).all()


def test_retention_keeps_candidates_dense():
    torch.manual_seed(0)
    score = torch.rand(32, 64)
    score[:16, :16] = torch.tensor([100.0, 100.0, 100.0, 0.01]).repeat(16, 4)  # 2:4 would lose a third
    never = TieredBlocks(tiers=(0.0, 1.0, 0.0), retention=0.0).keep(score)[1]
    assert (never == NM_TIER).all()
    some = TieredBlocks(tiers=(0.0, 1.0, 0.0), retention=0.9).keep(score)[1]
    assert some[0, 0] == DENSE and (some == NM_TIER).sum() < some.numel()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tiers=(0.5, 0.5, 0.5)), "add up to 1"),
    (dict(block_size=18), "multiple of M"),
    (dict(topk=300), "within"),
    (dict(tier_metric="x"), "tier metric"),
    (dict(scope="x"), "tier scope"),
    (dict(block_score="max"), "block score"),
])
def test_bad_tier_configs(kwargs, match):
    with pytest.raises(HybridPruneError, match=match):
        TieredBlocks(**kwargs)


def test_make_pattern_errors():
    with pytest.raises(HybridPruneError, match="unknown pattern"):
        make_pattern("diagonal")
    with pytest.raises(HybridPruneError, match="outside"):
        make_pattern("unstructured", 1.0)


def test_topk_in_blocks_keeps_each_blocks_best():
    from hybridprune.pruning.patterns import topk_in_blocks
    torch.manual_seed(3)
    s = torch.rand(37, 50)
    keep = topk_in_blocks(s, 16, 5)
    for r in range(0, 37, 16):
        for c in range(0, 50, 16):
            blk, kb = s[r:r + 16, c:c + 16], keep[r:r + 16, c:c + 16]
            assert int(kb.sum()) == min(5, blk.numel())
            assert blk[kb].min() >= blk[~kb].max()
    assert topk_in_blocks(torch.zeros(16, 16), 16, 3).reshape(-1).nonzero().numel() == 3  # ties: still exactly k
