"""Where hybridprune leans on other libraries' internals, in one place, each guarded by a test that fails when the
library changes under it (tests/test_adapters.py):

- lm-evaluation-harness: `lm_class` subclasses HFLM and overrides its private `_loglikelihood_tokens` and
  `_model_generate` (and `generate_until`), keeping their outputs, for speed;
- transformers: `rewind_static_cache` moves a StaticCache back to an earlier length by its layers'
  `cumulative_length`, which transformers exposes no method for.
"""
from __future__ import annotations

import torch

from hybridprune.evaluation.ppl import TOKENS_PER_PASS, OutputHead

SAME_LENGTH = 0.65  # a generation batch's prompts are at least this fraction of its longest (lm_class)


def can_rewind(cache) -> bool:
    """Whether every layer of a transformers StaticCache can be moved back (a sliding-window layer keeps no past
    to go back to)."""
    from transformers.cache_utils import StaticLayer
    return all(type(layer) is StaticLayer for layer in cache.layers)


def rewind_static_cache(cache, length: int) -> bool:
    """Move a StaticCache back to `length` tokens: what was written after them is overwritten by the next forward.
    Returns whether the cache now says it holds `length` tokens."""
    if not can_rewind(cache):
        return False
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)
    return cache.get_seq_length() == length


def lm_class(gold_pair):
    """lm-eval's HFLM with two speed-ups for greedy generation that leave its outputs unchanged:
    - a static KV cache (preallocated to prompt + max_gen_toks, filled in place) where the model supports one:
      the default dynamic cache concatenates every layer's keys and values at each step, which was a fifth of a
      decode step on CPU (2.7x faster decode at batch 64, bench/eval_speed.py);
    - its own batch size: decode steps are bound by reading the weights, so a wider batch is almost free per
      token, while log-likelihood batches hold full-vocabulary logits and stay at --batch-size;
    - batches of alike prompt lengths: requests sorted longest first are cut into batches whose prompts are all
      at least SAME_LENGTH of the batch's longest, so a wide batch does not spend its time on left padding;
    - stopping row by row (`_StopPerRow`): lm-eval's criteria say "done" only when *every* row holds the *same*
      stop string, so one row that ended with EOS instead of "\n" kept its whole batch decoding to max_gen_toks;
    - log-likelihoods from the continuation's positions only, a few at a time (evaluate.OutputHead): lm-eval
      takes the log-softmax of batch x length x vocabulary logits (a GSM8K gold-answer batch of 16 x 1,300
      tokens is 4 GB at a 49k vocabulary). Same sums and greedy flags, same order, truncation and padding;
    - one prefill for a prompt's generation and its gold answer's log-likelihood (`_prefill_scoring_golds`): the
      gold answer is scored on the generation's own KV cache, which is then rewound to the prompt, where it would
      otherwise be a second forward pass over the whole prompt (a third of a SQuAD evaluation).
    gold_pair(task, prompt, doc) -> (context, answer) text: the gold answer a generating task scores."""
    from lm_eval.models.huggingface import HFLM
    from transformers import StoppingCriteriaList

    class FastGenerateLM(HFLM):
        generate_batch_size = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gold_wanted: dict = {}  # prompt tokens -> its gold answer's tokens, for tasks with a gold answer
            self.gold_scored: dict = {}  # (prompt tokens, answer tokens) -> (log-likelihood, greedy), until asked

        def output_head(self):
            if getattr(self, "_head", None) is None:  # one per evaluation: it checks its split once
                self._head = OutputHead(self.model)
            return self._head

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            head = self.output_head()
            out: list = [None] * len(requests)
            todo = []
            for i, (key, context, continuation) in enumerate(requests):  # scored already, during generation
                out[i] = self.gold_scored.pop((tuple(context), tuple(continuation)), None)
                if out[i] is None:
                    todo.append(i)
                elif key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, out[i])
            # longest first, as lm-eval's Collator, so a batch's padding is small; results in request order
            order = sorted(todo, key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            width = override_bs or self.batch_size_per_gpu
            batches: list[list[int]] = []  # at most `width` rows and TOKENS_PER_PASS padded tokens each
            def padded(i):  # the batch's input length when request i is its longest
                return min(len(requests[i][1]) + len(requests[i][2]) - 1, self.max_length)
            for i in order:
                if not batches or len(batches[-1]) >= width or \
                        (len(batches[-1]) + 1) * padded(batches[-1][0]) > TOKENS_PER_PASS:
                    batches.append([])
                batches[-1].append(i)
            with torch.no_grad():
                for batch in batches:
                    # too long for the context: truncate from the left, as lm-eval; the last token is not an input
                    inps = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
                    ids = torch.zeros(len(batch), max(map(len, inps)), dtype=torch.long)
                    for row, inp in enumerate(inps):  # right padding: causal attention never sees it
                        ids[row, :len(inp)] = torch.tensor(inp)
                    hidden = head.hidden(ids.to(self.device))
                    for row, i in enumerate(batch):
                        cont = requests[i][2]
                        h = hidden[row, len(inps[row]) - len(cont):len(inps[row])]
                        lp, greedy = head.token_logprobs(h, torch.tensor(cont), greedy=True)
                        out[i] = (float(lp.double().sum()), bool(greedy.all()))
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                    del hidden
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.gold_wanted = {}
            for r in requests:  # gold_scores asks for these next; only where the whole pair fits, as it would
                task = str(getattr(r, "task_name", "")).removeprefix("hybridprune_")
                if task in ("squad", "gsm8k") and getattr(self.model, "_can_compile_fullgraph", False):
                    context, continuation = self._encode_pair(*gold_pair(task, r.args[0], r.doc))
                    if len(context) + len(continuation) <= self.max_length:
                        self.gold_wanted[tuple(context)] = list(continuation)
            width = self.generate_batch_size or self.batch_size_per_gpu
            lengths = [len(self.tok_encode(r.args[0])) for r in requests]
            batches: list[list[int]] = []
            for i in sorted(range(len(requests)), key=lambda i: -lengths[i]):
                if not batches or len(batches[-1]) >= width or lengths[i] < SAME_LENGTH * lengths[batches[-1][0]]:
                    batches.append([])
                batches[-1].append(i)
            out: list = [None] * len(requests)
            plain_width = self.batch_size_per_gpu
            try:
                for batch in batches:  # lm-eval batches, groups by generation settings and reorders within each
                    self.batch_size_per_gpu = len(batch)
                    texts = super().generate_until([requests[i] for i in batch], disable_tqdm)
                    for i, text in zip(batch, texts, strict=True):
                        out[i] = text
            finally:
                self.batch_size_per_gpu = plain_width
            return out

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if getattr(self.model, "_can_compile_fullgraph", False):
                # no automatic torch.compile on GPU: batch shapes vary, and recompiling would cost more than it saves
                generation_kwargs["disable_compile"] = True
                cache = self._prefill_scoring_golds(context, generation_kwargs.get("attention_mask"), max_length)
                if cache is not None:
                    generation_kwargs["past_key_values"] = cache
                else:
                    generation_kwargs["cache_implementation"] = "static"
            # lm-eval's own sampling settings: temperature 0 means greedy, and is then dropped
            if generation_kwargs.get("temperature", 0.0) == 0.0 and generation_kwargs.get("do_sample") is None:
                generation_kwargs["do_sample"] = False
            if generation_kwargs.get("do_sample") is False:
                generation_kwargs.pop("temperature", None)
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                return self.model.generate(
                    input_ids=context, max_length=max_length, pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList(
                        [StopPerRow(self.tokenizer, stop, context.shape[1], context.shape[0])]),
                    use_cache=True, **generation_kwargs)

        def _prefill_scoring_golds(self, context, mask, max_length):
            """A static KV cache holding the left-padded prompts but their last token, after scoring each row's
            gold answer (gold_wanted) on it: the last prompt token and the answer but its last token go through
            the model on top of the cache, then the cache is rewound to the prompt, and generate() goes on from
            the last prompt token. None (generate() prefills as usual) where no row has a gold answer or the
            cache cannot be rewound (a sliding-window layer keeps no past to go back to)."""
            from transformers import StaticCache
            mask = torch.ones_like(context) if mask is None else mask
            prompts = [tuple(c[m.bool()].tolist()) for c, m in zip(context.cpu(), mask.cpu())]
            golds = [self.gold_wanted.get(p) for p in prompts]
            rows, length = context.shape
            if not any(golds) or length < 2:
                return None
            span = max(len(g) for g in golds if g)
            cache = StaticCache(config=self.model.config, max_cache_len=max(max_length, length - 1 + span))
            if not can_rewind(cache):
                return None
            head = self.output_head()
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() counts them under left padding
            ids = context[:, -1:].repeat(1, span)  # the last prompt token, then the answer; the rest is masked
            answer_mask = torch.zeros(rows, span, dtype=mask.dtype, device=mask.device)
            for row, gold in enumerate(golds):
                gold = gold or []
                ids[row, 1:len(gold)] = torch.tensor(gold[:-1], dtype=ids.dtype)
                answer_mask[row, :max(1, len(gold))] = 1
            with torch.no_grad():
                head.hidden(context[:, :-1], mask[:, :-1], past_key_values=cache, position_ids=positions[:, :-1])
                hidden = head.hidden(ids, torch.cat([mask[:, :-1], answer_mask], 1), past_key_values=cache,
                                     position_ids=positions[:, -1:] + torch.arange(span, device=positions.device))
                for row, (prompt, gold) in enumerate(zip(prompts, golds)):
                    if gold:
                        lp, greedy = head.token_logprobs(hidden[row, :len(gold)], torch.tensor(gold), greedy=True)
                        self.gold_scored[(prompt, tuple(gold))] = (float(lp.double().sum()), bool(greedy.all()))
            del hidden
            return cache if rewind_static_cache(cache, length - 1) else None
    return FastGenerateLM


class StopPerRow:
    """A row is done once any stop string appears in its generated text (decoded over the last few tokens, as
    lm-eval looks); generate then pads that row and ends when all rows are done. The text lm-eval keeps is cut
    at the first stop string, so what a done row would have generated next never reaches a result."""

    def __init__(self, tokenizer, stops: list[str], start: int, rows: int):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), start
        # two tokens more than the longest stop string, as lm-eval: "\n\n" may come as two "\n" tokens
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in stops), default=0) + 2
        self.done = [False] * rows

    def __call__(self, input_ids, scores, **kwargs):
        open_rows = [i for i, done in enumerate(self.done) if not done]  # a done row stays done: not decoded again
        texts = self.tokenizer.batch_decode(input_ids[open_rows, self.start:][:, -self.lookback:])
        for i, text in zip(open_rows, texts, strict=True):
            self.done[i] = any(s in text for s in self.stops)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
