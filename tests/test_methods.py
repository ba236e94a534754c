"""RIA and OWL against plain transcriptions of their papers' rules (numpy / plain torch hooks, no code shared with
the implementation)."""
import numpy as np
import pytest
import torch
from conftest import tiny_model

from hybridprune import PruneConfig, load_model
from hybridprune.core.errors import HybridPruneError
from hybridprune.io.models import find_decoder_layers, find_linears, weight_matrix
from hybridprune.pruning.engine import prune
from hybridprune.pruning.layerwise import owl_sparsities


def cfg(**kw):
    return PruneConfig(**{**dict(nsamples=6, seqlen=24, batch_size=2, device="cpu"), **kw})


def dense_inputs(model, samples):
    """Every linear's input rows in the dense model, by plain forward hooks: {(layer, name): [tokens, in]}."""
    _, layers = find_decoder_layers(model)
    seen, handles = {}, []
    for i, layer in enumerate(layers):
        for name, mod in find_linears(layer).items():
            def hook(m, args, key=(i, name)):
                seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(samples)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in seen.items()}


def test_ria_mask_equals_the_papers_rule(samples):
    model, dense = tiny_model("llama"), tiny_model("llama")
    X = dense_inputs(dense, samples)
    prune(model, cfg(method="ria", sparsity=0.5), samples=samples)
    layer0 = find_linears(find_decoder_layers(model)[1][0])
    for name, mod in find_linears(find_decoder_layers(dense)[1][0]).items():  # layer 0 saw the dense inputs
        W = np.abs(weight_matrix(mod).detach().double().numpy())
        norm = np.sqrt((X[(0, name)] ** 2).sum(0))
        metric = (W / W.sum(1, keepdims=True) + W / W.sum(0, keepdims=True)) * norm ** 0.5
        k = int(W.shape[1] * 0.5)
        expect = np.ones_like(W, dtype=bool)
        np.put_along_axis(expect, np.argsort(metric, 1, kind="stable")[:, :k], False, 1)
        got = (weight_matrix(layer0[name]) != 0).numpy()
        assert (got == expect).all(), f"{name}: {(got != expect).sum()} weights differ"


def test_ria_works_with_every_pattern(samples):
    for pattern in ("2:4", "three-tier"):
        m = tiny_model("llama")
        prune(m, cfg(method="ria", pattern=pattern, refit=0), samples=samples)
        W = weight_matrix(find_linears(find_decoder_layers(m)[1][1])["mlp.down_proj"])
        assert 0.3 < float((W == 0).float().mean()) < 0.6


def ria_permutation_reference(S, n, m, lsa):
    """RIA's channel permutation as its reference code describes it, in numpy: columns sorted by summed score, M
    slices dealt to positions q, q+M, ... (odd slices reversed); then per group position c, the columns at c are
    assigned to groups by linear_sum_assignment on the kept score of every (column, group) pairing, counted
    directly (sort each row of the would-be group and add its n largest)."""
    from scipy.optimize import linear_sum_assignment
    cols = S.shape[1]
    order = np.argsort(S.sum(0), kind="stable")
    index = np.empty(cols, dtype=np.int64)
    for q in range(m):
        part = order[q * cols // m:(q + 1) * cols // m]
        index[q::m] = part[::-1] if q % 2 else part
    G = cols // m
    for c in range(m if lsa else 0):
        P = S[:, index]
        value = np.zeros((G, G))
        for h in range(G):
            for g in range(G):
                members = [g * m + j for j in range(m) if j != c] + [h * m + c]
                value[h, g] = np.sort(P[:, members], axis=1)[:, -n:].sum()
        src, dst = linear_sum_assignment(value, maximize=True)
        new = index.copy()
        new[dst * m + c] = index[src * m + c]
        index = new
    return index


@pytest.mark.parametrize("how", ["reallocation", "lsa"])
def test_ria_channel_permutation_equals_the_reference_rule(samples, how):
    """Layer 0 (dense inputs): the saved column order equals the transcription and the mask is 2:4 in that order.
    (The heuristic alone can keep less than the original order, as in the reference code, which keeps it anyway.)"""
    model, dense = tiny_model("llama"), tiny_model("llama")
    X = dense_inputs(dense, samples)
    result = prune(model, cfg(method="ria", pattern="2:4", channel_permutation=how), samples=samples)
    layer0 = find_linears(find_decoder_layers(model)[1][0])
    for name, mod in find_linears(find_decoder_layers(dense)[1][0]).items():
        W = np.abs(weight_matrix(mod).detach().double().numpy())
        norm = np.sqrt((X[(0, name)] ** 2).sum(0))
        metric = (W / W.sum(1, keepdims=True) + W / W.sum(0, keepdims=True)) * norm ** 0.5
        index = ria_permutation_reference(metric, 2, 4, how == "lsa")
        got_index = result.permutations[f"model.layers.0.{name}"].numpy()
        assert (got_index == index).all(), f"{name}: {(got_index != index).sum()} positions differ"
        P = metric[:, index]
        expect = np.zeros_like(P, dtype=bool)
        np.put_along_axis(expect, np.argsort(P.reshape(P.shape[0], -1, 4), 2)[:, :, 2:].reshape(P.shape[0], -1) +
                          np.repeat(np.arange(0, P.shape[1], 4), 2)[None, :], True, 1)
        got = (weight_matrix(layer0[name]) != 0).numpy()[:, index]
        assert (got == expect).all(), f"{name}: {(got != expect).sum()} weights differ"
    assert set(result.permutations) == {f"model.layers.{i}.{n}" for i in range(2) for n in layer0}


def retained(score, index, n, m):
    """Total score an N:M mask keeps when the columns are taken in the order `index`."""
    return float(score[:, index].reshape(score.shape[0], -1, m).topk(n, dim=-1).values.sum())


def test_lsa_never_loses_kept_score_and_stays_inside_its_slices(monkeypatch):
    """Each assignment round keeps at least what the order before it kept (keeping the columns in place is one
    of its choices); with slices of 16 columns no column leaves its slice."""
    from hybridprune.pruning import patterns
    g = torch.Generator().manual_seed(3)
    S = torch.rand(40, 64, generator=g) ** 3
    heuristic = patterns.reallocate_channels(S, 4)
    full = patterns.permute_channels(S, 2, 4, lsa=True)
    assert retained(S, full, 2, 4) >= retained(S, heuristic, 2, 4) - 1e-6
    assert sorted(full.tolist()) == list(range(64))
    monkeypatch.setattr(patterns, "LSA_COLUMNS", 16)
    sliced = patterns.permute_channels(S, 2, 4, lsa=True)
    for s in range(0, 64, 16):
        assert set(sliced[s:s + 16].tolist()) == set(heuristic[s:s + 16].tolist())
    assert retained(S, sliced, 2, 4) >= retained(S, heuristic, 2, 4) - 1e-6


def test_channel_permutation_with_dsnot_swaps_inside_permuted_groups(samples):
    """DSnoT on a permuted 2:4 mask swaps (the masks differ from the unrefined ones) and every group of the saved
    column order still holds 2 of 4."""
    from hybridprune.pruning.patterns import check_nm
    masks = []
    for dsnot in (False, True):
        model = tiny_model("llama")
        result = prune(model, cfg(method="wanda", pattern="2:4", channel_permutation="lsa", dsnot=dsnot,
                                  dsnot_skip=()), samples=samples)
        masks.append({})
        for name, mod in find_linears(find_decoder_layers(model)[1][0]).items():  # the same inputs in both runs
            W = weight_matrix(mod)
            perm = result.permutations[f"model.layers.0.{name}"].long()
            assert check_nm(W[:, perm] != 0, 2, 4) and int((W == 0).sum()) == W.numel() // 2, name
            masks[-1][name] = W != 0
    swapped = sum(int((masks[0][n] != masks[1][n]).sum()) for n in masks[0])
    assert swapped > 0


@pytest.mark.kernels
def test_channel_permutation_saved_inspected_packed_and_computed(tmp_path, samples):
    """The column order travels with the model: inspect checks groups in it (and reports its loss), packing stores
    it, unpacking restores every bit, and the kernels give the unpacked model's logits."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from hybridprune.io.folder import PERMUTATIONS_FILE
    from hybridprune.pruning.engine import save_pruned
    from hybridprune.sparse import kernels, packing
    from hybridprune.sparse.inspect import inspect_folder
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>")
    model = tiny_model("llama")
    config = cfg(method="ria", pattern="2:4", channel_permutation="lsa")
    result = prune(model, config, samples=samples)
    out = tmp_path / "ria24"
    save_pruned(model, tok, out, config, result, source="tiny")
    report = inspect_folder(out)
    assert report["nm_valid"] and not report["violations"], report["violations"]
    W = weight_matrix(find_linears(find_decoder_layers(model)[1][0])["mlp.up_proj"])
    assert not bool(((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all())  # not 2:4 in the original order
    stats = packing.pack_folder(out, tmp_path / "packed", log=lambda *_: None)
    assert stats["matrices"] == 14
    state, packed, layouts = packing.unpacked_state(tmp_path / "packed")
    assert all(layout.get("permuted") for layout in layouts.values())
    for key, mod_w in model.state_dict().items():
        if key in layouts:
            assert torch.equal(state[key], mod_w), key
    fast, _ = load_model(str(tmp_path / "packed"), kernels=True)
    assert sum(isinstance(m, kernels.PackedLinear) and m.permuted for m in fast.modules()) == 14
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    (out / PERMUTATIONS_FILE).unlink()
    report = inspect_folder(out)
    assert not report["nm_valid"] and "no column order" in report["violations"][0]
    with pytest.raises(HybridPruneError, match="has no column order for it: re-prune it"):
        packing.pack_folder(out, tmp_path / "again", log=lambda *_: None)


@pytest.mark.parametrize("kw, match", [
    (dict(pattern="unstructured", channel_permutation="lsa"), "needs an N:M pattern"),
    (dict(method="sparsegpt", pattern="2:4", channel_permutation="lsa"), "SparseGPT picks its mask"),
    (dict(pattern="2:4", channel_permutation="hungarian"), "unknown channel_permutation 'hungarian'"),
])
def test_channel_permutation_bad_input(kw, match):
    with pytest.raises(HybridPruneError, match=match):
        cfg(**kw)


def owl_reference(ratios, sparsity, lam):
    """OWL's reference code, transcribed: min-max onto [0, 2 lambda], minus the mean, plus 1 - s (keep ratios)."""
    r = np.asarray(ratios, dtype=np.float64)
    keep = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    keep = keep - keep.mean() + (1 - sparsity)
    return 1 - keep


def test_owl_sparsities_equal_the_reference_and_average_exactly():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.04]
    got = owl_sparsities(ratios, [100] * 5, 0.7, 0.08)
    assert got == pytest.approx(owl_reference(ratios, 0.7, 0.08).tolist(), abs=1e-12)
    # spread 2 lambda around the mean (the reference code's rule; skewed ratios can leave [s - lambda, s + lambda])
    assert max(got) - min(got) == pytest.approx(0.16) and np.mean(got) == pytest.approx(0.7)
    assert np.argmin(got) == np.argmax(ratios)  # most outliers, lowest sparsity
    sizes = [100, 300, 50, 200, 25]  # unequal layers: the mean over weights, not over layers, is the target
    got = owl_sparsities(ratios, sizes, 0.5, 0.1)
    assert np.dot(got, sizes) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(HybridPruneError, match="at least two decoder layers"):
        owl_sparsities([0.1], [10], 0.5, 0.08)


def _deep_llama(layers=4):
    """A tiny Llama with more than two layers: with two, OWL's min-max rescaling gives s -/+ lambda from the order
    of the ratios alone, and wrong inputs for the second layer could go unnoticed."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    c = tiny_config("llama")
    c.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(c).eval()


def test_owl_end_to_end_on_a_tiny_model(samples):
    dense, model = _deep_llama(), _deep_llama()
    X = dense_inputs(dense, samples)
    _, layers = find_decoder_layers(dense)
    ratios, sizes = [], []
    for i, layer in enumerate(layers):  # Wanda scores of the dense model, all matrices of a layer together
        scores = np.concatenate([(np.abs(weight_matrix(mod).detach().double().numpy())
                                  * np.sqrt((X[(i, n)] ** 2).sum(0))).ravel() for n, mod in find_linears(layer).items()])
        ratios.append((scores > 5 * scores.mean()).mean())
        sizes.append(scores.size)
    expect = owl_reference(ratios, 0.5, 0.08)
    result = prune(model, cfg(sparsity=0.5, layer_sparsity="owl"), samples=samples)
    got = [result.layer_sparsity[str(i)] for i in range(len(layers))]
    assert got == pytest.approx(expect.tolist(), abs=1e-9) and max(got) - min(got) == pytest.approx(0.16)
    assert len(set(np.round(got, 6))) == len(layers) > 2  # the middle layers' values depend on the ratios
    for i, layer in enumerate(find_decoder_layers(model)[1]):
        for name, mod in find_linears(layer).items():
            W = weight_matrix(mod)
            per_row = (W == 0).sum(1)
            assert (per_row == int(W.shape[1] * got[i])).all(), (i, name)  # Wanda's per-row rule at s_l
    total = sum(int((weight_matrix(m) == 0).sum()) for layer in find_decoder_layers(model)[1]
                for m in find_linears(layer).values())
    assert total / sum(sizes) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "ria", "sparsegpt"])
def test_owl_works_with_every_method(method, samples):
    """OWL's ratios come from Wanda's scores for every calibrated method (|W| for magnitude), so RIA and SparseGPT
    get Wanda's per-layer targets; each layer is pruned to its own target."""
    wanda = prune(_deep_llama(), cfg(sparsity=0.5, layer_sparsity="owl"), samples=samples).layer_sparsity
    model = _deep_llama()
    got = prune(model, cfg(method=method, sparsity=0.5, layer_sparsity="owl"), samples=samples).layer_sparsity
    if method == "magnitude":
        assert got != wanda
    else:
        assert got == pytest.approx(wanda, abs=1e-12)
    for i, layer in enumerate(find_decoder_layers(model)[1]):
        for name, mod in find_linears(layer).items():  # to within a row's rounding (64 or 128 inputs here)
            W = weight_matrix(mod)
            assert abs(float((W == 0).float().mean()) - got[str(i)]) <= 1 / W.shape[1], (method, i, name)


def test_inspect_checks_each_layer_against_its_owl_target(samples, tmp_path):
    from conftest import tiny_tokenizer

    from hybridprune.pruning.engine import save_pruned
    from hybridprune.sparse.inspect import inspect_folder
    model = tiny_model("llama")
    config = cfg(sparsity=0.5, layer_sparsity="owl")
    result = prune(model, config, samples=samples)
    save_pruned(model, tiny_tokenizer(False), tmp_path / "m", config, result, source="tiny")
    assert inspect_folder(tmp_path / "m")["violations"] == []
    low = min(result.layer_sparsity, key=result.layer_sparsity.get)  # the layer allowed to keep the most
    mod = find_linears(find_decoder_layers(model)[1][int(low)])["mlp.up_proj"]
    mod.weight.data[mod.weight.data == 0] = 1.0  # regrow its zeros: now below even its own target
    save_pruned(model, tiny_tokenizer(False), tmp_path / "m", config, result, source="tiny", overwrite=True)
    assert any("up_proj: sparsity" in v for v in inspect_folder(tmp_path / "m")["violations"])


def test_owl_shifts_tiers_of_block_patterns(samples, tmp_path):
    from hybridprune.pruning.engine import save_pruned
    from hybridprune.sparse.inspect import inspect_folder
    model = tiny_model("llama")
    config = cfg(pattern="three-tier", layer_sparsity="owl", refit=0)
    result = prune(model, config, samples=samples)
    s = list(result.layer_sparsity.values())
    assert np.mean(s) == pytest.approx(config.build_pattern().expected_sparsity, abs=1e-9) and s[0] != s[1]
    tiers = result.tier_maps
    dense_share = [float(np.mean([(t == 0).float().mean() for n, t in tiers.items() if f".{i}." in n])) for i in (0, 1)]
    assert (dense_share[0] > dense_share[1]) == (s[0] < s[1])  # the lower-sparsity layer has more dense blocks
    from conftest import tiny_tokenizer
    save_pruned(model, tiny_tokenizer(False), tmp_path / "m", config, result, source="tiny")
    assert inspect_folder(tmp_path / "m")["violations"] == []


@pytest.mark.parametrize("kw,match", [
    (dict(pattern="2:4", layer_sparsity="owl"), "N:M fixes every layer"),
    (dict(layer_sparsity="owl", owl_lambda=0.6), "--owl-lambda must be within"),
    (dict(layer_sparsity="owl", sparsity=0.95, owl_lambda=0.06), "leaves no weights"),
    (dict(layer_sparsity="owl", owl_m=0), "--owl-m must be > 0"),
    (dict(layer_sparsity="owls"), "unknown layer_sparsity"),
    (dict(pattern="three-tier", tier_scope="model", layer_sparsity="owl"), "--tier-scope model"),
    (dict(method="rya"), "unknown method 'rya'"),
])
def test_bad_method_options(kw, match):
    kw = {("scope" if k == "tier_scope" else k): v for k, v in kw.items()}
    with pytest.raises(HybridPruneError, match=match):
        cfg(**kw)


def test_owl_needs_two_layers(samples):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM
    c = tiny_config("llama")
    c.num_hidden_layers = 1
    torch.manual_seed(0)
    with pytest.raises(HybridPruneError, match="nothing to redistribute|at least two decoder layers"):
        prune(AutoModelForCausalLM.from_config(c).eval(), cfg(layer_sparsity="owl"), samples=samples)


# ----------------------------------------------------------------------------- DSnoT

def dsnot_reference(W, mu, var, initial, keep, m=None, cycles=50, thr=0.1, same_sign=False):
    """DSnoT's rule row by row in plain Python: grow the pruned weight of the error's sign with the largest
    |W mu| / var, prune the kept weight of the opposite sign with the lowest initial score (N:M: the kept weight of
    the grown weight's group with the lowest score), stop once |error| <= thr, and with N:M groups also at the first
    swap that would flip the error's sign (the reference code's unstructured branch runs without that check;
    same_sign adds it there, our --dsnot-same-sign)."""
    keep = keep.copy()
    for i in range(W.shape[0]):
        D = W[i] * mu
        key = D / var
        err = D[~keep[i]].sum()
        s0 = np.sign(err)
        pruned = np.flatnonzero(~keep[i])
        grow_pos = sorted([j for j in pruned if D[j] > 0], key=lambda j: -key[j])
        grow_neg = sorted([j for j in pruned if D[j] < 0], key=lambda j: key[j])
        kept = np.flatnonzero(keep[i])
        prune_pos = sorted([j for j in kept if D[j] > 0], key=lambda j: initial[i, j])
        prune_neg = sorted([j for j in kept if D[j] < 0], key=lambda j: initial[i, j])
        movable = set(kept.tolist())
        for _ in range(cycles):
            grow = grow_pos if err > 0 else grow_neg
            if not grow:
                break
            g = grow.pop(0)
            if m is None:
                prune = prune_pos if err < 0 else prune_neg
                if not prune:
                    break
                p = prune.pop(0)
            else:
                group = [j for j in range(g - g % m, g - g % m + m) if j in movable]
                if not group:
                    continue
                p = min(group, key=lambda j: initial[i, j])
            after = err + D[p] - D[g]
            if abs(err) <= thr or ((m is not None or same_sign) and np.sign(after) != s0):
                break
            keep[i, p], keep[i, g] = False, True
            movable.discard(p)
            err = after
    return keep


@pytest.mark.parametrize("nm,same_sign", [(None, False), (None, True), (4, False)])
def test_dsnot_equals_the_reference_rule(nm, same_sign):
    from hybridprune.pruning.dsnot import nm_groups, refine
    rng = np.random.default_rng(0)
    W, mu, var = rng.normal(size=(12, 64)), rng.normal(size=64) * 3, rng.uniform(0.5, 2, size=64)
    initial = np.abs(W) * rng.uniform(0.5, 2, size=64)
    keep = np.ones_like(W, dtype=bool)
    if nm is None:
        np.put_along_axis(keep, np.argsort(initial, 1, kind="stable")[:, :38], False, 1)  # 60%
    else:
        for g in range(0, 64, 4):
            np.put_along_axis(keep[:, g:g + 4], np.argsort(initial[:, g:g + 4], 1)[:, :2], False, 1)
    expect = dsnot_reference(W, mu, var, initial, keep, m=nm, same_sign=same_sign)
    t = torch.from_numpy
    got = refine(t(W), t(keep), t(mu), t(var), t(initial), None if nm is None else nm_groups(W.shape, nm),
                 same_sign=same_sign or None).numpy()
    assert (got != keep).any() and (got == expect).all(), f"{(got != expect).sum()} weights differ"
    assert (got.sum(1) == keep.sum(1)).all()  # every swap is one out, one in: exact per row
    err = lambda k: np.abs(((W * mu) * ~k).sum(1))
    assert err(got).mean() < err(keep).mean()  # the expected reconstruction error shrinks


def test_dsnot_input_moments_are_per_sequence_sums_and_variances():
    """DSnoT's statistics as its reference keeps them: the sum of each input over a sequence's tokens and the variance
    within the sequence, both averaged over sequences, whatever the micro-batch. The inputs sit far from zero so
    that a one-pass E[x^2] - E[x]^2 in float32 would lose the variance."""
    from hybridprune.pruning.scoring import InputStats
    rng = np.random.default_rng(0)
    x = 300 + rng.normal(size=(3, 50, 6)) * rng.uniform(0.01, 2, size=6)
    st = InputStats(6, "cpu", hessian=False, moments=True)
    st.add(torch.from_numpy(x[:2]).float())  # a micro-batch of two sequences, then one
    st.add(torch.from_numpy(x[2]).float())
    assert st.sequences == 3
    np.testing.assert_allclose((st.sum / 3).numpy(), x.sum(1).mean(0), rtol=1e-6)
    np.testing.assert_allclose((st.var_sum / 3).numpy(), x.var(1).mean(0), rtol=1e-3)


def test_dsnot_on_permuted_groups_equals_the_reference_rule():
    """With a channel permutation the groups are columns perm[4g:4g+4]: the swaps equal the row-by-row rule run on
    the permuted columns, mapped back."""
    from hybridprune.pruning.dsnot import refine_permuted
    rng = np.random.default_rng(1)
    W, mu, var = rng.normal(size=(12, 64)), rng.normal(size=64) * 3, rng.uniform(0.5, 2, size=64)
    initial = np.abs(W) * rng.uniform(0.5, 2, size=64)
    P = perm = rng.permutation(64)
    kept_in_order = np.ones_like(W, dtype=bool)  # a 2:4 mask of the permuted columns
    for g in range(0, 64, 4):
        np.put_along_axis(kept_in_order[:, g:g + 4], np.argsort(initial[:, P][:, g:g + 4], 1)[:, :2], False, 1)
    keep = np.empty_like(kept_in_order)
    keep[:, P] = kept_in_order
    expect = np.empty_like(keep)
    expect[:, P] = dsnot_reference(W[:, P], mu[P], var[P], initial[:, P], keep[:, P], m=4)
    t = torch.from_numpy
    got = refine_permuted(t(W), t(keep), t(mu), t(var), t(initial), t(perm), 4).numpy()
    assert (got != keep).any() and (got == expect).all(), f"{(got != expect).sum()} weights differ"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_dsnot_keeps_sparsity_and_pattern_rules(pattern, samples, tmp_path):
    from conftest import tiny_tokenizer

    from hybridprune.pruning.engine import save_pruned
    from hybridprune.sparse.inspect import inspect_folder
    base = dict(pattern=pattern, sparsity=0.6, refit=0)
    plain, refined = tiny_model("llama"), tiny_model("llama")
    prune(plain, cfg(**base), samples=samples)
    config = cfg(**base, dsnot=True, dsnot_skip=())
    result = prune(refined, config, samples=samples)
    moved = 0  # layer 0 saw the same inputs in both models, so it had the same first mask (and tiers)
    a, b = find_decoder_layers(plain)[1][0], find_decoder_layers(refined)[1][0]
    for name, mod in find_linears(a).items():
        za, zb = weight_matrix(mod) == 0, weight_matrix(find_linears(b)[name]) == 0
        assert torch.equal(za.sum(1), zb.sum(1)), name  # exact, row by row
        moved += int((za != zb).sum())
    assert moved > 0
    save_pruned(refined, tiny_tokenizer(False), tmp_path / "m", config, result, source="tiny")
    assert inspect_folder(tmp_path / "m")["violations"] == []


def test_dsnot_skips_mlp_by_default_like_its_reference(samples):
    plain, refined = tiny_model("llama"), tiny_model("llama")
    prune(plain, cfg(sparsity=0.6), samples=samples)
    prune(refined, cfg(sparsity=0.6, dsnot=True), samples=samples)
    layer_a, layer_b = (find_linears(find_decoder_layers(m)[1][0]) for m in (plain, refined))
    assert torch.equal(weight_matrix(layer_a["mlp.down_proj"]), weight_matrix(layer_b["mlp.down_proj"]))
    assert any(not torch.equal(weight_matrix(layer_a[n]) == 0, weight_matrix(layer_b[n]) == 0)
               for n in layer_a if n.startswith("self_attn"))


def test_dsnot_bad_options():
    with pytest.raises(HybridPruneError, match="dsnot refines a Wanda or RIA mask"):
        cfg(method="sparsegpt", dsnot=True)
    with pytest.raises(HybridPruneError, match="dsnot_cycles"):
        cfg(dsnot=True, dsnot_cycles=0)
    with pytest.raises(HybridPruneError, match="dsnot_threshold"):
        cfg(dsnot=True, dsnot_threshold=float("nan"))


def test_methods_axis_in_recipes(tmp_path):
    from hybridprune.experiments import experiment
    text = """\
model: m
prune: {method: wanda, pattern: unstructured, sparsity: 0.5, nsamples: 2, seqlen: 32}
methods:
  wanda: {}
  ria: {}
  dsnot: {method: wanda, dsnot: true}
  owl: {layer_sparsity: owl}
calibration:
  wiki: wikitext2
  squad: squad
runs:
  - {name: dense}
  - {name: pruned-wiki, calibration: wiki}
  - {name: pruned-squad, calibration: squad}
tasks:
  wikitext2: {windows: 24, seqlen: 16}
claims:
  - pruned-wiki < pruned-squad on wikitext2.ppl
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = experiment.load_recipe(tmp_path / "r.yaml")
    names = [r.name for r in recipe.runs]
    assert names[0] == "dense" and "pruned-wiki@unstructured+ria" in names and len(names) == 9
    assert recipe.patterns["unstructured+ria"]["method"] == "ria"
    assert recipe.patterns["unstructured+owl"] == {**recipe.patterns["unstructured+wanda"], "layer_sparsity": "owl"}
    stages, by_run, pruned = experiment.plan(recipe, tmp_path / "run")
    kinds = [s.kind for s in stages]
    assert kinds.count("prune") == 2 * 4 + 1  # 2 calibrations x 4 methods, one magnitude reference for all
    from hybridprune.experiments.report import _expand
    assert len(_expand(recipe.claims[0], names)) == 4  # the claim is judged per method
    (tmp_path / "r.yaml").write_text(text.replace("owl: {layer_sparsity: owl}", "owl: {layer_sparsity: owls}"))
    with pytest.raises(HybridPruneError, match="line 7: unstructured\\+owl: unknown layer_sparsity"):
        experiment.load_recipe(tmp_path / "r.yaml")
