"""The packed format and the sparse kernels: bit-exact unpacking, kernels equal to the dense matmul (both
implementations, bit for bit), packed folders through every command, and bad packed input refused."""
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import safetensors_tensors, tiny_model

from hybridprune.cli import main
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning import patterns
from hybridprune.sparse import kernels, packing, routes
from hybridprune.sparse.load import load_model

TIERED = {"kind": "tiered", "block": 16, "n": 2, "m": 4, "k": 15}


def pruned(pattern, N, K, dtype=torch.float32, seed=0, random_tiers=True):
    """A random [N, K] matrix pruned to `pattern` (random tier maps for the tiered one), its layout, tier map."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    tiers = None
    if pattern == "unstructured":
        keep, layout = patterns.unstructured_keep(W.abs(), 0.5), {"kind": "unstructured"}
    elif pattern == "2:4":
        keep, layout = patterns.nm_keep(W.abs(), 2, 4), {"kind": "nm", "n": 2, "m": 4}
    else:
        tp = patterns.TieredBlocks()
        tiers = torch.randint(0, 3, (-(-N // 16), -(-K // 16)), generator=g).to(torch.int8) if random_tiers \
            else tp.keep(W.abs())[1]
        keep, layout = tp.apply_tiers(W.abs(), None, tiers.clone()), dict(TIERED)
    return (W * keep).to(dtype), {**layout, "shape": [N, K]}, tiers


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


SHAPES = [(37, 75), (50, 96), (16, 16), (33, 128), (29, 40), (20, 48)]  # edge blocks, K not a multiple of 16,
# a single block, an odd number of mask bytes per row (40), 2:4 rows of 16 + 8 values (48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_pack_unpack_is_bit_exact(pattern, dtype):
    for N, K in SHAPES:
        if pattern == "2:4" and K % 4:
            continue
        W, layout, tiers = pruned(pattern, N, K, dtype)
        t = packing.pack_matrix(W, layout, "w", tiers)
        back = packing.unpack_matrix(t, layout)
        assert back.dtype == W.dtype and torch.equal(bits(back), bits(W + 0.0))  # -0.0 reads back as +0.0
        # the stored sizes are the ones expected_shapes checks on load
        for field, shape in packing.expected_shapes(layout, t).items():
            assert tuple(t[field].shape) == tuple(shape), field


def test_packed_bytes_match_the_format():
    """fp32 three-tier: per 16x16 block dense 1024 B, 2:4 544 B, top-k 75 B, plus a byte of tier map."""
    W, layout, tiers = pruned("three-tier", 64, 64, random_tiers=False)
    t = packing.pack_matrix(W, layout, "w", tiers)
    counts = [int((tiers == i).sum()) for i in range(3)]
    assert packing.packed_bytes(t) == 1024 * counts[0] + 544 * counts[1] + 75 * counts[2] + tiers.numel()
    W, layout, _ = pruned("2:4", 64, 64)
    assert packing.packed_bytes(packing.pack_matrix(W, layout, "w")) == 64 * 64 * 4 // 2 + 64 * 64 // 8
    W, layout, _ = pruned("unstructured", 64, 64, dtype=torch.bfloat16)
    assert packing.packed_bytes(packing.pack_matrix(W, layout, "w")) == 64 * 32 * 2 + 64 * 8


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_kernels_equal_dense_matmul(pattern, dtype):
    """Every kernel path (portable, AVX2 and AVX-512 where the CPU has them) and every route it has (the sparse
    kernel, dense strips, AVX-512's packed GEMM) stays within fp32 rounding of a float64 reference, on odd shapes,
    random tier maps, batch 1, 3, 6 (a pass of 4 rows, then 2), 16 and prefill batches (130, 300); the module as
    dispatched gives one of them. The sparse kernel gives the same bits on every path."""
    worst = 0.0
    for N, K in SHAPES:
        if pattern == "2:4" and K % 16:
            continue
        W, layout, tiers = pruned(pattern, N, K, dtype, seed=N)
        m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers))
        assert m.kind == layout["kind"]
        paths = [1] + [2] * kernels.extension().has_avx2() + [3] * kernels.extension().has_avx512()
        for B in (1, 3, 6, 16, 130, 300):
            x = torch.randn(B, K)
            ref = x.double() @ W.double().t()
            outs = {(path, route): m.matmul(x, path, route) for path in paths for route in m.routes(path)}
            for y in outs.values():
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, err)
                assert err < 1e-5, (N, K, B, err)
            sparse = [y for (_, route), y in outs.items() if route == routes.SPARSE]
            assert all(torch.equal(sparse[0], y) for y in sparse[1:]), (N, K, B)
            assert torch.equal(m.matmul(x), outs[(paths[-1], m.route(B, paths[-1]))])
    print(f"{pattern} {dtype}: largest relative error {worst:.2e}")


@pytest.mark.kernels
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_packed_linear_is_a_drop_in_for_nn_linear(pattern):
    """The module's own work around the kernel (3-D input, a bias, bf16 activations, output width not a multiple
    of 16, the buffers read straight from the module, a module moved with .to()) gives nn.Linear's output."""
    N, K = (37, 80) if pattern != "2:4" else (37, 96)
    W, layout, tiers = pruned(pattern, N, K, seed=3)
    bias = torch.randn(N)
    m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers), bias)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(bias)
        for x in (torch.randn(2, 3, K), torch.randn(1, 1, K), torch.randn(5, K), torch.randn(3, 2, K).transpose(0, 1)):
            y = m(x)
            assert y.shape == x.shape[:-1] + (N,)
            torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
        xb = torch.randn(2, 4, K).to(torch.bfloat16)
        y = m(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), lin(xb.float()), rtol=2e-2, atol=2e-2)
        m.to(torch.float32)  # _apply replaces every buffer: the kernel must read the new ones
        torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
def test_portable_forced_by_environment(monkeypatch):
    W, layout, tiers = pruned("three-tier", 40, 72)
    m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers))
    x = torch.randn(2, 72)
    # one row takes the sparse kernel; at two the route measured fastest here may be the packed GEMM (other sums)
    auto, auto2 = m(x[:1]), m.matmul(x, route=routes.SPARSE)
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "portable")
    assert torch.equal(m(x[:1]), auto)
    assert torch.equal(m.matmul(x, route=routes.SPARSE), auto2)
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "fastest")
    with pytest.raises(HybridPruneError, match="HYBRIDPRUNE_KERNELS"):
        m(x)


@pytest.mark.kernels
def test_uncovered_layouts_compute_unpacked():
    """A 2:4 matrix whose width is not a multiple of 16 stays packed on disk and computes from its unpacked form."""
    W, layout, _ = pruned("2:4", 8, 36)
    m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w"))
    assert m.kind == "unpacked"
    x = torch.randn(3, 36)
    assert torch.allclose(m(x), x @ W.t(), atol=1e-6)


def test_packing_refuses_a_broken_pattern():
    W, layout, _ = pruned("2:4", 8, 32)
    W[3, 4:8] = 1.0  # a group of 4 with 4 kept
    with pytest.raises(HybridPruneError, match="model.layers.0.mlp.up_proj breaks its recorded 2:4"):
        packing.pack_matrix(W, layout, "model.layers.0.mlp.up_proj")
    W, layout, tiers = pruned("three-tier", 32, 32)
    r, c = (tiers == 2).nonzero()[0].tolist()
    W[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 1.0
    with pytest.raises(HybridPruneError, match="w breaks its recorded pattern: a top-k block"):
        packing.pack_matrix(W, layout, "w", tiers)


# ----------------------------------------------------------------------------- folders through the CLI

@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory, default_tokenizer):
    """A tiny Llama (odd widths: 40 and 72) pruned by magnitude three-tier and unstructured, each saved dense
    and packed."""
    root = tmp_path_factory.mktemp("packed")
    model = tiny_model("llama", vocab=len(default_tokenizer), hidden=40, inter=72)
    src = root / "tiny"
    model.save_pretrained(src)
    default_tokenizer.save_pretrained(src)
    out = {}
    for name, args in (("tt", ["--pattern", "three-tier"]), ("u50", ["--pattern", "unstructured"]),
                       ("nm", ["--pattern", "2:4"])):
        assert main(["prune", "--model", str(src), "--method", "magnitude", *args, "--out", str(root / name)]) == 0
        assert main(["pack", str(root / name), "--out", str(root / f"{name}-packed")]) == 0
        out[name] = (root / name, root / f"{name}-packed")
    return out


@pytest.mark.parametrize("name", ["tt", "u50", "nm"])
def test_folder_pack_load_unpack(pruned_folders, name, tmp_path, capsys):
    from hybridprune.io import models
    dense, packed = pruned_folders[name]
    assert not any(Path(packed).glob("model*.safetensors"))
    record = models.read_record(packed)
    assert record["packed"]["format"] == packing.FORMAT and record["packed"]["version"] == packing.VERSION
    assert record["packed"]["packed_bytes"] < record["packed"]["dense_bytes"]
    a, _ = load_model(str(dense))
    b, _ = load_model(str(packed))
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert main(["pack", str(packed), "--unpack", "--out", str(tmp_path / "back")]) == 0
    orig, back = safetensors_tensors(dense), safetensors_tensors(tmp_path / "back")
    assert set(orig) == set(back) and all(torch.equal(bits(orig[k] + 0.0), bits(back[k])) for k in orig)
    # inspect reads the packed folder as the dense one (tiny odd widths put the tiered sparsity off its target
    # through edge blocks, so both report the same violation there)
    assert main(["inspect", str(packed), "--json"]) == main(["inspect", str(dense), "--json"])
    main(["inspect", str(packed)])
    assert f"matrices, 0.1 MB dense -> 0.1 MB ({record['packed']['packed_bytes'] / record['packed']['dense_bytes']:.4f})" \
        in capsys.readouterr().out


@pytest.mark.kernels
def test_kernels_keep_outputs_and_perplexity(pruned_folders, default_tokenizer):
    """Through the kernels: the same greedy generations on 20 prompts as the unpacked model (a divergence must
    be a near tie) and the same log-likelihood to 1e-4 relative."""
    from hybridprune.sparse.kernels import PackedLinear
    tok = default_tokenizer
    prompts = [f"Question {i}: what is {i} plus {2 * i}? Answer:" for i in range(20)]
    for name in ("tt", "u50"):
        dense, packed = pruned_folders[name]
        ref, _ = load_model(str(dense))
        fast, _ = load_model(str(packed), kernels=True)
        assert sum(isinstance(m, PackedLinear) for m in fast.modules()) == 14
        ids = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            la, lb = ref(**ids).logits, fast(**ids).logits
            nll = [torch.nn.functional.cross_entropy(lo[:, :-1].flatten(0, 1), ids["input_ids"][:, 1:].flatten())
                   for lo in (la, lb)]
            assert abs(nll[0] - nll[1]) / nll[0] < 1e-4
            for p in prompts:
                x = tok(p, return_tensors="pt")
                ga = ref.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
                gb = fast.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
                if not torch.equal(ga, gb):  # only a near tie may flip a greedy choice
                    i = int((ga[0] != gb[0]).nonzero()[0])
                    top = torch.topk(ref(ga[:, :i]).logits[0, -1], 2).values
                    assert float(top[0] - top[1]) < 1e-4, (p, float(top[0] - top[1]))


@pytest.mark.kernels
def test_kernels_flag_on_commands(pruned_folders, capsys, data_dir):
    dense, packed = pruned_folders["tt"]
    results = []
    for spec, extra in ((dense, []), (packed, ["--kernels"]), (dense, ["--kernels"])):
        assert main(["ppl", str(spec), "--seqlen", "64", "--max-windows", "2", *extra]) == 0
        results.append(float(capsys.readouterr().out.split("perplexity")[1].split()[0]))
    assert results[0] == pytest.approx(results[1], rel=1e-4) == pytest.approx(results[2], rel=1e-4)


@pytest.mark.kernels
def test_kernels_on_a_dense_model_run_dense(tiny_llama_dir, capsys, data_dir):
    assert main(["ppl", str(tiny_llama_dir), "--seqlen", "64", "--max-windows", "1", "--kernels"]) == 0
    assert "nothing to pack" in capsys.readouterr().err


def test_prune_save_packed(tmp_path, tiny_llama_dir):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "2:4",
                 "--save", "packed", "--out", str(out)]) == 0
    assert packing.is_packed(out) and sorted(os.listdir(tmp_path)) == ["p"]  # no temporary left beside it


# ----------------------------------------------------------------------------- bad packed input

def _refused(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0], err


def test_truncated_packed_file_is_refused(pruned_folders, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(pruned_folders["tt"][1], bad)
    f = bad / packing.PACKED_FILE
    f.write_bytes(f.read_bytes()[:-5000])
    _refused(["ppl", str(bad), "--max-windows", "1", "--seqlen", "64"], capsys, f"{f} is truncated: tensor")


def test_sizes_that_disagree_with_metadata_are_refused(pruned_folders, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(pruned_folders["tt"][1], bad)
    rec = json.loads((bad / "hybridprune.json").read_text())
    key = next(iter(rec["packed"]["matrices"]))
    rec["packed"]["matrices"][key]["shape"][0] += 16
    (bad / "hybridprune.json").write_text(json.dumps(rec))
    _refused(["ppl", str(bad), "--max-windows", "1", "--seqlen", "64"], capsys, f"tensor {key}.tiers is")


def test_pack_refusals(pruned_folders, tiny_llama_dir, tmp_path, capsys):
    _refused(["pack", str(tiny_llama_dir), "--out", str(tmp_path / "x")], capsys, "no hybridprune.json")
    _refused(["pack", str(pruned_folders["tt"][1]), "--out", str(tmp_path / "x")], capsys, "already packed")
    _refused(["pack", str(pruned_folders["tt"][0]), "--unpack", "--out", str(tmp_path / "x")], capsys, "not packed")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(pruned_folders["nm"][0], broken)
    from conftest import edit_tensor
    edit_tensor(broken, "model.layers.1.mlp.down_proj.weight", lambda t: t.__setitem__((0, slice(0, 4)), 1.0))
    _refused(["pack", str(broken), "--out", str(tmp_path / "x")], capsys,
             "model.layers.1.mlp.down_proj breaks its recorded 2:4 pattern")
    assert not (tmp_path / "x").exists()


@pytest.mark.kernels
def test_sparsify_in_memory_after_prune():
    """prune(model, config) then sparsify_(model, config, result): the same logits, pruned modules swapped."""
    from hybridprune import PackedLinear, PruneConfig, sparsify_
    from hybridprune.pruning.engine import prune
    model = tiny_model("llama", hidden=48, inter=96)
    config = PruneConfig(method="magnitude", pattern="three-tier")
    result = prune(model, config)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        assert sparsify_(model, config, result) == 14
        after = model(ids).logits
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)


@pytest.mark.kernels
def test_recipe_eval_kernels(tmp_path):
    """`eval: {kernels: true}` (or experiment --kernels) is part of the eval stages' keys; a non-boolean is refused
    naming the line."""
    from test_experiment import RECIPE

    from hybridprune.experiments import experiment
    text = RECIPE.format(model="m", boolq_limit=4)
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text.replace("eval: {batch_size: 4}", "eval: {batch_size: 4, kernels: true}"))
    keys = [{s.key for s in experiment.plan(experiment.load_recipe(tmp_path / f"{n}.yaml"), tmp_path)[0]
             if s.kind == "eval"} for n in "ab"]
    assert keys[0].isdisjoint(keys[1])
    (tmp_path / "c.yaml").write_text(text.replace("eval: {batch_size: 4}", "eval: {batch_size: 4, kernels: 1}"))
    with pytest.raises(HybridPruneError, match="c.yaml line 17: eval kernels must be true or false, got 1$"):
        experiment.load_recipe(tmp_path / "c.yaml")


def _avx2() -> bool:
    return kernels.toolchain_problem() is None and kernels.extension().has_avx2()


def _avx512() -> bool:
    """Whether this CPU runs the AVX-512 paths (False where the kernels cannot be built: those tests skip anyway)."""
    return kernels.toolchain_problem() is None and kernels.extension().has_avx512()


@pytest.mark.kernels
@pytest.mark.skipif(not _avx2(), reason="the packed GEMM needs AVX2 or AVX-512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_packed_gemm_equals_dense_matmul(pattern, dtype):
    """The large-batch GEMM (PackedLinear.gemm), AVX2 and AVX-512 where the CPU has it: odd shapes with edge blocks,
    batch tiles of 16, 32 and 48 rows and a remainder, within fp32 rounding of a float64 product, and the two
    paths equal bit for bit (the same sums in the same order); the module dispatches to it where it measured
    fastest. 1040 columns span three k-slices of the GEMM (the tiered one takes each slice's blocks from its list)."""
    paths = [2] + [3] * _avx512()
    for N, K in SHAPES + [(130, 256), (40, 1040)]:
        if pattern == "2:4" and K % 16:
            continue
        W, layout, tiers = pruned(pattern, N, K, dtype, seed=N)
        m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers))
        for B in (1, 3, 17, 33, 70):
            x = torch.randn(B, K)
            ys = [m.gemm(x, path) for path in paths]
            assert all(torch.equal(ys[0], y) for y in ys[1:]), (N, K, B)
            if m.route(B) == routes.GEMM:
                assert torch.equal(m(x), ys[-1])
            ref = x.double() @ W.double().t()
            err = ((ys[0].double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, (N, K, B, err)


@pytest.mark.kernels
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_dense_strips_decode_the_exact_weights(pattern, values, monkeypatch):
    """The dense-strips route decodes the matrix a strip at a time into one reused buffer (the tiered one
    transposed): times the identity it gives the unpacked matrix, bit for bit, on every path, over several strips
    and a short last one (STRIP 32), odd widths and edge blocks included; int8 values come out times their row's
    scale, as unpacking gives them."""
    monkeypatch.setattr(kernels, "STRIP", 32)
    paths = [1] + [2] * _avx2() + [3] * _avx512()
    for N, K in [(100, 80), (37, 96), (130, 48), (16, 16), (29, 40)]:
        if pattern == "2:4" and K % 16:
            continue
        W, layout, tiers = pruned(pattern, N, K, torch.bfloat16 if values == "bfloat16" else torch.float32, seed=N)
        t = packing.pack_matrix(W, layout, "w", tiers)
        if values == "int8":
            layout, t = packing.quantize(t, layout)
        m = kernels.PackedLinear(layout, t)
        ref = packing.unpack_matrix(t, layout).float().t()
        for path in paths:
            y = m.matmul(torch.eye(K), path, routes.STRIPS)
            assert torch.equal(y, ref), (N, K, path, (y - ref).abs().max().item())


# ----------------------------------------------------------------------------- checksums and layouts checked on load

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_record(folder, edit):
    rec = json.loads((folder / "hybridprune.json").read_text())
    edit(rec)
    (folder / "hybridprune.json").write_text(json.dumps(rec))


def test_every_packed_tensor_has_a_checksum(pruned_folders):
    from safetensors.torch import load_file
    packed = pruned_folders["tt"][1]
    rec = json.loads((packed / "hybridprune.json").read_text())["packed"]
    tensors = load_file(str(packed / packing.PACKED_FILE))
    assert rec["version"] == 2 and rec["checksum"] == "crc32"
    assert rec["checksums"] == {k: packing.checksum(v) for k, v in tensors.items()}


def test_flipped_bytes_of_the_same_size_are_refused(pruned_folders, tmp_path, capsys):
    bad = _copy(pruned_folders["tt"][1], tmp_path / "bad")
    f = bad / packing.PACKED_FILE
    raw = bytearray(f.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    f.write_bytes(bytes(raw))
    _refused(["ppl", str(bad), "--max-windows", "1", "--seqlen", "64"], capsys, "does not match its checksum")


def test_a_version_1_folder_loads_and_says_it_has_no_checksums(pruned_folders, tmp_path, caplog):
    old = _copy(pruned_folders["u50"][1], tmp_path / "v1")

    def as_v1(rec):
        rec["packed"]["version"] = 1
        del rec["packed"]["checksums"], rec["packed"]["checksum"]
    _edit_record(old, as_v1)
    with caplog.at_level("WARNING", logger="hybridprune"):
        model, _ = load_model(str(old))
    assert "carries no checksums" in caplog.text
    ref, _ = load_model(str(pruned_folders["u50"][0]))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("edit,match", [
    (lambda rec: rec["packed"].update(version="1.0"), "version '1.0'"),
    (lambda rec: rec["packed"].update(version=4), "version 4"),
    (lambda rec: next(iter(rec["packed"]["matrices"].values())).update(n=1, m=2), "says n:m 1:2"),
    (lambda rec: next(iter(rec["packed"]["matrices"].values())).update(kind="sparse"), "kind 'sparse'"),
    (lambda rec: next(iter(rec["packed"]["matrices"].values())).update(transposed=True), "transposed"),
    (lambda rec: next(iter(rec["packed"]["matrices"].values())).update(dtype="int4"), "dtype 'int4'"),
    (lambda rec: rec["packed"]["checksums"].popitem(), "does not match its checksum"),
])
def test_layouts_that_contradict_the_tensors_or_the_pattern_are_refused(pruned_folders, tmp_path, capsys, edit,
                                                                       match):
    """Fields of hybridprune.json's packed entry are checked before the weights are used: a flipped `transposed`
    on a square matrix (q_proj is 40 x 40) would otherwise load the matrix the wrong way round."""
    bad = _copy(pruned_folders["tt"][1], tmp_path / "bad")
    _edit_record(bad, edit)
    _refused(["ppl", str(bad), "--max-windows", "1", "--seqlen", "64"], capsys, match)


def test_corrupt_packed_header_is_one_line(pruned_folders, tmp_path, capsys):
    bad = _copy(pruned_folders["tt"][1], tmp_path / "bad")
    f = bad / packing.PACKED_FILE
    raw = bytearray(f.read_bytes())
    raw[8:24] = b"\xff" * 16  # inside the JSON header
    f.write_bytes(bytes(raw))
    _refused(["ppl", str(bad), "--max-windows", "1", "--seqlen", "64"], capsys, "corrupt header")


def test_kernel_path_is_checked_once_per_value_and_a_bad_value_is_always_refused(monkeypatch):
    """kernels.impl() caches each HYBRIDPRUNE_KERNELS value it has checked; a bad value is never cached."""
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "portable")
    assert kernels.impl() == kernels.IMPLS["portable"] == kernels.impl("portable")
    for _ in range(2):
        with pytest.raises(HybridPruneError, match="not a kernel path"):
            kernels.impl("bogus")
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "auto")
    assert kernels.impl() == kernels.IMPLS["auto"]
