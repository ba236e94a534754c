"""The GPU kernels (sparse/triton_kernels.py) under Triton's interpreter, on the CPU: against the dense matmul of
the unpacked matrix, on odd shapes and random tier maps, and PackedLinear's routing of CUDA inputs."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the `gpu` extra (triton) is not installed")

SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_packed import pruned
from hybridprune.sparse import kernels, packing, triton_kernels
worst = 0.0
for pattern in ("unstructured", "2:4", "three-tier"):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N, K in ((37, 75), (50, 96), (16, 16), (33, 128), (29, 40), (20, 48)):
            if pattern == "2:4" and K % 16:
                continue
            W, layout, tiers = pruned(pattern, N, K, dtype, seed=N)
            m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers))
            for B in (1, 3, 16, 33):
                for x in (torch.randn(B, K), torch.randn(B, K).to(dtype)):  # fp32 x, and x in the model's dtype
                    y = triton_kernels.matmul(m.kind, x, dict(m.named_buffers()), m.layout)
                    ref = x.double() @ W.double().t()
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    worst = max(worst, err)
                    assert y.dtype == torch.float32 and err < 1e-5, (pattern, dtype, N, K, B, err)
os.environ["HYBRIDPRUNE_KERNELS"] = "triton"  # PackedLinear routes CPU inputs to the Triton kernels too
for pattern in ("unstructured", "2:4", "three-tier"):
    W, layout, tiers = pruned(pattern, 40, 64, torch.float32, seed=1)
    m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers), torch.randn(40))
    x = torch.randn(2, 3, 64)
    assert m.backend(x.device) == "triton"
    ref = x.double() @ W.double().t() + m.bias.double()
    assert torch.allclose(m(x).double(), ref, rtol=1e-5, atol=1e-5), pattern
print("worst", worst)
"""


def test_triton_kernels_equal_the_dense_matmul_under_the_interpreter():
    tests = os.path.dirname(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when triton is imported: a process of its own
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worst" in out.stdout


def test_packed_linear_sends_cuda_inputs_to_triton(monkeypatch):
    from test_packed import pruned
    from hybridprune.sparse import kernels, packing
    monkeypatch.delenv("HYBRIDPRUNE_KERNELS", raising=False)
    W, layout, tiers = pruned("three-tier", 32, 32)
    m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w", tiers))
    assert m.backend(torch.device("cuda")) == "triton" and m.backend(torch.device("cpu")) == "cpu"
    W, layout, _ = pruned("2:4", 32, 8)  # K not a multiple of 16: no kernel covers it, computed unpacked
    assert kernels.PackedLinear(layout, packing.pack_matrix(W, layout, "w")).backend(torch.device("cuda")) == "dense"
