"""The capped heap (core/heap.py): freed tensors go back to the OS."""
import os
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_capped_heap_gives_freed_tensors_back():
    """After one large tensor was freed, glibc serves 8 MB tensors from its heap; freed between live ones they stay
    resident (540 MB here for 60 MB alive). With the cap (every command and experiment sets it), they go back to
    the OS when freed."""
    script = textwrap.dedent("""
        import re, sys, torch
        from hybridprune.core.heap import cap_heap_growth
        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) >> 10
        if sys.argv[1] == "cap":
            assert cap_heap_growth()
        big = torch.ones(16 << 18); del big          # a 16 MB mapping freed: glibc raises its threshold
        before = rss()
        tensors, kept = [], []
        for _ in range(60):                           # 8 MB tensors, each followed by a 1 MB one that stays
            tensors.append(torch.ones(2 << 20))
            kept.append(torch.ones(1 << 18))
        del tensors
        print(rss() - before)
    """)
    grown = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                      check=True, timeout=120).stdout.split()[-1]) for mode in ("plain", "cap")}
    if grown["plain"] < 300:
        pytest.skip(f"this malloc returns freed memory by itself ({grown})")
    assert grown["cap"] < 120, grown  # the 60 MB still alive


def test_heap_cap_also_caps_onednns_primitive_cache(monkeypatch):
    """bf16 matmuls on a CPU go through oneDNN, which keeps built primitives (with their buffers) for every shape
    it has seen: 1,024 by default, which raised a bf16 SQuAD LoRA stage by 0.6 GiB. The cap keeps 32, unless the
    user chose a number."""
    from hybridprune.core.heap import ONEDNN_PRIMITIVES, cap_heap_growth
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_heap_growth()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVES) == "32"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    cap_heap_growth()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
