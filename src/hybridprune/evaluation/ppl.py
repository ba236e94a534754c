"""WikiText-2 perplexity in the convention of the pruning papers (SparseGPT, Wanda), and next-token
log-probabilities computed a few positions at a time.

The test split's rows are joined with a blank line, tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the remainder is dropped), and perplexity is exp of the mean next-token NLL over windows.
For models whose tokenizer adds a BOS token (Gemma, ...) every window is BOS + seqlen - 1 text tokens instead
(`bos`, see data.resolve_bos); either way each window scores seqlen - 1 predictions.

Memory: a model's logits are batch x length x vocabulary floats (16 windows of 2048 tokens at a 49k vocabulary
are 6.4 GB, at Gemma's 262k 34 GB). `OutputHead` runs the model without its output layer and applies that layer
to at most CHUNK_BYTES of logits at a time, so memory does not grow with vocabulary x batch x length; perplexity
also runs its windows through the model TOKENS_PER_PASS tokens at a time (the layers' activations grow with batch x
length too; on CPU a wider pass is no faster). Per-window NLLs are reduced in float64.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from hybridprune.io import models
from hybridprune.io.data import cut_windows, data_dir, resolve_bos, text_ids, wikitext2_text
from hybridprune.core.errors import HybridPruneError

CHUNK_BYTES = 64 * 2**20  # fp32 logits made at once (log-softmax holds about twice that)
TOKENS_PER_PASS = 8192    # perplexity windows go through the model in passes of at most this many tokens


class OutputHead:
    """A causal LM split into its body (input ids -> last hidden states) and its output layer, found generically:
    the base model under `base_model_prefix` and `get_output_embeddings()`, with Gemma-style final logit
    soft-capping. On first use the split is checked against the whole model on a few tokens; a model whose forward
    does more than that (another post-processing of logits) falls back to the whole model's logits, which is
    correct, only not memory-bounded."""

    def __init__(self, model):
        self.model = model
        self.body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.split = self.body is not None and self.head is not None and self.body is not model

    checked = False

    def _check(self, input_ids):
        self.checked = True
        ids = input_ids[:1, :8]
        full = self.model(input_ids=ids, use_cache=False).logits.float()[0]
        mine = self.logits(self.hidden(ids)[0])
        self.split = mine.shape == full.shape and torch.allclose(mine, full, rtol=1e-4, atol=1e-4)

    def hidden(self, input_ids, attention_mask=None, **cache) -> torch.Tensor:
        """[batch, length, hidden] last hidden states (or, after a failed check, the whole model's logits).
        cache: past_key_values (and position_ids) to extend a KV cache in place, as generation does."""
        if self.split and not self.checked:
            self._check(input_ids)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache="past_key_values" in cache,
                      **cache)
        return self.body(**kwargs)[0] if self.split else self.model(**kwargs).logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of some positions' hidden states ([n, hidden] -> [n, vocab])."""
        if not self.split:
            return hidden.float()
        out = self.head(hidden).float()
        if self.cap:
            out = torch.tanh(out / self.cap) * self.cap
        return out

    def rows_per_chunk(self) -> int:
        # out_features: nn.Linear's and the packed kernels' PackedLinear alike (--lm-head int8 has no .weight)
        vocab = getattr(self.head, "out_features", None) or self.head.weight.shape[0] if self.split \
            else self.model.config.vocab_size
        return max(1, CHUNK_BYTES // (4 * vocab))

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, greedy: bool = False):
        """log p(target) at each position of hidden ([n, hidden] or [n, vocab] after a failed check), made
        rows_per_chunk() positions at a time; with greedy, also whether each target is the argmax."""
        lp, best = [], []
        step = self.rows_per_chunk()
        for i in range(0, hidden.shape[0], step):
            logits = self.logits(hidden[i:i + step])
            t = targets[i:i + step].to(logits.device)
            lp.append(logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, 1))
            if greedy:
                best.append(logits.argmax(1) == t)
        lp = torch.cat(lp) if lp else hidden.new_zeros(0, dtype=torch.float32)
        return (lp, torch.cat(best) if best else torch.zeros(0, dtype=torch.bool)) if greedy else lp


def wikitext2_test_ids(tokenizer, data_dir_path=None, bos: str = "papers") -> torch.Tensor:
    text = wikitext2_text("test", data_dir(data_dir_path))
    return torch.tensor(text_ids(tokenizer, text, bos), dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer=None, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               data_dir_path=None, ids: torch.Tensor | None = None, progress: bool = True, bos: str = "auto") -> dict:
    """{'ppl', 'windows', 'seqlen', 'tokens', 'bos', 'window_nll', 'seconds'} on WikiText-2 test (or on `ids`)."""
    check_ppl_args(seqlen, max_windows, batch_size)
    bos = resolve_bos(tokenizer, bos) if tokenizer is not None else ("papers" if bos == "auto" else bos)
    if ids is None:
        ids = wikitext2_test_ids(tokenizer, data_dir_path, bos)
    bos_id = tokenizer.bos_token_id if bos == "always" else None
    windows = cut_windows(ids, seqlen, bos_id, max_windows)
    n = len(windows)
    if n == 0:
        raise HybridPruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = models.input_device(model)
    head = OutputHead(model)
    was_training = model.training
    model.eval()
    start, per_window = time.perf_counter(), []
    rows = max(1, min(batch_size, TOKENS_PER_PASS // seqlen))
    for batch in tqdm(windows.split(rows), desc="perplexity", unit="batch", leave=False,
                      disable=None if progress else True):
        batch = batch.to(device)
        hidden = head.hidden(batch)
        for row, h in zip(batch, hidden):  # mean per window; windows weigh the same
            per_window.append(-head.token_logprobs(h[:-1], row[1:]).double().mean().item())
        del hidden
    model.train(was_training)
    return {"ppl": math.exp(sum(per_window) / n), "windows": n, "seqlen": seqlen, "tokens": n * seqlen, "bos": bos,
            "window_nll": per_window, "seconds": round(time.perf_counter() - start, 2)}


def check_ppl_args(seqlen: int, max_windows: int | None, batch_size: int = 1, flag: str = "--max-windows") -> None:
    """The perplexity options, checked before any model is read."""
    if not isinstance(seqlen, int) or seqlen < 2:
        raise HybridPruneError(f"--seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise HybridPruneError(f"{flag} must be >= 1, got {max_windows}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HybridPruneError(f"--batch-size must be >= 1, got {batch_size}")
