"""WikiText-2 perplexity in the convention of the pruning papers (SparseGPT, Wanda).

The test split's rows are joined with a blank line, tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the remainder is dropped), and perplexity is exp of the mean next-token NLL over windows.
For models whose tokenizer adds a BOS token (Gemma, ...) every window is BOS + seqlen - 1 text tokens instead
(`bos`, see data.resolve_bos); either way each window scores seqlen - 1 predictions.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from . import models
from .data import cut_windows, data_dir, resolve_bos, text_ids, wikitext2_text
from .errors import HybridPruneError


def wikitext2_test_ids(tokenizer, data_dir_path=None, bos: str = "papers") -> torch.Tensor:
    text = wikitext2_text("test", data_dir(data_dir_path))
    return torch.tensor(text_ids(tokenizer, text, bos), dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer=None, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               data_dir_path=None, ids: torch.Tensor | None = None, progress: bool = True, bos: str = "auto") -> dict:
    """{'ppl', 'windows', 'seqlen', 'tokens', 'bos', 'seconds'} on WikiText-2 test (or on `ids` if given)."""
    if seqlen < 2:
        raise HybridPruneError(f"--seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise HybridPruneError(f"--max-windows must be >= 1, got {max_windows}")
    bos = resolve_bos(tokenizer, bos) if tokenizer is not None else ("papers" if bos == "auto" else bos)
    if ids is None:
        ids = wikitext2_test_ids(tokenizer, data_dir_path, bos)
    bos_id = tokenizer.bos_token_id if bos == "always" else None
    windows = cut_windows(ids, seqlen, bos_id, max_windows)
    n = len(windows)
    if n == 0:
        raise HybridPruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = models.input_device(model)
    was_training = model.training
    model.eval()
    start, nll, per_window = time.perf_counter(), 0.0, []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", leave=False,
                      disable=None if progress else True):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1), reduction="none")
        window_nll = loss.reshape(batch.shape[0], -1).mean(1)  # mean per window; windows weigh the same
        per_window += window_nll.tolist()
        nll += window_nll.sum().item()
    model.train(was_training)
    return {"ppl": math.exp(nll / n), "windows": n, "seqlen": seqlen, "tokens": n * seqlen, "bos": bos,
            "window_nll": per_window,
            "seconds": round(time.perf_counter() - start, 2)}
