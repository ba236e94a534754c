"""Intervals and claims (experiments/stats.py): cluster and two-level bootstraps, units a claim needs."""
import numpy as np
import pytest

from hybridprune.experiments import report
from hybridprune.experiments.recipe import CLAIM, Claim
from hybridprune.experiments.stats import MIN_UNITS, paired_bootstrap, seeds_bootstrap


def test_cluster_bootstrap_moves_clusters_together():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    plain = paired_bootstrap(a, b, seed=5)
    # every example twice, each pair one cluster: exactly the plain bootstrap of the originals
    twice = paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2), seed=5, clusters=np.repeat(np.arange(30), 2))
    assert (twice["lo"], twice["hi"], twice["units"], twice["n"]) == (plain["lo"], plain["hi"], 30, 60)
    # resampled one by one, the duplicates look like 60 independent units and the interval is too narrow
    naive = paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2), seed=5)
    assert naive["hi"] - naive["lo"] < 0.8 * (twice["hi"] - twice["lo"])


def test_two_level_bootstrap_covers_the_seed_spread():
    a = [np.full(40, v) for v in (0.1, 0.5, 0.9)]  # each seed's difference is constant: no example noise
    b = [np.zeros(40)] * 3
    per_seed = [paired_bootstrap(x, y) for x, y in zip(a, b)]
    assert all(r["lo"] == r["hi"] for r in per_seed)  # one seed alone: a zero-width interval
    r = seeds_bootstrap(a, b)
    assert r["diff"] == pytest.approx(0.5) and 0.1 <= r["lo"] < 0.5 < r["hi"] <= 0.9 and r["seeds"] == 3
    assert r["per_seed"] == pytest.approx([0.1, 0.5, 0.9])
    with pytest.raises(ValueError):
        seeds_bootstrap(a, b, clusters=[0, 1])


def test_claims_need_enough_units_and_count_seeds():
    pair = {"task": "squad", "metric": "f1", "a": "exp2", "b": "exp1", "diff": 2.0, "lo": 0.5, "hi": 3.5,
            "per_seed": [3.0, 1.0, 2.0], "seed_intervals": [[1.0, 5.0], [-1.0, 3.0], [0.2, 4.0]]}

    def judge(units):
        text = "exp2 > exp1 on squad.f1"
        c = Claim(text, *CLAIM.match(text).groups(), line=1)
        return report._judge(c, [{**pair, "units": units}], ["exp1", "exp2"])["results"][0]
    ok = judge(MIN_UNITS)
    assert ok["status"] == "supported" and (ok["holds_in"], ok["of_seeds"]) == (2, 3)
    assert ok["per_seed_diff"] == [3.0, 1.0, 2.0]
    assert judge(MIN_UNITS - 1)["status"] == "too few to judge"


def test_pair_counts_equal_the_direct_count_for_every_pair():
    import itertools
    import torch
    from hybridprune.experiments.stats import jaccard_counts, pair_counts
    g = torch.Generator().manual_seed(0)
    sets = torch.rand(5, 1000, generator=g) < torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0])[:, None]
    for chunk in (1 << 24, 7):  # one product, and sums over column chunks
        inter, union = pair_counts(sets, chunk=chunk)
        for a, b in itertools.product(range(5), repeat=2):
            assert (int(inter[a, b]), int(union[a, b])) == jaccard_counts(sets[a], sets[b])
