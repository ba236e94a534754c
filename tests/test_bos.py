"""The BOS policy (auto | always | papers): read from the tokenizer, followed by calibration, perplexity,
fine-tuning and lm-eval alike, and recorded."""
import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from hybridprune import PruneConfig
from hybridprune.core.errors import HybridPruneError
from hybridprune.evaluation.ppl import perplexity
from hybridprune.finetuning.finetune import FinetuneConfig, build_dataset
from hybridprune.io.data import (
    calibration_samples,
    resolve_bos,
    text_ids,
    wikitext2_text,
)
from hybridprune.pruning.engine import prune


def test_bos_policy_is_read_from_the_tokenizer():
    assert resolve_bos(tiny_tokenizer(adds_bos=True)) == "always"
    assert resolve_bos(tiny_tokenizer(adds_bos=False)) == "papers"
    assert resolve_bos(tiny_tokenizer(adds_bos=False), "always") == "always"
    with pytest.raises(HybridPruneError, match="--bos"):
        resolve_bos(tiny_tokenizer(adds_bos=True), "sometimes")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_calibration_windows_follow_the_bos_policy(adds_bos, data_dir):
    tok = tiny_tokenizer(adds_bos)
    for source in ("wikitext2", "gsm8k"):  # running text and packed examples
        s = calibration_samples(tok, source, nsamples=6, seqlen=32, seed=0, data_dir_path=data_dir)
        assert s.shape == (6, 32)
        starts_with_bos = (s[:, 0] == tok.bos_token_id).tolist()
        assert all(starts_with_bos) if adds_bos else not any(starts_with_bos), source
        assert int((s[:, 1:] == tok.bos_token_id).sum()) == 0  # BOS only where a sequence starts


@pytest.mark.parametrize("adds_bos", [True, False])
def test_perplexity_windows_follow_the_bos_policy(adds_bos, data_dir):
    tok = tiny_tokenizer(adds_bos)
    model = tiny_model("llama")
    seen = []
    # what the embedding reads (OutputHead's one-time check of 8 tokens aside)
    model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: seen.append(a[0].clone()) if a[0].shape[1] == 16 else None)
    res = perplexity(model, tok, seqlen=16, max_windows=3, data_dir_path=data_dir)
    windows = torch.cat(seen)
    text = text_ids(tok, wikitext2_text("test", data_dir), "always")  # the text without special tokens
    if adds_bos:  # BOS + 15 text tokens each, consecutive pieces of the text
        assert res["bos"] == "always" and (windows[:, 0] == 1).all()
        assert windows[:, 1:].reshape(-1).tolist() == text[:45]
    else:  # the papers' convention: the text as tokenized once, cut into windows of 16
        assert res["bos"] == "papers" and windows.reshape(-1).tolist() == text[:48]
    assert windows.shape == (3, 16)


def test_fine_tuning_sequences_follow_the_bos_policy(data_dir):
    for adds_bos in (True, False):
        tok = tiny_tokenizer(adds_bos)
        rows = build_dataset(FinetuneConfig(data="wikitext2", seqlen=32, max_examples=4, data_dir=str(data_dir)), tok)
        assert all((r["input_ids"][0] == 1) == adds_bos for r in rows) and all(len(r["input_ids"]) == 32 for r in rows)
        rows = build_dataset(FinetuneConfig(data="boolq", max_examples=3, data_dir=str(data_dir)), tok)
        assert all((r["input_ids"][0] == 1) == adds_bos and r["labels"][0] == -100 for r in rows)


def test_bos_choice_is_recorded(tmp_path, samples, data_dir):
    from hybridprune.pruning.engine import save_pruned
    model = tiny_model("llama")
    tok = tiny_tokenizer(adds_bos=True)
    config = PruneConfig(nsamples=2, seqlen=16, device="cpu", data_dir=str(data_dir))
    result = prune(model, config, tokenizer=tok)
    assert result.bos == "always"
    save_pruned(model, tok, tmp_path / "m", config, result, source="tiny")
    assert json.loads((tmp_path / "m" / "hybridprune.json").read_text())["prune"]["bos"] == "always"


def test_eval_passes_the_bos_choice_to_lm_eval(monkeypatch, data_dir):
    import lm_eval.models.huggingface as hf

    from hybridprune.evaluation.tasks import evaluate_model
    seen = {}
    original = hf.HFLM.__init__

    def spy(self, *a, **kw):
        seen.update(kw)
        original(self, *a, **kw)
    monkeypatch.setattr(hf.HFLM, "__init__", spy)
    res = evaluate_model(tiny_model("llama"), tiny_tokenizer(adds_bos=True), ["boolq"], limit=2, batch_size=2,
                         data_dir_path=data_dir)
    assert seen["add_bos_token"] is True and res["boolq"]["bos"] == "always"
