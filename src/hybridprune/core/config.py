"""The options of each step, defined once: a plain dataclass per step whose fields carry their help text.

The CLI's flags (cli.py) and the recipe's keys (experiments/recipe.py) are built from these fields, with the same
defaults, so an option is added in one place. Construction checks every value (through core.specs) and imports no
torch and probes no device: `PruneConfig(device="cuda")` builds on any machine, and the device is resolved when
the engine uses it. A mistake raises HybridPruneError naming the Python parameter; the CLI names its flag instead
(`naming`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from hybridprune.core import specs
from hybridprune.core.errors import HybridPruneError

_NAMES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("hybridprune_names", default=None)


@contextlib.contextmanager
def naming(flags: dict[str, str]):
    """Within the block, errors name options by these spellings (field -> '--flag'): the CLI's flags."""
    token = _NAMES.set(flags)
    try:
        yield
    finally:
        _NAMES.reset(token)


def name(option: str) -> str:
    """How an error spells an option: its CLI flag inside `naming`, else the Python parameter."""
    flags = _NAMES.get()
    if flags is None:
        return option
    return flags.get(option, "--" + option.replace("_", "-"))


def option(default: Any, help: str, *, flag: str | None = None, type: Callable | None = None,
           parse: Callable | None = None, choices: tuple | None = None, metavar: str | None = None,
           repeat: bool = False, negate: str | None = None, cli: bool = True, recipe: str | bool = True) -> Any:
    """A config field with what the CLI and the recipe need to offer it.

    flag: the CLI flag (default --field-name); type: the CLI's value type (default: the default's type);
    parse: CLI text -> value; repeat: a repeatable, comma-separated list flag (None until given);
    negate: a store_false flag (e.g. --no-merge) for a boolean that defaults to True;
    cli / recipe: False where the option is set another way (recipe may name that way, e.g. "calibration:").
    """
    meta = dict(help=help, flag=flag, type=type, parse=parse, choices=choices, metavar=metavar, repeat=repeat,
                negate=negate, cli=cli, recipe=recipe)
    return field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def recipe_keys(cls) -> list[str]:
    """The fields a recipe may set under the step's own section (prune: / finetune: NAME:)."""
    return [f.name for f in fields(cls) if f.metadata.get("recipe") is True]


def _tiers(value) -> tuple[float, float, float]:
    return specs.parse_tiers(value)


def _names(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); 'none' -> () (a list flag's way to say: nothing)."""
    return tuple(s for s in str(text).split(",") if s and s != "none")


@dataclass
class PruneConfig:
    """How to prune: the method, the pattern and its options, the calibration data."""

    method: str = option("wanda", "magnitude | wanda | ria | sparsegpt", choices=specs.METHODS)
    pattern: str = option("unstructured", "unstructured | N:M such as 2:4 or 4:8 | three-tier | block | block-topk")
    sparsity: float = option(0.5, "target sparsity for unstructured, block and block-topk")
    group: str | None = option(None, "unstructured comparison group: row | matrix (default: each method's paper: "
                               "row for wanda and magnitude, matrix, i.e. rows x 128-column block, for sparsegpt)",
                               type=str)
    calib: str = option("wikitext2", "calibration text: wikitext2 | c4 | squad | gsm8k | boolq | self (the model "
                        "writes it) | self:SOURCE (the model continues prefixes of SOURCE; the most perplexing "
                        "share is dropped) | mixed:wikitext2=0.5,self=0.5", recipe="calibration:")
    calib_select: str = option("random", "how the nsamples windows are chosen: random | diversity (greedily, from "
                               "a pool of random windows, the set that covers the most distinct tokens)",
                               choices=specs.CALIB_SELECT)
    calib_pool: int = option(0, f"--calib-select diversity: candidate windows (0 = {specs.SELECT_POOL} x nsamples)")
    self_filter: float = option(specs.SELF_FILTER, "self:SOURCE: the share of generations dropped, those of highest "
                                "perplexity (Ji et al. 2025), in [0, 1)")
    self_prefix: int = option(specs.SELF_PREFIX_TOKENS, "self:SOURCE: prefix tokens drawn from SOURCE")
    self_batch: int = option(32, "self, self:SOURCE: sequences generated together (bounds the KV cache; with "
                             "--self-dtype float32 the text is the same at any value)")
    self_dtype: str = option("auto", "self, self:SOURCE: what the generating model's linear layers multiply in: "
                             "auto (bfloat16 where the CPU or GPU multiplies it natively, else float32) | float32 | "
                             "bfloat16 (the weights stay float32; a bfloat16 copy is held while generating)",
                             choices=specs.SELF_DTYPES)
    nsamples: int = option(128, "calibration sequences")
    seqlen: int = option(2048, "tokens per calibration sequence")
    seed: int = option(0, "seed of the calibration draw (a recipe's seeds: axis sets it per run)")
    batch_size: int = option(1, "calibration micro-batch (bounds activation memory)")
    device: str | None = option(None, "where each layer is computed: cpu | cuda | cuda:N (default: cuda if "
                                "available)", type=str, recipe="--device of `hybridprune experiment`")
    skip: tuple[str, ...] = option((), "leave matching matrices or layers dense, e.g. down_proj or layers.0 "
                                   "(repeatable, comma-separated)", repeat=True, metavar="PATTERN")
    squad_format: str = option("context_question", "SQuAD calibration text: context | context_question | labeled",
                               choices=tuple(specs.SQUAD_FORMATS))
    data_dir: str | None = option(None, "data directory in the layout of shared/data (default: $HYBRIDPRUNE_DATA, "
                                  "else the Hugging Face hub)", type=str,
                                  recipe="--data-dir of `hybridprune experiment`")
    sparsegpt_block: int = option(128, "SparseGPT's column block: lazy updates and mask selection (a multiple of M "
                                  "for N:M)")
    percdamp: float = option(0.01, "SparseGPT's dampening, a fraction of the mean diagonal of the Hessian")
    tiers: tuple[float, float, float] = option((0.35, 0.45, 0.20), "three-tier block fractions dense,N:M,top-k "
                                               "(sum 1)", parse=_tiers, metavar="D,N,K")
    block_size: int = option(16, "block edge of three-tier, block and block-topk")
    tier_nm: str = option("2:4", "N:M inside tier-2 blocks")
    topk: int = option(15, "weights kept in each tier-3 block")
    tier_metric: str | None = option(None, "picks weights inside tiers 2 and 3: wanda | ria | sparsegpt | magnitude "
                                     "(default: the method's own score)", type=str)
    scope: str = option("layer", "where blocks are ranked: layer | matrix (the original design) | model",
                        flag="--tier-scope")
    retention: float | None = option(None, "adaptive: an N:M candidate block stays dense if N:M keeps less than "
                                     "this share of its score", type=float)
    block_score: str = option("mean", "how blocks are ranked: mean (mean score) | row (mean of each weight's score "
                              "relative to its output row's mean)")
    refit: int | None = option(None, "after masking, refit the kept weights of each matrix by least squares to the "
                               "unpruned outputs on the calibration inputs (conjugate-gradient steps; 0 = off). "
                               "Default: 10 for block patterns with method wanda, 0 otherwise", type=int,
                               metavar="STEPS")
    bos: str = option("auto", "BOS token at the start of every calibration window: auto (if the tokenizer adds one "
                      "itself) | always | papers (text tokenized once, then cut: the Wanda/SparseGPT convention)",
                      choices=specs.BOS_POLICIES)
    layer_sparsity: str = option("uniform", "uniform | owl: OWL (Yin et al. 2024) gives layers with more outliers "
                                 "a lower sparsity, spread over 2 lambda around s at the same overall sparsity")
    owl_m: float = option(specs.OWL_M, "OWL: an outlier scores above M x its layer's mean")
    owl_lambda: float = option(specs.OWL_LAMBDA, "OWL: the largest change of a layer's sparsity")
    dsnot: bool = option(False, "DSnoT (Zhang et al. 2024): training-free prune-and-grow swaps that shrink each row's "
                         "expected reconstruction error; sparsity and pattern rules stay exact")
    dsnot_cycles: int = option(specs.DSNOT_CYCLES, "DSnoT: swaps per row at most")
    dsnot_threshold: float = option(specs.DSNOT_THRESHOLD, "DSnoT: stop a row once |error| <= this")
    dsnot_skip: tuple[str, ...] = option(specs.DSNOT_SKIP, "matrices DSnoT leaves with their first mask (default: mlp, "
                                         "as DSnoT's reference code; none refines every matrix)", repeat=True,
                                         metavar="PATTERN")
    dsnot_same_sign: bool = option(False, "DSnoT, our variant: on unstructured masks refuse a swap that flips the "
                                   "sign of the row's error (the reference code checks the sign only inside N:M "
                                   "groups)")
    channel_permutation: str = option("none", "N:M only, RIA's channel permutation (Zhang et al. 2024): none | "
                                      "reallocation | lsa (reallocation, then linear-sum-assignment rounds); the "
                                      "column order is saved with the model", choices=specs.CHANNEL_PERMUTATIONS)

    def __post_init__(self):
        # Every value is checked here, before any model or data is loaded.
        n = name
        if self.method not in specs.METHODS:
            raise HybridPruneError(f"unknown method {self.method!r}; use one of: {', '.join(specs.METHODS)}")
        if self.batch_size < 1:
            raise HybridPruneError(f"{n('batch_size')} must be >= 1, got {self.batch_size}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise HybridPruneError(f"need {n('nsamples')} >= 1 and {n('seqlen')} >= 2, got {self.nsamples} and "
                                   f"{self.seqlen}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise HybridPruneError(f"{n('percdamp')} must be a finite number >= 0 (SparseGPT uses 0.01), got "
                                   f"{self.percdamp}")
        if self.squad_format not in specs.SQUAD_FORMATS:
            raise HybridPruneError(f"unknown {n('squad_format')} {self.squad_format!r}; use one of: "
                                   f"{', '.join(specs.SQUAD_FORMATS)}")
        specs.check_bos(self.bos)
        specs.parse_calib(self.calib)  # magnitude reads none, but records it: a typo is refused all the same
        self._check_calibration_choice()
        specs.check_device_name(self.device)
        self.skip = tuple(self.skip or ())
        pattern = self.build_pattern()
        if self.sparsegpt_block < 1:
            raise HybridPruneError(f"{n('sparsegpt_block')} must be a positive number of columns, got "
                                   f"{self.sparsegpt_block}")
        if self.method == "sparsegpt" and isinstance(pattern, specs.NM) and self.sparsegpt_block % pattern.m:
            raise HybridPruneError(f"{n('sparsegpt_block')} {self.sparsegpt_block} is not a multiple of "
                                   f"M={pattern.m}; N:M groups would straddle two blocks (use e.g. 128)")
        if isinstance(pattern, specs.TieredBlocks):
            if not specs.needs_calibration(self.method) and pattern.tier_metric != "magnitude":
                raise HybridPruneError(f"{n('tier_metric')} {pattern.tier_metric} needs calibration statistics; "
                                       f"use {n('method')} {pattern.tier_metric} or {n('tier_metric')} magnitude")
            if pattern.tier_metric == "sparsegpt" and self.method != "sparsegpt":
                raise HybridPruneError(f"{n('tier_metric')} sparsegpt needs {n('method')} sparsegpt (its inverse "
                                       "Hessians)")
        self.dsnot_skip = tuple(self.dsnot_skip or ())
        if self.dsnot:
            if self.method not in ("wanda", "ria"):
                raise HybridPruneError(f"{n('dsnot')} refines a Wanda or RIA mask with their calibration statistics; "
                                       f"use {n('method')} wanda or ria, not {self.method}")
            if not isinstance(self.dsnot_cycles, int) or self.dsnot_cycles < 1:
                raise HybridPruneError(f"{n('dsnot_cycles')} must be a whole number >= 1, got {self.dsnot_cycles}")
            if not (math.isfinite(self.dsnot_threshold) and self.dsnot_threshold >= 0):
                raise HybridPruneError(f"{n('dsnot_threshold')} must be a finite number >= 0, got "
                                       f"{self.dsnot_threshold}")
        if self.channel_permutation not in specs.CHANNEL_PERMUTATIONS:
            raise HybridPruneError(f"unknown {n('channel_permutation')} {self.channel_permutation!r}; use one of: "
                                   f"{', '.join(specs.CHANNEL_PERMUTATIONS)}")
        if self.channel_permutation != "none":
            if not isinstance(pattern, specs.NM):
                raise HybridPruneError(f"{n('channel_permutation')} reorders the columns of N:M groups; it needs an "
                                       f"N:M {n('pattern')} such as 2:4, not {self.pattern}")
            if self.method == "sparsegpt":
                raise HybridPruneError(f"{n('channel_permutation')} orders columns by a score before masking, "
                                       f"SparseGPT picks its mask while it updates the weights; use {n('method')} "
                                       "ria or wanda")
        if self.layer_sparsity not in ("uniform", "owl"):
            raise HybridPruneError(f"unknown {n('layer_sparsity')} {self.layer_sparsity!r}; use uniform or owl")
        if self.layer_sparsity == "owl":
            specs.check_owl(pattern, self.owl_m, self.owl_lambda)
        if self.refit is not None and self.refit < 0:
            raise HybridPruneError(f"{n('refit')} {self.refit} must be >= 0 (0 turns the refit off)")
        if self.refit and not specs.needs_calibration(self.method):
            raise HybridPruneError(f"{n('refit')} needs calibration statistics, which method {self.method} does not "
                                   f"collect; use {n('method')} wanda or {n('refit')} 0")

    def _check_calibration_choice(self) -> None:
        n = name
        if self.calib_select not in specs.CALIB_SELECT:
            raise HybridPruneError(f"unknown {n('calib_select')} {self.calib_select!r}; use one of: "
                                   f"{', '.join(specs.CALIB_SELECT)}")
        if self.self_dtype not in specs.SELF_DTYPES:
            raise HybridPruneError(f"unknown {n('self_dtype')} {self.self_dtype!r}; use one of: "
                                   f"{', '.join(specs.SELF_DTYPES)}")
        if not isinstance(self.calib_pool, int) or self.calib_pool < 0:
            raise HybridPruneError(f"{n('calib_pool')} must be a whole number >= 0, got {self.calib_pool}")
        if self.calib_pool and self.calib_select == "random":
            raise HybridPruneError(f"{n('calib_pool')} sizes the pool that {n('calib_select')} diversity picks from; "
                                   f"add {n('calib_select')} diversity or drop {n('calib_pool')}")
        if self.calib_select == "diversity":
            if self.calib_pool and self.calib_pool < self.nsamples:
                raise HybridPruneError(f"{n('calib_pool')} {self.calib_pool} is smaller than {n('nsamples')} "
                                       f"{self.nsamples}; the pool must hold at least the windows picked from it")
            if specs.generates(self.calib):
                raise HybridPruneError(f"{n('calib_select')} diversity picks from drawn windows, not from generated "
                                       f"text ({self.calib}); generated sources are filtered by perplexity instead")
        if not (isinstance(self.self_filter, (int, float)) and 0 <= self.self_filter < 1):
            raise HybridPruneError(f"{n('self_filter')} is the share of generations dropped; it must be in [0, 1), "
                                   f"got {self.self_filter}")
        if self.self_prefix < 1 or self.self_batch < 1:
            raise HybridPruneError(f"need {n('self_prefix')} >= 1 and {n('self_batch')} >= 1, got "
                                   f"{self.self_prefix} and {self.self_batch}")
        if any(c.startswith(specs.SELF_PREFIX) for c, _ in specs.parse_calib(self.calib)) and \
                self.self_prefix >= self.seqlen:
            raise HybridPruneError(f"{n('self_prefix')} {self.self_prefix} leaves nothing to generate in "
                                   f"{n('seqlen')} {self.seqlen} tokens; use a shorter prefix")

    def select_pool(self) -> int:
        """The candidate windows --calib-select diversity picks from."""
        return self.calib_pool or specs.SELECT_POOL * self.nsamples

    def comparison_group(self) -> str:
        return self.group or ("matrix" if self.method == "sparsegpt" else "row")

    def pattern_options(self) -> dict:
        """make_pattern's keyword arguments for this config."""
        return dict(group=self.comparison_group(), tiers=self.tiers, block_size=self.block_size, nm=self.tier_nm,
                    topk=self.topk, tier_metric=self.tier_metric or self.method, scope=self.scope,
                    retention=self.retention, block_score=self.block_score)

    def build_pattern(self):
        """The pattern's spec (core.specs); pruning.patterns.make_pattern builds the same one with its masks."""
        return specs.make_pattern(self.pattern, self.sparsity, **self.pattern_options())

    def refit_steps(self) -> int:
        """The refit asked for, or the default for this pattern and method (resolved late: replace() may change
        them)."""
        if self.refit is not None:
            return self.refit
        return 10 if self.method == "wanda" and isinstance(self.build_pattern(), specs.TieredBlocks) else 0

    def record(self) -> dict:
        rec = asdict(self)
        rec["refit"] = self.refit_steps()
        rec["group"] = self.comparison_group()
        rec["tier_metric"] = self.tier_metric or self.method
        rec["pattern_detail"] = self.build_pattern().describe()
        if self.channel_permutation != "none":  # what packing and inspect read: groups in the saved column order
            rec["pattern_detail"]["channel_permutation"] = self.channel_permutation
        return rec


# how --help groups PruneConfig's flags (a field not named here goes to the first group)
PRUNE_GROUPS = {
    "pattern": ("method", "pattern", "sparsity", "group", "skip", "sparsegpt_block", "percdamp",
                "channel_permutation"),
    "calibration": ("calib", "nsamples", "seqlen", "seed", "batch_size", "squad_format", "calib_select",
                    "calib_pool", "self_filter", "self_prefix", "self_batch", "self_dtype"),
    "three-tier and block patterns": ("tiers", "block_size", "tier_nm", "topk", "tier_metric", "scope", "retention",
                                      "block_score", "refit"),
    "layer-wise sparsity (OWL)": ("layer_sparsity", "owl_m", "owl_lambda"),
    "mask refinement (DSnoT)": ("dsnot", "dsnot_cycles", "dsnot_threshold", "dsnot_skip", "dsnot_same_sign"),
}

FT_DATA = ("squad", "gsm8k", "boolq", "wikitext2", "c4")
TEMPLATE_NAMES = {"squad": ("simple", "alpaca"), "gsm8k": ("simple",), "boolq": ("simple",)}  # and "chat"


@dataclass
class FinetuneConfig:
    """How to fine-tune without regrowing a pruned weight: the data, its template, LoRA or full, the schedule."""

    data: str = option("wikitext2", "squad | gsm8k | boolq | wikitext2 | c4", choices=FT_DATA, flag="--data")
    template: str = option("simple", "simple | alpaca (squad) | chat (the model's chat template)")
    method: str = option("lora", "lora | full", choices=("lora", "full"))
    steps: int = option(200, "optimizer steps")
    lr: float = option(1e-4, "learning rate")
    batch_size: int = option(8, "sequences per step (per device)")
    grad_accum: int = option(1, "micro-batches accumulated per step")
    gradient_checkpointing: bool = option(True, "recompute each layer's activations in the backward pass (memory of "
                                          "one layer)", negate="--no-gradient-checkpointing")
    seqlen: int = option(512, "tokens per training sequence")
    seed: int = option(0, "seed of the LoRA initialisation and the data order (a recipe's seeds: axis sets it)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    merge: bool = option(True, "merge the LoRA adapter through the mask (--no-merge keeps the adapter)",
                         negate="--no-merge")
    max_examples: int | None = option(None, "use only the first N training examples", type=int, metavar="N")
    data_dir: str | None = option(None, "data directory in the layout of shared/data", type=str,
                                  recipe="--data-dir of `hybridprune experiment`")
    logging_steps: int = option(5, "log the loss every N steps", metavar="N")
    save_steps: int = option(50, "checkpoint every N steps (for --resume)", metavar="N")
    device: str | None = option(None, "where training runs (default: cuda if available)", type=str,
                                recipe="--device of `hybridprune experiment`")
    bos: str = option("auto", "BOS at the start of every training sequence: auto | always | papers",
                      choices=specs.BOS_POLICIES)
    autocast: str = option("auto", "auto: bf16 autocast on a GPU that has bf16, fp32 elsewhere; bf16: matmuls in "
                           "bfloat16 on any device (weights and optimizer stay fp32); fp32: never",
                           choices=("auto", "bf16", "fp32"))
    dropout_rng: str = option("torch", "LoRA dropout's masks: torch (nn.Dropout) or hash (the same distribution "
                              "hashed from the element index: ~12x faster on a CPU, a different random draw)",
                              choices=("torch", "hash"))

    def __post_init__(self):
        # Every value is checked before any model is loaded or any checkpoint folder is made.
        n = name
        positive = ("steps", "batch_size", "grad_accum", "lora_r", "logging_steps", "save_steps")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise HybridPruneError(f"{n(key)} must be a whole number >= 1, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise HybridPruneError(f"{n('lr')} must be a finite number > 0 (e.g. 1e-4), got {self.lr}")
        if self.seqlen < 2:
            raise HybridPruneError(f"{n('seqlen')} must be >= 2, got {self.seqlen}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise HybridPruneError(f"{n('lora_alpha')} must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise HybridPruneError(f"{n('lora_dropout')} must be within [0, 1), got {self.lora_dropout}")
        if self.max_examples is not None and self.max_examples < 1:
            raise HybridPruneError(f"{n('max_examples')} must be >= 1, got {self.max_examples}")
        specs.check_bos(self.bos)
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise HybridPruneError(f"{n('autocast')} must be auto, bf16 or fp32, got {self.autocast!r}")
        if self.dropout_rng not in ("torch", "hash"):
            raise HybridPruneError(f"{n('dropout_rng')} must be torch or hash, got {self.dropout_rng!r}")
        specs.check_device_name(self.device)
        if self.data not in FT_DATA:
            raise HybridPruneError(f"unknown fine-tuning data {self.data!r}; use one of: {', '.join(FT_DATA)}")
        if self.method not in ("lora", "full"):
            raise HybridPruneError(f"unknown fine-tuning method {self.method!r}; use lora or full")
        if self.data in TEMPLATE_NAMES and self.template != "chat" and self.template not in TEMPLATE_NAMES[self.data]:
            raise HybridPruneError(f"unknown template {self.template!r} for {self.data}; use one of: "
                                   f"{', '.join([*TEMPLATE_NAMES[self.data], 'chat'])}")
