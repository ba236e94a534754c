"""int8 packed values (--values int8): one float32 scale per output row, kernels that widen int8 in registers."""
import json

import pytest
import torch
from conftest import tiny_model

from hybridprune.cli import main
from hybridprune.core.errors import HybridPruneError
from hybridprune.sparse import kernels, packing, routes
from hybridprune.sparse.load import load_model
from test_packed import SHAPES, pruned


def quantized(pattern: str):
    """(W, int8 layout, int8 tensors) for each of test_packed's odd shapes the pattern packs."""
    for N, K in SHAPES:
        if pattern == "2:4" and K % 16:
            continue
        W, layout, tiers = pruned(pattern, N, K, seed=N)
        yield (W, *packing.quantize(packing.pack_matrix(W, layout, "w", tiers), layout))


def test_quantize_hand_checked():
    """2:4, row 0 keeps 0.5, -1.27 | 0.01: scale 1.27 / 127 = 0.01, q = 50, -127 | 1, 0; row 1 keeps nothing:
    scale 1."""
    W = torch.tensor([[0.5, -1.27, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0], [0.0] * 8])
    layout = {"kind": "nm", "n": 2, "m": 4, "shape": [2, 8]}
    qlayout, t = packing.quantize(packing.pack_matrix(W, layout, "w"), layout)
    assert (qlayout["values"], qlayout["scale"]) == ("int8", "row")
    assert t["values"].dtype == torch.int8 and t["scale"].dtype == torch.float32
    assert torch.allclose(t["scale"], torch.tensor([0.01, 1.0]))
    assert t["values"].tolist() == [[50, -127, 1, 0], [0, 0, 0, 0]]
    s = t["scale"][0]
    want = torch.tensor([[50 * s, -127 * s, 0, 0, 1 * s, 0, 0, 0], [0.0] * 8])
    assert torch.equal(packing.unpack_matrix(t, qlayout), want)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_quantized_weights_are_within_half_a_step_and_zeros_stay_zero(pattern):
    """Every kept weight reads back within half its row's step (a value scaled by another row's scale would not,
    nor one clamped), the largest of each row exactly, and every pruned weight as 0; shapes and dtypes as the
    loader checks them."""
    for W, qlayout, t in quantized(pattern):
        back = packing.unpack_matrix(t, qlayout)
        step = t["scale"].unsqueeze(1)
        assert ((back - W).abs() <= step / 2 * (1 + 1e-5)).all()
        assert torch.equal(back[W == 0], torch.zeros(int((W == 0).sum())))
        row_max = W.abs().amax(1)
        assert torch.allclose(back.abs().amax(1)[row_max > 0], row_max[row_max > 0], rtol=1e-6)
        for field, shape in packing.expected_shapes(qlayout, t).items():
            assert tuple(t[field].shape) == tuple(shape), field
        for field, dtype in packing.expected_dtypes(qlayout).items():
            assert field not in t or t[field].dtype == dtype, field


@pytest.mark.kernels
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_int8_kernels_equal_the_dequantized_matrix(pattern):
    """Every path (portable, AVX2, AVX-512 where the CPU has them) and every route, on odd shapes and batches 1, 3,
    16 and 130, within fp32 rounding of a float64 product with the unpacked (dequantized) matrix; the sparse
    kernel gives the same bits on every path, and for unstructured with both of AVX-512's 64-column steps."""
    for W, qlayout, t in quantized(pattern):
        N, K = W.shape
        m = kernels.PackedLinear(qlayout, t)
        assert m.scaled and m._buffers["scale"].shape == (N,)
        ref_W = packing.unpack_matrix(t, qlayout).double()
        paths = [1] + [2] * kernels.extension().has_avx2() + [3] * kernels.extension().has_avx512()
        for B in (1, 3, 16, 130):
            x = torch.randn(B, K)
            ref = x.double() @ ref_W.t()
            outs = {(p, r): m.matmul(x, p, r) for p in paths for r in m.routes(p)}
            for key, y in outs.items():
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (N, K, B, key, err)
            sparse = [y for (_, r), y in outs.items() if r == routes.SPARSE]
            if pattern == "unstructured" and 3 in paths:  # both 64-column AVX-512 steps, whichever this CPU takes
                sparse += [forced_int8_step(step, lambda: m.matmul(x, 3, routes.SPARSE)) for step in (1, 2)]
            assert all(torch.equal(sparse[0], y) for y in sparse[1:]), (N, K, B)


def forced_int8_step(step, run):
    """run() with the AVX-512 unstructured int8 kernel's 64-column step forced (1: the permute control computed
    from the mask, 2: vpexpandb, Intel's), then the CPU's own choice restored."""
    ext = kernels.extension()
    before = ext.int8_step(step)
    try:
        return run()
    finally:
        ext.int8_step(before)


GUARDED = """
import ctypes, mmap, sys
import torch
from hybridprune.sparse import kernels, packing
from test_packed import pruned

libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
pages = []


def at_page_end(t):
    \"\"\"A copy of t whose last byte is the last before a page that may not be read.\"\"\"
    n = t.numel() * t.element_size()
    size = (-(-n // mmap.PAGESIZE) + 1) * mmap.PAGESIZE
    buf = mmap.mmap(-1, size)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + size - mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    pages.append(buf)
    raw = (ctypes.c_uint8 * n).from_address(base + size - mmap.PAGESIZE - n)
    out = torch.frombuffer(raw, dtype=torch.uint8).view(t.dtype)
    out.copy_(t.reshape(-1))
    return out


ext = kernels.extension()
paths = [1] + [2] * ext.has_avx2() + [3] * ext.has_avx512()
for N, K in [(64, 512), (37, 200), (9, 64), (40, 24), (33, 40), (17, 16)]:  # short rows: many end near the end
    W, layout, tiers = pruned("unstructured", N, K, seed=N)
    packed = packing.pack_matrix(W, layout, "w", tiers)
    for values in ("float", "int8"):
        lay, t = packing.quantize(packed, layout) if values == "int8" else (layout, packed)
        m = kernels.PackedLinear(lay, t)
        b = m._buffers
        guarded = at_page_end(b["values"])
        for B in (1, 3):
            x = m._padded(torch.randn(B, K))
            for p in paths:
                for step in (1, 2) if p == 3 else (0,):  # AVX-512: both 64-column int8 steps
                    ext.int8_step(step)
                    want = ext.unstructured_mm(x, b["mask"], b["values"], b["rowptr"], p)
                    assert torch.equal(ext.unstructured_mm(x, b["mask"], guarded, b["rowptr"], p), want), (N, K, p)
                ext.int8_step(0)
print("read nothing past the values")
"""


@pytest.mark.kernels
def test_unstructured_kernels_never_read_past_the_values(tmp_path):
    """The unstructured kernels read whole vectors of values where a row's values end far enough from the
    matrix's end, and only what is there near it: with the values ending just before a page that may not be read
    (mprotect), every path (both AVX-512 int8 steps) at batch 1 and 3, float and int8 values, gives the same sums
    and does not crash (run in
    a child process, so that a stray read fails this test rather than the suite)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "read nothing past the values" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_int8_bytes_follow_the_format():
    """Per 16x16 block: dense 256 B, 2:4 128 + 32 B, top-k 15 + 15 B, a tier byte; plus 4 B of scale per row."""
    W, layout, tiers = pruned("three-tier", 64, 64, random_tiers=False)
    qlayout, t = packing.quantize(packing.pack_matrix(W, layout, "w", tiers), layout)
    counts = [int((tiers == i).sum()) for i in range(3)]
    assert packing.packed_bytes(t) == 256 * counts[0] + 160 * counts[1] + 30 * counts[2] + tiers.numel() + 4 * 64
    W, layout, _ = pruned("2:4", 64, 64)
    qlayout, t = packing.quantize(packing.pack_matrix(W, layout, "w"), layout)
    assert packing.packed_bytes(t) == 64 * 32 + 64 * 64 // 8 + 4 * 64


@pytest.fixture(scope="module")
def int8_folders(tmp_path_factory, default_tokenizer):
    """A tiny Llama pruned three-tier and saved packed with int8 values, and the same prune saved dense."""
    root = tmp_path_factory.mktemp("int8")
    model = tiny_model("llama", vocab=len(default_tokenizer), hidden=40, inter=72)
    src = root / "tiny"
    model.save_pretrained(src)
    default_tokenizer.save_pretrained(src)
    args = ["prune", "--model", str(src), "--method", "magnitude", "--pattern", "three-tier"]
    assert main([*args, "--out", str(root / "dense")]) == 0
    assert main([*args, "--save", "packed", "--values", "int8", "--out", str(root / "q")]) == 0
    return root / "dense", root / "q"


@pytest.mark.kernels
def test_int8_folder_loads_dequantized_and_through_the_kernels(int8_folders, default_tokenizer):
    """prune --save packed --values int8: the record says int8; the folder loads as the dequantized weights
    (within half a step of the fp32 prune's), and through the kernels gives that model's log-likelihoods."""
    dense, q = int8_folders
    record = json.loads((q / "hybridprune.json").read_text())
    layouts = record["packed"]["matrices"]
    assert layouts and all(v["values"] == "int8" and v["scale"] == "row" for v in layouts.values())
    assert record["packed"]["version"] == packing.INT8_VERSION  # older readers refuse it rather than misread it
    a, _ = load_model(str(dense))
    b, _ = load_model(str(q))
    c, _ = load_model(str(q), kernels=True)
    _, packed, _ = packing.read_packed(q)
    for key in layouts:
        wa, wb = a.state_dict()[key], b.state_dict()[key]
        step = packed[key]["scale"].unsqueeze(1)
        assert ((wa - wb).abs() <= step / 2 * (1 + 1e-5)).all() and torch.equal(wb[wa == 0], wa[wa == 0])
    ids = default_tokenizer(["The cat sat on the mat because it was warm."], return_tensors="pt")
    with torch.no_grad():
        lb, lc = b(**ids).logits, c(**ids).logits
    assert ((lb - lc).abs().max() / lb.abs().max()).item() < 1e-4


def test_values_int8_needs_packed_and_a_tampered_dtype_is_refused(int8_folders, tmp_path, capsys):
    dense, q = int8_folders
    assert main(["prune", "--model", str(dense), "--values", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "--save packed" in capsys.readouterr().err
    assert main(["pack", str(q), "--unpack", "--values", "int8", "--out", str(tmp_path / "y")]) == 2
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    rec = json.loads((bad / "hybridprune.json").read_text())
    for layout in rec["packed"]["matrices"].values():
        layout.pop("values"), layout.pop("scale")
    (bad / "hybridprune.json").write_text(json.dumps(rec))
    assert main(["ppl", str(bad), "--seqlen", "32", "--max-windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "re-pack" in err


@pytest.mark.kernels
def test_int8_lm_head_computes_with_its_dequantized_rows_and_leaves_the_embedding(int8_folders, default_tokenizer,
                                                                                   tmp_path, capsys):
    """use_kernels(lm_head="int8"): the output layer becomes a PackedLinear with int8 values whose output is the
    float64 product with its dequantized weights (to fp32 rounding); the tied input embedding keeps its fp32
    weights; --lm-head int8 without --kernels is refused before the model loads."""
    import hybridprune as hp
    dense, _ = int8_folders
    pm = hp.load(str(dense))
    embedding = pm.model.get_input_embeddings().weight.detach().clone()
    fp32_head = pm.model.get_output_embeddings().weight.detach().clone()
    hp.use_kernels(pm, lm_head="int8")
    head = pm.model.get_output_embeddings()
    assert isinstance(head, kernels.PackedLinear) and head.scaled and head.values.dtype == torch.int8
    assert torch.equal(pm.model.get_input_embeddings().weight, embedding)
    W = packing.unpack_matrix(dict(head._buffers), head.layout)
    assert ((W - fp32_head).abs() <= head._buffers["scale"].unsqueeze(1) / 2 * (1 + 1e-5)).all()
    ids = default_tokenizer(["A short sentence to score."], return_tensors="pt")
    with torch.no_grad():
        hidden = pm.model.model(**ids).last_hidden_state
        got = pm.model(**ids).logits
    ref = hidden.double() @ W.double().t()
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # the evaluation's memory-bounded head (which sizes its chunks from the vocabulary) takes it as it is
    from hybridprune.evaluation.ppl import perplexity
    res = perplexity(pm.model, ids=ids["input_ids"][0].repeat(4), seqlen=8, progress=False)
    assert res["windows"] == 3 and res["ppl"] > 1
    assert main(["ppl", str(dense), "--lm-head", "int8", "--seqlen", "32", "--max-windows", "1"]) == 2
    assert "--kernels" in capsys.readouterr().err


def test_activations_round_to_int8_per_row_hand_checked():
    """Row [0.5, -1.0, 0.25, 0.0]: max |x| = 1, so q = nearbyint(x * 127) = [64 (63.5, to even), -127, 32, 0] and
    s = 1 / 127; against a 1 x 4 unstructured int8 matrix keeping 2, -3 at columns 0 and 1 (one mask byte, padded
    to 8 columns): y = (2 * 64 + (-3) * (-127)) / 127 * its row scale. An all-zero row gives zeros."""
    ext = kernels.extension()
    W = torch.tensor([[2.0, -3.0, 0.0, 0.0]])
    layout = {"kind": "unstructured", "shape": [1, 4], "dtype": "float32"}
    qlayout, t = packing.quantize(packing.pack_matrix(W, layout, "w"), layout)
    m = kernels.PackedLinear(qlayout, t)
    assert m.use_int8_activations() and m.rowsum.tolist() == [int(t["values"].sum())]
    q = t["values"].tolist()  # the row's int8 values: 3 / 127 per step, so 85 and -127
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for impl in [1] + [3] * ext.has_vnni():
        sums = ext.unstructured_mm_q8(m._padded(x), t["mask"], t["values"], m.rowptr, m.rowsum, impl, 1)
        assert q == [85, -127]
        assert sums[0, 0] == torch.tensor(float(85 * 64 + (-127) * (-127))) * (torch.tensor(1.0) / 127)
        assert sums[1, 0] == 0


def test_int8x2_activations_add_the_rounding_error_rounded_again_hand_checked():
    """int8x2, the row [0.5, -1.0, 0.25, 0.0]: q1 = [64, -127, 32, 0], s1 = 1 / 127 as with int8; its rounding error
    e = x - s1 * q1 = [0.5 - 64 / 127, 0, 0.25 - 32 / 127, 0] (fp32) has max |e| = |e0|, so q2 = [-127, 0, -64
    (-63.5, to even), 0] and s2 = |e0| / 127. Against the matrix keeping 85, -127 at columns 0 and 1:
    y = (85 * 64 + 127 * 127) * s1 + (85 * -127) * s2, both terms in fp32 as the kernel adds them; every path."""
    ext = kernels.extension()
    W = torch.tensor([[2.0, -3.0, 0.0, 0.0]])
    layout = {"kind": "unstructured", "shape": [1, 4], "dtype": "float32"}
    qlayout, t = packing.quantize(packing.pack_matrix(W, layout, "w"), layout)
    m = kernels.PackedLinear(qlayout, t)
    assert m.use_int8_activations("int8x2") and m.activations == "int8x2"
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s1 = torch.tensor(1.0) / 127
    e = x[0] - s1 * torch.tensor([64.0, -127.0, 32.0, 0.0])
    assert e[1] == 0 and e[0].abs() > e[2].abs() and torch.allclose(e[2] / e[0], torch.tensor(0.5))
    s2 = e[0].abs() / 127
    want = torch.tensor(float(85 * 64 + 127 * 127)) * s1 + torch.tensor(float(85 * -127)) * s2
    for impl in [1] + [3] * ext.has_vnni():
        y = ext.unstructured_mm_q8(m._padded(x), t["mask"], t["values"], m.rowptr, m.rowsum, impl, 2)
        assert y.shape == (2, 1) and y[0, 0] == want and y[1, 0] == 0
    assert not m.use_int8_activations("float") and m.activations == "int8x2"
    with pytest.raises(HybridPruneError, match="int8x2"):
        m.use_int8_activations("int4")


@pytest.mark.kernels
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_int8_activation_kernels_sum_exact_int8_products(pattern):
    """With int8 activations every path (portable; AVX-512 VNNI where the CPU has it; 2 runs the portable sums)
    gives the same bits, on odd shapes and batches 1, 3, 16 and 130: the exact integer sum of the rounded x times
    the int8 values, times x's row scale (a float64 reference within fp32 rounding), times the row's weight scale
    in forward."""
    ext = kernels.extension()
    for W, qlayout, t in quantized(pattern):
        N, K = W.shape
        m = kernels.PackedLinear(qlayout, t)
        assert m.use_int8_activations()
        Wq = (packing.unpack_matrix(t, qlayout).double() / m.scale.double().unsqueeze(1)).round()
        assert torch.equal(m.rowsum[:N], Wq.sum(1).to(torch.int32))
        for B in (1, 3, 16, 130):
            x = torch.randn(B, K)
            amax = x.abs().amax(1, keepdim=True).double()
            xq = torch.clamp(torch.round(x.double() * (127 / amax)), -127, 127)
            want = (xq @ Wq.t()) * (amax / 127)
            outs = [m._sparse_kernel(ext, m._padded(x), impl) for impl in [1, 2] + [3] * ext.has_vnni()]
            for y in outs:
                assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-6, (N, K, B)
                assert torch.equal(y, outs[0]), (N, K, B)
            assert torch.equal(m(x), outs[0] * m.scale)  # every row count takes the int8 sparse kernel


@pytest.mark.kernels
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "three-tier"])
def test_int8x2_activations_come_within_fp32_rounding_of_the_dequantized_product(pattern):
    """int8x2 (x and its rounding error, each rounded to int8): on every path the same bits, on odd shapes and
    batches 1, 3, 16 and 130; within 2e-4 (relative to the largest output) of the fp32 product with the dequantized
    matrix, and at least 30 times closer to it than int8 activations."""
    ext = kernels.extension()
    for W, qlayout, t in quantized(pattern):
        N, K = W.shape
        m, m1 = kernels.PackedLinear(qlayout, t), kernels.PackedLinear(qlayout, t)
        assert m.use_int8_activations("int8x2") and m1.use_int8_activations("int8")
        ref_W = packing.unpack_matrix(t, qlayout).double()
        for B in (1, 3, 16, 130):
            x = torch.randn(B, K)
            ref = x.double() @ ref_W.t()
            outs = [m._sparse_kernel(ext, m._padded(x), impl) for impl in [1, 2] + [3] * ext.has_vnni()]
            assert all(torch.equal(y, outs[0]) for y in outs[1:]), (N, K, B)
            y = m(x)
            assert torch.equal(y, outs[0] * m.scale)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            err1 = ((m1(x).double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-4 and err * 30 < err1, (N, K, B, err, err1)


@pytest.mark.kernels
def test_int8_activations_without_vnni_warn_and_name_the_fix(int8_folders, monkeypatch, caplog):
    """Without the VNNI kernels (forced here: HYBRIDPRUNE_KERNELS=portable) int8 activations still compute, with
    the portable integer sums, and a warning says so and names --activations float; where the VNNI path runs
    there is no warning."""
    _, q = int8_folders
    model, _ = load_model(str(q), kernels=True)
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "portable")
    with caplog.at_level("WARNING", logger="hybridprune.sparse.kernels"):
        assert kernels.int8_activations_(model, "int8") > 0
    assert not kernels.vnni() and "--activations float" in caplog.text and "VNNI" in caplog.text
    caplog.clear()
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", "auto")
    with caplog.at_level("WARNING", logger="hybridprune.sparse.kernels"):
        kernels.int8_activations_(model, "int8x2")
    assert ("VNNI" in caplog.text) == (not kernels.extension().has_vnni())


@pytest.mark.kernels
def test_int8_activations_through_the_api_and_their_refusals(int8_folders, default_tokenizer, tmp_path, capsys,
                                                             monkeypatch):
    """use_kernels(values="int8", activations="int8"): every unstructured matrix and the int8 head round their
    inputs, and a packed three-tier int8 folder's tiered matrices and head too; the log-likelihoods stay within 2%
    of the fp32-activation model's; without int8 values (before the model loads), and on the CLI without --kernels,
    it is refused."""
    import hybridprune as hp
    dense, q = int8_folders
    ids = default_tokenizer(["The cat sat on the mat because it was warm."], return_tensors="pt")
    pruned = hp.prune(hp.load(str(dense.parent / "tiny")), method="magnitude", pattern="unstructured",
                      sparsity=0.5)
    pruned.save(tmp_path / "u")
    a = hp.use_kernels(hp.load(str(tmp_path / "u")), values="int8", lm_head="int8")
    b = hp.use_kernels(hp.load(str(tmp_path / "u")), values="int8", lm_head="int8", activations="int8")
    mods = [m for m in b.model.modules() if isinstance(m, kernels.PackedLinear)]
    assert len(mods) == 7 * 2 + 1 and all(m.activations == "int8" for m in mods)  # 2 layers, and the head
    b2 = hp.use_kernels(hp.load(str(tmp_path / "u")), values="int8", lm_head="int8", activations="int8x2")
    assert all(m.activations == "int8x2" for m in b2.model.modules() if isinstance(m, kernels.PackedLinear))
    with torch.no_grad():
        la, lb, lb2 = a.model(**ids).logits, b.model(**ids).logits, b2.model(**ids).logits
    gap, gap2 = (((la - other).abs().max() / la.abs().max()).item() for other in (lb, lb2))
    assert 0 < gap < 0.02 and 0 < gap2 < gap / 20  # int8x2 carries x to about 16 bits
    with pytest.raises(Exception, match="int8 values"):
        hp.use_kernels(hp.load(str(tmp_path / "u")), activations="int8")
    c, _ = load_model(str(q), kernels=True, lm_head="int8", activations="int8")
    kinds = {(m.kind, m.activations) for m in c.modules() if isinstance(m, kernels.PackedLinear)}
    assert kinds == {("tiered", "int8"), ("unstructured", "int8")}
    for act in ("int8", "int8x2"):
        assert main(["ppl", str(q), "--activations", act, "--seqlen", "32", "--max-windows", "1"]) == 2
        assert "--kernels" in capsys.readouterr().err
    import hybridprune.io.models as io_models
    monkeypatch.setattr(io_models, "load_dense", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    for act in ("int8", "int8x2"):
        assert main(["ppl", str(dense), "--kernels", "--activations", act, "--seqlen", "32", "--max-windows",
                     "1"]) == 2
        assert "--values int8" in capsys.readouterr().err
