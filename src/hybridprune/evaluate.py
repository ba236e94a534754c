"""WikiText-2 perplexity in the convention of the pruning papers (SparseGPT, Wanda).

The test split's rows are joined with a blank line, tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the remainder is dropped), and perplexity is exp of the mean next-token NLL over windows.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .data import data_dir, wikitext2_text
from .errors import HybridPruneError


def wikitext2_test_ids(tokenizer, data_dir_path=None) -> torch.Tensor:
    text = wikitext2_text("test", data_dir(data_dir_path))
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer=None, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               data_dir_path=None, ids: torch.Tensor | None = None, progress: bool = True) -> dict:
    """{'ppl', 'windows', 'seqlen', 'tokens', 'seconds'} on WikiText-2 test (or on `ids` if given)."""
    if seqlen < 2:
        raise HybridPruneError(f"--seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise HybridPruneError(f"--max-windows must be >= 1, got {max_windows}")
    if ids is None:
        ids = wikitext2_test_ids(tokenizer, data_dir_path)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise HybridPruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].reshape(n, seqlen)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    start, nll = time.perf_counter(), 0.0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", leave=False,
                      disable=None if progress else True):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1), reduction="none")
        nll += loss.reshape(batch.shape[0], -1).mean(1).sum().item()  # mean per window, summed over windows
    model.train(was_training)
    return {"ppl": math.exp(nll / n), "windows": n, "seqlen": seqlen, "tokens": n * seqlen,
            "seconds": round(time.perf_counter() - start, 2)}
