"""Sparsity-preserving fine-tuning: pruned weights stay exactly zero.

- `lora`: PEFT LoRA on every prunable matrix of the decoder layers; at the end the update is merged through the
  mask, W <- W + M * (scale * B @ A), so a dense LoRA delta never fills the zeros (the base weights are frozen, so
  their non-zero set at the merge is the mask before training).
- `full`: every prunable matrix trains with its gradient multiplied by its mask, and the mask is re-applied
  after each optimizer step (weight decay and Adam moments cannot regrow a weight either).

Training runs through the transformers Trainer (gradient accumulation, checkpoints and `--resume`, bf16 autocast
on GPU by default and on any device with `autocast="bf16"`, accelerate / FSDP / DeepSpeed when launched that way,
activation checkpointing unless turned off: each layer's activations are recomputed in backward, so memory holds
one layer's, same results). After training the zero set of every matrix is compared with the one before (LoRA:
its count of zeros); any difference is an error.

Templated data puts the loss on the answer only (prompt labels are -100) and ends the answer with EOS. The
`simple` templates are the evaluation prompts of tasks.py, byte for byte, followed by " answer" (lm-eval's target
delimiter), so a model is trained on exactly the prompt that `eval` scores. The output layer runs only at positions
whose next token is labelled (transformers' `logits_to_keep`): on SQuAD that is the answer, a few tokens of each
~300, so training never holds vocabulary x prompt-length logits. `dropout_rng="hash"` swaps LoRA's nn.Dropout for
HashDropout (the same distribution from a hash of the element index, csrc/dropout.cpp): torch's CPU dropout
sampling is a third of a LoRA step's time at p = 0.05.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybridprune.core import files
from hybridprune.io import models
from hybridprune.io.data import (boolq_examples, c4_texts, cut_windows, data_dir, gsm8k_examples, resolve_bos,
                   squad_examples, text_ids, wikitext2_text)
from hybridprune.core.config import FT_DATA, TEMPLATE_NAMES, FinetuneConfig  # noqa: F401
from hybridprune.core.errors import HybridPruneError, require
from hybridprune.io.folder import load_permutations, load_tier_maps, read_record, save_maps
from hybridprune.core.heap import trim_heap
from hybridprune.sparse import load
from hybridprune.evaluation.tasks import BOOLQ_PROMPT, GSM8K_PROMPT, SQUAD_PROMPT

logger = logging.getLogger(__name__)



def _fmt(jinja_prompt: str) -> str:
    """The eval prompt (lm-eval's {{field}} placeholders) as a str.format template."""
    return jinja_prompt.replace("{{", "{").replace("}}", "}")


TEMPLATES = {
    "squad": {"simple": (_fmt(SQUAD_PROMPT), " {answer}"),
              "alpaca": ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                         "Answer the question based on the context.\n\n### Input:\nContext: {context}\n"
                         "Question: {question}\n\n### Response:\n", "{answer}")},
    "gsm8k": {"simple": (_fmt(GSM8K_PROMPT), " {solution}")},
    "boolq": {"simple": (_fmt(BOOLQ_PROMPT), " {answer}")},
}


# ----------------------------------------------------------------------------- data

def _records(data: str, root) -> list[dict]:
    """Fields for the templates. Offline SQuAD comes from the *fit* half of dev only."""
    if data == "squad":
        return [{"title": r["title"], "context": r["context"], "question": r["question"], "answer": r["answers"][0]}
                for r in squad_examples("fit", root)]
    if data == "gsm8k":
        return [{"question": r["question"], "solution": r["answer"]} for r in gsm8k_examples("train", root)]
    if data == "boolq":
        return [{"passage": r["passage"], "question": r["question"], "answer": "yes" if r["label"] else "no"}
                for r in boolq_examples("train", root)]
    raise ValueError(data)


def render(data: str, template: str, record: dict, tokenizer) -> tuple[str, str]:
    """(prompt, answer) text for one record."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HybridPruneError("--template chat needs a tokenizer with a chat template")
        user, answer = TEMPLATES[data]["simple"]
        msgs = [{"role": "user", "content": user.format(**record).removesuffix("Answer:").rstrip()}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt, answer.format(**record).strip()
    prompt, answer = TEMPLATES[data][template]
    try:
        return prompt.format(**record), answer.format(**record)
    except KeyError as e:
        raise HybridPruneError(f"template {template!r} needs the field {e.args[0]!r}, missing from the {data} data") \
            from None


def encode_example(prompt: str, answer: str, tokenizer, seqlen: int, bos_id: int | None = None) -> dict:
    """input_ids and labels; labels are -100 on every prompt token (and the BOS), the answer ends with EOS."""
    p = ([bos_id] if bos_id is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + a)[:seqlen]
    labels = ([-100] * len(p) + a)[:seqlen]
    return {"input_ids": ids, "labels": labels}


def build_dataset(config: FinetuneConfig, tokenizer, cache=None) -> list[dict]:
    """Tokenized training rows. With `cache` (a folder), rows are stored under a key of everything they depend
    on (data, template, length, BOS, example cap, data folder, the tokenizer itself), so fine-tuning runs that
    share their data (an experiment's SQuAD recovery after each calibration) tokenize it once."""
    if cache is not None:
        from hashlib import sha256
        vocab = sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest() \
            if getattr(tokenizer, "backend_tokenizer", None) is not None else repr(sorted(tokenizer.get_vocab().items()))
        key = sha256(json.dumps([config.data, config.template, config.seqlen, resolve_bos(tokenizer, config.bos),
                                 config.max_examples, str(data_dir(config.data_dir)), vocab,
                                 getattr(tokenizer, "chat_template", None)]).encode()).hexdigest()[:16]
        path = Path(cache) / f"{config.data}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        rows = build_dataset(config, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, json.dumps(rows))
        return rows
    root = data_dir(config.data_dir)
    bos = resolve_bos(tokenizer, config.bos)
    bos_id = tokenizer.bos_token_id if bos == "always" else None
    if config.data in ("wikitext2", "c4"):
        # plain causal LM on packed windows (valid split offline; the test split is never trained on)
        text = wikitext2_text("train", root) if config.data == "wikitext2" else "\n\n".join(c4_texts(root))
        windows = cut_windows(torch.tensor(text_ids(tokenizer, text, bos)), config.seqlen, bos_id)
        rows = [{"input_ids": w.tolist(), "labels": w.tolist()} for w in windows]
    else:
        records = _records(config.data, root)
        rows = [encode_example(*render(config.data, config.template, r, tokenizer), tokenizer, config.seqlen, bos_id)
                for r in records[: config.max_examples]]
        rows = [r for r in rows if any(x != -100 for x in r["labels"])]  # prompt longer than seqlen: nothing to learn
    if config.max_examples:
        rows = rows[: config.max_examples]
    if not rows:
        raise HybridPruneError(f"no training examples from {config.data}; raise --seqlen")
    return rows


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is labelled in at least one row: the only ones whose logits the loss reads."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss (next-token cross-entropy, summed over labelled tokens and divided by their number in the
    accumulated batch) from logits computed only at `scored_positions`. On answer-only data (SQuAD) that skips the
    output layer and the softmax over the vocabulary for nearly every prompt token; the loss is the model's own."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    pos = scored_positions(labels)
    if logits.shape[1] == labels.shape[1]:  # a model without logits_to_keep: all logits were computed
        logits = logits[:, pos]
    target = labels[:, pos + 1].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
                                             reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
    return loss / n


class TokenRows(torch.utils.data.Dataset):
    """Tokenized rows held as two flat int32 tensors and offsets, not as lists of Python ints (on SQuAD's fitting
    half, 5,390 rows of 1.1M tokens, the lists took 79 MiB through training; these take 8.5). Row i is a dict of
    int64 tensors."""

    def __init__(self, rows: list[dict]):
        lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32)
        self.labels = torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.int32)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.ids[a:b].long(), "labels": self.labels[a:b].long()}


class _Collator:
    def __init__(self, pad_id: int, logits_to_keep: bool = False):
        self.pad_id = pad_id
        self.logits_to_keep = logits_to_keep

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.as_tensor(b["input_ids"])
            labels[i, :n] = torch.as_tensor(b["labels"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.logits_to_keep:
            out["logits_to_keep"] = scored_positions(labels)
        return out


# ----------------------------------------------------------------------------- masks

def capture_masks(model) -> dict[str, torch.Tensor]:
    """Non-zero mask of every prunable matrix, keyed by its full name (stored as the module's weight layout)."""
    return {name: (mod.weight != 0) for name, mod in models.prunable_matrices(model).items()}


def check_masks(model, masks: dict[str, torch.Tensor]) -> None:
    for name, mod in models.prunable_matrices(model).items():
        now = mod.weight != 0
        if (now & ~masks[name]).any():
            raise HybridPruneError(f"fine-tuning regrew {int((now & ~masks[name]).sum())} pruned weights in {name}")


def zero_counts(model) -> dict[str, int]:
    """Pruned (zero) weights per prunable matrix: all that LoRA needs to keep before training (its base is frozen)."""
    return {name: int((mod.weight == 0).sum()) for name, mod in models.prunable_matrices(model).items()}


def merge_lora_through_mask(peft_model, prunable):
    """Fold each LoRA delta into its base weight only where the weight is non-zero; return the plain model.
    `prunable`: the names of the prunable matrices (a dict keyed by them will do). LoRA freezes the base weights,
    so each one's own non-zero set at merge time is the mask it had before training: it is computed here, one
    matrix at a time, instead of being held through training (101 MiB of bools on the default model)."""
    from peft.tuners.lora import LoraLayer
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):  # PEFT put it where the original matrix was: same name
                layer = module.get_base_layer()
                keep = layer.weight != 0 if name in prunable else None
                for adapter in module.active_adapters:
                    delta = module.get_delta_weight(adapter).to(layer.weight.dtype)
                    layer.weight += delta if keep is None else delta * keep
    return peft_model.unload()


def check_zero_counts(model, before: dict[str, int]) -> None:
    """After a LoRA merge: no matrix lost a zero (the merge only adds where the weight was non-zero)."""
    for name, n in zero_counts(model).items():
        if n < before[name]:
            raise HybridPruneError(f"fine-tuning regrew {before[name] - n} pruned weights in {name}")


# ----------------------------------------------------------------------------- training

def mask_gradients(model, masks: dict[str, torch.Tensor]):
    """Full tuning: every prunable matrix trains with its gradient multiplied by its mask (hooks on the weights),
    and `reapply()` zeroes the pruned positions again after an optimizer step (weight decay and Adam moments
    could otherwise move them). Returns (hook handles, reapply)."""
    for p in model.parameters():
        p.requires_grad_(True)
    masked = [(mod.weight, masks[n]) for n, mod in models.prunable_matrices(model).items()]
    hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in masked]

    def reapply():
        with torch.no_grad():
            for w, m in masked:
                w.mul_(m)
    return hooks, reapply


class _HashDropoutFn(torch.autograd.Function):
    """y = x * keep / (1 - p), keep hashed from (seed, index); the backward applies the same to the gradient."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return _dropout_ext().hash_dropout(x.contiguous(), p, seed, False)

    @staticmethod
    def backward(ctx, grad):
        return _dropout_ext().hash_dropout(grad.contiguous(), ctx.p, ctx.seed, False), None, None


def _dropout_ext():
    from hybridprune.sparse.kernels import build
    return build("dropout", "use dropout_rng: torch")


class HashDropout(torch.nn.Module):
    """Dropout whose mask is a hash of (seed, element index) (csrc/dropout.cpp): each element kept with
    probability 1 - p (to 2^-24) and scaled by 1 / (1 - p), as nn.Dropout, but ~12x faster on a CPU (torch draws
    each Bernoulli sample from mt19937: 15 ms for a [4, 512, 1536] activation, 26x the LoRA product it feeds) and
    with no stored mask. The seed is drawn from torch's generator, so activation checkpointing's recompute, which
    restores that generator, draws the same mask. Off the CPU it is nn.Dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or not x.is_cpu:
            return torch.nn.functional.dropout(x, self.p, self.training)
        seed = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64))
        return _HashDropoutFn.apply(x, self.p, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_hash_dropout(peft_model) -> int:
    """Swap every LoRA layer's nn.Dropout for a HashDropout of the same p; returns how many."""
    n = 0
    for mod in peft_model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for key, d in drops.items():
                if isinstance(d, torch.nn.Dropout):
                    drops[key] = HashDropout(d.p)
                    n += 1
    return n


def _lora_targets(model) -> list[str]:
    """Leaf names of the prunable matrices (q_proj, c_attn, ...): PEFT matches modules by these suffixes."""
    return sorted({name.rsplit(".", 1)[-1] for name in models.prunable_matrices(model)})


def finetune(model, tokenizer, config: FinetuneConfig, work_dir, resume: bool = False, data_cache=None) -> dict:
    """Train in place (the returned dict holds the model and the record). work_dir keeps checkpoints;
    data_cache: a folder for tokenized data (build_dataset)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hybridprune.io.models import default_device
    state = launch_state()
    _refuse_fsdp(state)
    # launched on several processes, each one computes on its own device (accelerate's), set before the masks
    device = str(state.device) if state.processes > 1 else default_device(config.device)
    model.to(device)
    # LoRA keeps the zero counts only (its base weights are frozen); full tuning needs the masks for its gradients
    masks = capture_masks(model) if config.method == "full" else None
    counts = zero_counts(model)
    zeros_before = sum(counts.values())
    if zeros_before == 0:
        logger.warning("the model has no pruned weights; nothing to preserve, fine-tuning anyway")
    dataset = TokenRows(build_dataset(config, tokenizer, data_cache))
    model.config.use_cache = False
    # Seed before the adapters are made: their random init must not depend on what this process did before
    # (an experiment resumed in a new process must give the same model as an uninterrupted one).
    from transformers import set_seed
    set_seed(config.seed)
    if config.method == "lora":
        require("peft", "finetune", "LoRA fine-tuning")
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=_lora_targets(model), task_type="CAUSAL_LM",
                          fan_in_fan_out=any(not isinstance(m, torch.nn.Linear)
                                             for m in models.prunable_matrices(model).values()))
        train_model = get_peft_model(model, lcfg)
        if config.dropout_rng == "hash":
            use_hash_dropout(train_model)
        hooks, callbacks = [], []
    else:
        train_model = model
        hooks, reapply = mask_gradients(model, masks)

        class ReapplyMask(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                reapply()
        callbacks = [ReapplyMask()]

    callbacks.append(_trim_callback())
    use_cuda = device.startswith("cuda")
    bf16 = config.autocast == "bf16" or (config.autocast == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=config.steps, learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        report_to=[], seed=config.seed, use_cpu=not use_cuda, bf16=bf16,
        remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="cosine", warmup_steps=0,
        disable_tqdm=None)
    # the output layer only where the loss reads it (transformers' logits_to_keep, in nearly every causal LM); not
    # under DataParallel (several GPUs in one process), which would split the position list between replicas
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters and args.n_gpu <= 1
    trainer = Trainer(model=train_model, args=args, train_dataset=dataset,
                      data_collator=_Collator(tokenizer.pad_token_id or tokenizer.eos_token_id, keep),
                      compute_loss_func=answer_loss, callbacks=callbacks)
    has_ckpt = resume and any(Path(work_dir).glob("checkpoint-*"))
    out = trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    for h in hooks:
        h.remove()
    adapter = None
    if config.method == "lora":
        adapter = train_model
        model = merge_lora_through_mask(train_model, counts) if config.merge else train_model
        if config.merge:
            check_zero_counts(model, counts)
    else:
        check_masks(model, masks)
    model.eval()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    record = {**asdict(config), "bos": resolve_bos(tokenizer, config.bos), "device": device,
              "processes": state.processes, "parallel": state.kind, "autocast": "bf16" if bf16 else "fp32",
              "dtype": str(next(model.parameters()).dtype), "final_loss": losses[-1][1] if losses else out.training_loss,
              "first_loss": losses[0][1] if losses else None, "train_loss": out.training_loss,
              "examples": len(dataset), "zeros_preserved": zeros_before,
              "train_seconds": round(out.metrics.get("train_runtime", math.nan), 1),
              "tokens_per_second": _tokens_per_second(dataset, config, out)}
    return {"model": model, "adapter": adapter, "record": record, "losses": losses}


def _trim_callback():
    from transformers import TrainerCallback

    class TrimHeap(TrainerCallback):
        """Free heap pages back to the OS after every step: steps of different lengths leave fragments of their
        activations below glibc's mmap threshold, and without this the RSS of a SQuAD LoRA stage climbed from step
        to step (25 SQuAD steps alone: peak 2,725 MiB without, 2,577 with it; the same model bit for bit)."""
        def on_step_end(self, args, state, control, **kw):
            trim_heap()
    return TrimHeap()


@dataclass
class LaunchState:
    processes: int
    fsdp: bool
    device: object
    is_main: bool
    barrier: object

    @property
    def kind(self) -> str:
        return "single" if self.processes == 1 else ("FSDP" if self.fsdp else "DDP")


def _refuse_fsdp(state: LaunchState) -> None:
    if state.fsdp:
        raise HybridPruneError("fine-tuning under FSDP is refused: FSDP shards every weight across processes, so "
                               "the masked gradients (full) and the merge through the mask (LoRA) would each see a "
                               "shard, and the path is untested (accelerate runs FSDP on GPUs only); launch without "
                               "--use_fsdp (DDP: every process holds the whole model)")


def launch_state() -> LaunchState:
    """How this process was started: alone, or as one of several under `accelerate launch` / torchrun (which set
    WORLD_SIZE, RANK and LOCAL_RANK): DDP, or FSDP when accelerate's FSDP plugin is switched on."""
    import os
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if processes > 1 and torch.cuda.is_available() else torch.device("cpu")

    def barrier():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    return LaunchState(processes, fsdp, device, int(os.environ.get("RANK", "0")) == 0, barrier)


def _tokens_per_second(dataset, config, out) -> float:
    mean_len = len(dataset.ids) / len(dataset)
    tokens = config.steps * config.batch_size * config.grad_accum * mean_len
    return round(tokens / max(out.metrics.get("train_runtime", 1.0), 1e-9), 1)


def finetune_and_save(model_spec: str, config: FinetuneConfig, out, overwrite=False, resume=False, dtype=None,
                      trust_remote_code: bool = False, data_cache=None):
    """Load, fine-tune, check the zero set, save (model, record, loss curve PNG, adapter unless merged)."""
    require("matplotlib", "finetune", "fine-tuning (its loss curve, loss.png)")  # before training, not after
    out = Path(out)
    if out.exists() and not overwrite:
        raise HybridPruneError(f"output folder {out} exists; pass --overwrite or choose another --out")
    state = launch_state()
    _refuse_fsdp(state)  # before any weight is read
    model, tok = load.load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    work = out.with_name(out.name + ".checkpoints")
    try:
        res = finetune(model, tok, config, work, resume=resume, data_cache=data_cache)
    except BaseException:
        if work.is_dir() and not any(work.glob("checkpoint-*")):  # nothing to resume from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not state.is_main:  # every process trained the same weights; the main one writes them
        state.barrier()
        return res
    prior = read_record(model_spec) if Path(model_spec).is_dir() else None
    folder = Path(model_spec) if Path(model_spec).is_dir() else None
    save_finetuned(res, tok, out, finetuned_record(prior, model_spec, res), config.merge,
                   load_tier_maps(folder) if folder else {}, load_permutations(folder) if folder else {},
                   overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    state.barrier()
    return res


def finetuned_record(prior: dict | None, source: str, res: dict) -> dict:
    """hybridprune.json of a fine-tuned model: its input's record (or its source) with the run's "finetune"."""
    record = {**(prior or {"model": source}), "finetune": res["record"]}
    record.pop("packed", None)  # a packed input is saved unpacked (pack the result with `hybridprune pack`)
    return record


def save_finetuned(res: dict, tokenizer, out, record: dict, merged: bool, tier_maps: dict,
                   permutations: dict, overwrite: bool = False) -> Path:
    """Save what finetune() returned: the model, its record, the loss curve (PNG and JSON), the adapter unless it
    was merged, and the input's tier maps and column orders, which stay valid (no weight moved between zero and
    non-zero)."""
    from hybridprune.core.plots import plot_loss

    keep_adapter = res["adapter"] is not None and not merged
    with tempfile.TemporaryDirectory() as adapter_dir:
        if keep_adapter:
            # The folder must load as a plain model: save the adapter, then take the LoRA modules out unmerged.
            res["adapter"].save_pretrained(adapter_dir)
            res["model"] = res["adapter"].unload()

        def extra(tmp):
            plot_loss(res["losses"], tmp / "loss.png")
            (tmp / "loss.json").write_text(json.dumps(res["losses"]))
            if keep_adapter:
                shutil.copytree(adapter_dir, tmp / "adapter")
            save_maps(tmp, tier_maps, permutations)

        return models.save_model(res["model"], tokenizer, out, record, overwrite=overwrite, extra=extra)
