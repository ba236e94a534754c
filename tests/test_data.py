import json
import math

import pytest
import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.evaluation.ppl import perplexity
from hybridprune.io.data import (
    calibration_samples,
    calibration_texts,
    parse_calib,
    split_counts,
    squad_examples,
    wikitext2_rows,
)


def test_wikitext2_rows_follow_hub_convention(data_dir):
    rows = wikitext2_rows("test", data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n" and rows[2] == ""
    assert all(r == "" or r.endswith("\n") for r in rows)


def test_squad_split_is_by_article_and_disjoint(data_dir):
    fit, ev = squad_examples("fit", data_dir), squad_examples("eval", data_dir)
    assert len(fit) + len(ev) == 10570
    assert not ({r["title"] for r in fit} & {r["title"] for r in ev})
    assert not ({r["id"] for r in fit} & {r["id"] for r in ev})
    raw = json.loads((data_dir / "squad" / "dev-v1.1.json").read_text())["data"]
    assert fit[0]["title"] == raw[0]["title"] and ev[0]["title"] == raw[1]["title"]


def test_squad_calibration_text_has_no_answer(data_dir):
    kind, texts = calibration_texts("squad", data_dir, "labeled")
    fit = squad_examples("fit", data_dir)
    assert kind == "examples" and texts[0] == f"Context: {fit[0]['context']}\nQuestion: {fit[0]['question']}"
    assert not any("Answer" in t.split("\nQuestion:")[-1] for t in texts[:200])
    _, texts = calibration_texts("squad", data_dir, "context_question")
    assert texts[0] == f"{fit[0]['context']} {fit[0]['question']}"


def test_samples_deterministic_and_shaped(data_dir, default_tokenizer):
    a = calibration_samples(default_tokenizer, "wikitext2", 4, 64, seed=0)
    b = calibration_samples(default_tokenizer, "wikitext2", 4, 64, seed=0)
    c = calibration_samples(default_tokenizer, "wikitext2", 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_packed_examples_are_full_windows_without_padding(data_dir, default_tokenizer):
    s = calibration_samples(default_tokenizer, "gsm8k", 3, 128, seed=0)
    assert s.shape == (3, 128)
    # examples are packed back to back: every window holds EOS separators between whole examples, and the
    # stream is exactly the tokenized examples, so no position is filler
    eos = default_tokenizer.eos_token_id
    flat = s.reshape(-1).tolist()
    assert eos in flat
    first = flat[: flat.index(eos)]
    assert default_tokenizer.decode(first).startswith("Question: ")


def test_mixture_counts_and_errors(data_dir, default_tokenizer):
    s = calibration_samples(default_tokenizer, "mixed:wikitext2=0.5,squad=0.5", 4, 32, seed=0)
    assert s.shape == (4, 32)
    assert split_counts(5, [0.5, 0.5]) == [3, 2] and sum(split_counts(7, [0.2, 0.3, 0.5])) == 7
    with pytest.raises(HybridPruneError, match="add up"):
        parse_calib("mixed:wikitext2=0.5,squad=0.6")
    with pytest.raises(HybridPruneError, match="unknown calibration source"):
        parse_calib("pile")


def test_missing_data_file_names_it(tmp_path, default_tokenizer):
    (tmp_path / "wikitext2").mkdir()
    with pytest.raises(HybridPruneError, match="wiki.valid.raw"):
        calibration_samples(default_tokenizer, "wikitext2", 2, 16, data_dir_path=tmp_path)


def test_perplexity_matches_direct_computation():
    from conftest import tiny_model
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids=ids, seqlen=32)
    assert res["windows"] == 3 and res["tokens"] == 96
    nll = []
    with torch.no_grad():
        for w in ids[:96].reshape(3, 32):
            logp = torch.log_softmax(model(w[None]).logits[0, :-1], -1)
            nll.append(-logp[torch.arange(31), w[1:]].mean())
    assert math.isclose(res["ppl"], math.exp(torch.stack(nll).mean().item()), rel_tol=1e-5)
