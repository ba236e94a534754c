"""Prefill routes chosen by measurement (sparse/routes.py): the fastest measured route, never a slower one."""
import pytest
import torch

from hybridprune.pruning import patterns
from hybridprune.sparse import kernels, packing, routes

SPARSE, GEMM, STRIPS = routes.SPARSE, routes.GEMM, routes.STRIPS


def test_choose_hand_checked():
    entry = {"buckets": [2, 4, 8], "choice": [SPARSE, GEMM, STRIPS]}
    assert [routes.choose(entry, r) for r in (1, 2, 3, 4, 7, 8, 9, 10_000)] == \
        [SPARSE, SPARSE, SPARSE, GEMM, GEMM, STRIPS, STRIPS, STRIPS]


def test_measure_takes_the_fastest_and_stops_timing_a_route_far_behind(monkeypatch):
    """A fake clock: each call costs what `cost` says. The sparse kernel's cost grows with rows, the GEMM has a
    fixed overhead, strips a larger one; the sparse kernel is no longer timed once over GIVE_UP x the best."""
    cost = {SPARSE: lambda b: 1.0 * b, GEMM: lambda b: 6.0 + 0.25 * b, STRIPS: lambda b: 24.0 + 0.1875 * b}  # exact in binary
    clock = {"t": 0.0}
    calls = []

    def run(route, x):
        calls.append((route, x.shape[0]))
        clock["t"] += cost[route](x.shape[0])
    monkeypatch.setattr(routes.time, "perf_counter", lambda: clock["t"])
    entry = routes.measure(run, [SPARSE, GEMM, STRIPS], in_features=8)
    assert entry["buckets"] == list(routes.BUCKETS)
    for i, b in enumerate(entry["buckets"]):
        timed = {r: s[i] for r, s in entry["seconds"].items() if s[i] is not None}
        assert timed == {r: cost[r](b) for r in timed}
        assert entry["choice"][i] == min(timed, key=timed.get)
    # by hand: sparse at 2 and 4 (2 < 6.5, 4 < 7), a tie at 8 (8 = 6 + 2) goes to the first listed, the GEMM
    # from 16 (10 < 16), strips at 512 (24 + 96 < 6 + 128)
    assert entry["choice"] == [SPARSE] * 3 + [GEMM] * 5 + [STRIPS]
    # the slower routes are timed at every bucket; the sparse kernel, 32 > 2 x 14 at 32 rows, no further
    assert entry["seconds"][STRIPS][0] == 24.375 and None not in entry["seconds"][GEMM]
    assert max(b for r, b in calls if r == SPARSE) == 32
    assert entry["seconds"][SPARSE][5:] == [None] * (len(routes.BUCKETS) - 5)


@pytest.mark.kernels
@pytest.mark.parametrize("kind", ["unstructured", "2:4", "three-tier"])
def test_a_packed_matrix_never_takes_a_route_it_measured_slower(kind, tmp_path, monkeypatch):
    """Real measurements on a 272 x 512 matrix: at every row count from 1 to 600 the module takes the route its own
    table measured fastest at that bucket; the table is kept in routes.json, and read back instead of measured."""
    torch.manual_seed(0)
    W = torch.randn(272, 512)
    if kind == "unstructured":
        keep, layout, tiers = patterns.unstructured_keep(W.abs(), 0.5), {"kind": "unstructured"}, None
    elif kind == "2:4":
        keep, layout, tiers = patterns.nm_keep(W.abs(), 2, 4), {"kind": "nm", "n": 2, "m": 4}, None
    else:
        keep, tiers = patterns.TieredBlocks().keep(W.abs())
        layout = {"kind": "tiered", "block": 16, "n": 2, "m": 4, "k": 15}
    layout["shape"] = [272, 512]
    m = kernels.PackedLinear(layout, packing.pack_matrix(W * keep, layout, "w", tiers))
    kernels.extension()
    monkeypatch.setitem(kernels._TABLES, "packed", routes.RouteTable(tmp_path / "routes.json"))
    monkeypatch.setattr(kernels, "_ENTRIES", {})
    entry = m.route_table()
    assert set(entry["seconds"]) == set(m.routes())
    for rows in range(1, 601):
        chosen = m.route(rows)
        if rows < routes.BUCKETS[0]:
            assert chosen == SPARSE
            continue
        i = max(j for j, b in enumerate(entry["buckets"]) if b <= rows)
        timed = {r: s[i] for r, s in entry["seconds"].items() if s[i] is not None}
        assert chosen in timed and timed[chosen] == min(timed.values()), (rows, chosen, timed)
    # kept on disk: a new process reads it instead of measuring
    monkeypatch.setattr(kernels, "_ENTRIES", {})
    monkeypatch.setitem(kernels._TABLES, "packed", routes.RouteTable(tmp_path / "routes.json"))
    monkeypatch.setattr(kernels.PackedLinear, "_measure_routes", lambda *a: pytest.fail("measured again"))
    assert m.route_table() == entry
