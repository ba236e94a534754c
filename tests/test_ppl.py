"""WikiText-2 perplexity (evaluation/ppl.py) against a float64 reference, in memory that does not grow with the
vocabulary."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch


def test_perplexity_equals_a_float64_reference():
    from conftest import tiny_model

    from hybridprune.evaluation.ppl import perplexity
    model = tiny_model("llama", vocab=300)
    ids = torch.randint(0, 300, (6 * 40,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids=ids, seqlen=40, batch_size=4, progress=False)
    with torch.no_grad():
        logits = model(ids.reshape(6, 40)).logits.double()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids.reshape(6, 40)[:, 1:].reshape(-1),
                                            reduction="none").reshape(6, -1).mean(1)
    assert res["window_nll"] == pytest.approx(ref.tolist(), rel=1e-6)


def test_memory_does_not_grow_with_the_vocabulary(tmp_path):
    """A tiny model with Gemma's 262,144-token vocabulary: 4 windows of 1,024 tokens at batch 4 would be 4.3 GB
    of fp32 logits (and as much again for their log-softmax); chunked, the whole process stays under 1.5 GB."""
    script = textwrap.dedent("""
        import re, sys, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import tiny_model
        from hybridprune.evaluation.ppl import perplexity
        model = tiny_model("llama", vocab=262144, hidden=32, inter=64)
        ids = torch.randint(0, 262144, (4 * 1024,), generator=torch.Generator().manual_seed(0))
        res = perplexity(model, ids=ids, seqlen=1024, batch_size=4, progress=False)
        # VmHWM is this image's own peak: ru_maxrss would carry over the forking test worker's (gigabytes)
        print(res["ppl"], re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    """)
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True, timeout=600)
    ppl, kb = out.stdout.split()
    assert np.isfinite(float(ppl)) and int(kb) < 1.5 * 2**20, f"peak RSS {int(kb) / 2**20:.2f} GB"
