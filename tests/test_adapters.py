"""evaluation/adapters.py leans on lm-eval's and transformers' internals; these tests fail when either changes."""
import inspect

import pytest
import torch
from conftest import tiny_model

from hybridprune.evaluation import adapters


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_hflm_still_has_the_private_methods_we_override():
    """Our overrides take exactly the arguments lm-eval's own methods take, and what they call still exists."""
    from lm_eval.models.huggingface import HFLM
    ours = adapters.lm_class(lambda task, prompt, doc: (prompt, ""))
    for name in ("_loglikelihood_tokens", "generate_until", "_model_generate"):
        theirs = getattr(HFLM, name, None)
        assert theirs is not None, f"lm-eval's HFLM has no {name} any more: evaluation/adapters.py must follow"
        assert _params(getattr(ours, name)) == _params(theirs), name
    for name in ("_encode_pair", "tok_encode", "max_length"):
        assert hasattr(HFLM, name), name
    init = inspect.getsource(HFLM.__init__)
    for name in ("batch_size_per_gpu", "mixed_precision_dtype"):  # attributes HFLM sets in __init__
        assert f"self.{name}" in init, name


def test_static_cache_rewinds_to_an_earlier_length():
    """Fill a StaticCache with a prompt and 4 tokens more, rewind to the prompt, go on with other tokens: the logits
    equal those of a fresh cache that only ever saw the prompt and those tokens."""
    from transformers import StaticCache
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    prompt, junk, cont = (torch.randint(0, 256, (1, n), generator=g) for n in (7, 4, 3))
    positions = torch.arange(14).unsqueeze(0)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(prompt, past_key_values=cache, position_ids=positions[:, :7], use_cache=True)
        model(junk, past_key_values=cache, position_ids=positions[:, 7:11], use_cache=True)
        assert cache.get_seq_length() == 11
        assert adapters.rewind_static_cache(cache, 7)
        got = model(cont, past_key_values=cache, position_ids=positions[:, 7:10], use_cache=True).logits
        fresh = StaticCache(config=model.config, max_cache_len=16)
        model(prompt, past_key_values=fresh, position_ids=positions[:, :7], use_cache=True)
        want = model(cont, past_key_values=fresh, position_ids=positions[:, 7:10], use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_cache_that_cannot_rewind_is_reported():
    class Other:
        pass

    class Cache:
        layers = [Other()]
    assert not adapters.can_rewind(Cache()) and not adapters.rewind_static_cache(Cache(), 3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_loglikelihood_equals_stock_lm_eval(family, default_tokenizer, monkeypatch):
    """Our continuation-only log-likelihoods against lm-eval's own HFLM on the same requests: sums to 1e-6
    relative and the same greedy flags, also with logits made 5 positions at a time, batches split by the token
    budget, and a request longer than the context (truncated from the left)."""
    from conftest import tiny_model
    from lm_eval.models.huggingface import HFLM

    from hybridprune.evaluation import ppl as evaluate
    from hybridprune.evaluation.tasks import _lm_class
    vocab = len(default_tokenizer)
    model = tiny_model(family, vocab=vocab, hidden=32, inter=64)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for n_ctx, n_cont in [(5, 1), (30, 3), (12, 12), (7, 1), (3, 2), (40, 5)]:
        reqs.append((None, torch.randint(1, vocab, (n_ctx,), generator=g).tolist(),
                     torch.randint(1, vocab, (n_cont,), generator=g).tolist()))
    with torch.no_grad():  # a continuation the model predicts greedily: is_greedy must be True there
        best = int(model(torch.tensor([reqs[0][1]])).logits[0, -1].argmax())
    reqs.append((None, reqs[0][1], [best]))
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 4 * vocab * 5)
    monkeypatch.setattr(evaluate, "TOKENS_PER_PASS", 64)

    def make(cls):
        return cls(pretrained=model, tokenizer=default_tokenizer, batch_size=3, max_length=32)
    ours = make(_lm_class())._loglikelihood_tokens(reqs, disable_tqdm=True)
    stock = HFLM._loglikelihood_tokens(make(HFLM), reqs, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in stock] and ours[-1][1]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], rel=1e-6)
