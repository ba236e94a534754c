"""Layer-by-layer pruning of any Hugging Face causal LM: the whole algorithm is in this file.

    samples --embed--> inputs of decoder layer 0 (captured with every keyword argument the model passes)
    for each decoder layer, on --device:
        pass 1: run the layer on all micro-batches, hooks on its Linear/Conv1D modules collect input
                statistics (column norms; Hessians for SparseGPT). The pass stops as soon as the last
                matrix has seen its input, so the layer's final matrix is never computed here.
        prune:  score every matrix, build the pattern's keep-mask, zero (SparseGPT: also reconstruct;
                --refit: least-squares refit of the kept weights, on by default for block patterns)
        pass 2: run the pruned layer; its outputs are the next layer's inputs
    ->  the model, pruned in place, and per-matrix tier maps for block patterns.

Statistics for layer i therefore come from inputs that went through the already-pruned layers 0..i-1.
Memory: one layer on the device, plus the calibration activations (nsamples x seqlen x hidden).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.io import folder as folder_format
from hybridprune.core.config import PruneConfig
from hybridprune.io import models
from hybridprune.io.models import default_device  # noqa: F401
from hybridprune.io.data import resolve_bos
from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import generates
from hybridprune.pruning import calibration
from hybridprune.pruning.dsnot import nm_groups, refine, refine_permuted, tier_groups
from hybridprune.pruning.layerwise import layer_pattern, outlier_ratio, owl_sparsities
from hybridprune.pruning.patterns import NM, TieredBlocks, assign_tiers, expand_tiers, pattern_of, permute_channels, tier_counts
from hybridprune.pruning.scoring import InputStats, inverse_hessian, needs_calibration, refit_kept, score, sparsegpt_prune


@dataclass
class PruneResult:
    tier_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    pattern: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)  # matrices no calibration token reached (MoE experts)
    bos: str = ""                                           # the BOS policy the calibration windows used
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # OWL: each layer's target
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)  # N:M column order per matrix (RIA)
    calibration: dict = field(default_factory=dict)  # how the windows were drawn, selected or generated
    texts: list[dict] = field(default_factory=list)  # generated calibration text (calibration.jsonl)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early once the wanted inputs are seen."""


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, batch_size: int, device):
    """Run micro-batches up to decoder layer 0 and keep its inputs: (hidden, extra args, kwargs) per batch.

    Whatever the model passes (attention mask, position ids, rotary position_embeddings, cache_position)
    is kept as it is, so this follows each family and transformers release without special cases.
    """
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: (None if k in ("past_key_value", "past_key_values", "layer_past") else _to(v, device))
                  for k, v in kwargs.items()}
        captured.append([hidden.to(device), _to(tuple(args[1:]), device), kwargs])
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    embed_device = models.input_device(model)
    try:
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch.to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _non_finite(where: str) -> HybridPruneError:
    return HybridPruneError(f"calibration activations became non-finite at {where}; the model overflows in this "
                            "dtype (try --dtype float32) or holds bad weights")


def _check_finite(batches, where: str) -> None:
    if any(not torch.isfinite(b[0]).all() for b in batches):
        raise _non_finite(where)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse NaN/inf weights up front: their scores would silently leave later layers barely pruned."""
    for name, mod in models.prunable_matrices(model).items():
        refuse_non_finite(name, mod.weight)


def refuse_non_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise HybridPruneError(f"{name} holds {int((~torch.isfinite(weight)).sum())} non-finite weights (NaN/inf); "
                               "repair or re-download the checkpoint before pruning")


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_stats(layer: nn.Module, linears: dict[str, nn.Module], batches, hessian: bool,
                  moments: bool = False, outputs: bool = False) -> dict[str, InputStats]:
    """Pass 1: input statistics of every matrix. Matrices reading the same tensor share one InputStats.
    outputs: run each batch through the whole layer and put its output in place of the batch's input (a
    scoring pass that prunes nothing needs no second forward); otherwise stop after the last matrix."""
    stats: dict[str, InputStats] = {}
    state = {"seen": {}, "fired": set()}

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key in state["seen"]:
                stats[name] = state["seen"][key][1]
            else:
                st = stats.setdefault(name, InputStats(x.shape[-1], x.device, hessian, moments))
                st.add(x)
                state["seen"][key] = (x, st)  # holding x keeps its memory from being reused this pass
            state["fired"].add(name)
            if len(state["fired"]) == len(linears) and not outputs:
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        for b in batches:
            state["seen"], state["fired"] = {}, set()
            try:
                out = layer(b[0], *b[1], **b[2])
                if outputs:
                    b[0] = _layer_output(out)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        state["seen"] = {}
    return stats


def layer_budgets(pattern: TieredBlocks, block_scores: dict[str, torch.Tensor], floors=None) -> dict[str, tuple]:
    """Rank blocks of several matrices together (tier scope layer or model).

    Scores are made comparable by dividing each matrix's block scores by that matrix's mean block score:
    activation scales differ by orders of magnitude between e.g. q_proj and down_proj, and raw scores would
    hand whole matrices to one tier. What decides a block's tier is then how much it stands out in its matrix.
    """
    names = list(block_scores)
    flat = [(block_scores[n] / block_scores[n].mean().clamp_min(1e-30)).reshape(-1).cpu() for n in names]
    sizes = [f.numel() for f in flat]
    floor = None
    if floors:
        floor = torch.cat([floors[n].reshape(-1).cpu() if n in floors else torch.zeros(s, dtype=torch.int8)
                           for n, s in zip(names, sizes)])
    tiers = assign_tiers(torch.cat(flat), tier_counts(sum(sizes), pattern.tiers), floor)
    out = {}
    for n, t in zip(names, tiers.split(sizes)):
        out[n] = (int((t == 0).sum()), int((t == 1).sum()), int((t == 2).sum()))
    return out


class _Pruner:
    """Holds the run's settings while the layer loop visits each decoder layer."""

    def __init__(self, model, config: PruneConfig, floors=None, stream=None):
        self.model, self.config, self.stream = model, config, stream
        self.pattern = pattern_of(config)
        self.tiered = isinstance(self.pattern, TieredBlocks)
        self.floors = floors or {}
        self.budgets: dict[str, tuple] = {}
        self.prefix, self.layers = models.find_decoder_layers(model)
        self.device = default_device(config.device)
        self.calibrated = needs_calibration(config.method)
        self.refit = config.refit_steps()
        self.skipped: list[str] = []
        self.uncalibrated: list[str] = []
        self.layer_patterns: dict[int, object] = {}  # OWL: a pattern per layer
        self.outliers: list[float] = []              # OWL: each layer's outlier ratio (scoring pass)
        self.sizes: list[int] = []
        self.permutations: dict[str, torch.Tensor] = {}  # N:M column order per matrix (channel permutation)

    def check_skip(self) -> None:
        """Every --skip pattern must match a matrix: a typo would otherwise prune everything, recorded as skipping
        nothing. The error names the closest names."""
        import difflib
        names = [f"{self.prefix}.{i}.{n}" for i, layer in enumerate(self.layers) for n in models.find_linears(layer)]
        for pattern in self.config.skip:
            if not any(models.name_matches(n, pattern) for n in names):
                parts = sorted({c for n in names for c in n.split(".") if not c.isdigit()} | {"layers.0"})
                close = difflib.get_close_matches(pattern, parts, n=3, cutoff=0.5) or parts[:5]
                raise HybridPruneError(f"--skip {pattern!r} matches no prunable matrix; closest names: "
                                       f"{', '.join(close)} (e.g. {names[0]})")

    def linears(self, i: int, layer: nn.Module) -> dict[str, nn.Module]:
        out = {}
        for name, mod in models.find_linears(layer).items():
            full = f"{self.prefix}.{i}.{name}"
            if any(models.name_matches(full, p) for p in self.config.skip):
                self.skipped.append(full)
            else:
                out[name] = mod
        return out

    def inverse_hessians(self, linears, stats) -> dict:
        """SparseGPT's (inverse Hessian factor, dead columns) per matrix, None where there is none; matrices that
        share an input (q/k/v, gate/up) share one factorisation."""
        cache, out = {}, {}
        for name in linears:
            st = stats.get(name)
            if self.config.method != "sparsegpt" or st is None or not st.tokens:
                out[name] = None
                continue
            if id(st) not in cache:
                cache[id(st)] = inverse_hessian(st.H, self.config.percdamp)
            out[name] = cache[id(st)]
        return out

    def scores(self, linears, stats, hinv):
        """Per-matrix (ranking score, inner score) in float32; matrices without calibration tokens fall back
        to magnitude (and are reported)."""
        out = {}
        for name, mod in linears.items():
            W = models.weight_matrix(mod)
            st = stats.get(name)
            calibrated = st is not None and st.tokens > 0
            method = self.config.method if calibrated or not self.calibrated else "magnitude"
            s = score(method, W, st, hinv.get(name))
            inner = s
            if self.tiered and self.pattern.tier_metric != method:
                inner = score(self.pattern.tier_metric if calibrated else "magnitude", W, st, hinv.get(name))
            out[name] = (s, inner)
        return out

    def note_uncalibrated(self, i, linears, stats):
        """Matrices that no calibration token reached (MoE experts the router never picked): say so once."""
        if not self.calibrated:
            return
        missing = [f"{self.prefix}.{i}.{n}" for n in linears if stats.get(n) is None or not stats[n].tokens]
        if missing:
            self.uncalibrated.extend(missing)
            warnings.warn(f"{len(missing)} matrices of layer {i} received no calibration tokens "
                          f"({', '.join(m.rsplit('.', 2)[-2] + '.' + m.rsplit('.', 1)[-1] for m in missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}): pruned by magnitude, without reconstruction",
                          stacklevel=2)

    def dsnot(self, W, keep, mean, var, initial, pattern, tiers, perm=None):
        """DSnoT's swaps, inside the pattern's groups (N:M groups; for tiers, N:M groups and top-k block rows).
        With a channel permutation the swaps run on the columns in their saved order, where the groups are."""
        opts = dict(cycles=self.config.dsnot_cycles, threshold=self.config.dsnot_threshold,
                    same_sign=self.config.dsnot_same_sign or None)
        if perm is not None:
            return refine_permuted(W, keep, mean, var, initial, perm, pattern.m, **opts)
        groups = None
        if isinstance(pattern, NM):
            groups = nm_groups(W.shape, pattern.m, W.device)
        elif self.tiered:
            groups = tier_groups(expand_tiers(tiers, *W.shape, pattern.block_size).to(W.device),
                                 pattern.block_size, pattern.m)
        return refine(W, keep, mean, var, initial, groups, **opts)

    def prune_layer(self, i, linears, stats, tier_maps):
        self.note_uncalibrated(i, linears, stats)
        hinv = self.inverse_hessians(linears, stats)
        scores = self.scores(linears, stats, hinv)
        full = {name: f"{self.prefix}.{i}.{name}" for name in linears}
        pattern = self.layer_patterns.get(i, self.pattern)
        budgets = dict(self.budgets)
        if self.tiered and pattern.scope == "layer":
            bs = {full[n]: pattern.block_scores(s) for n, (s, _) in scores.items()}
            budgets.update(layer_budgets(pattern, bs, self.floors))
        for name, mod in linears.items():
            s, inner = scores[name]
            fname = full[name]
            W = models.weight_matrix(mod)
            floor = self.floors.get(fname)
            W0 = W.detach().float().clone() if self.refit else None
            perm = None
            if self.config.channel_permutation != "none":  # N:M groups cut from reordered columns (RIA)
                perm = permute_channels(s, pattern.n, pattern.m, lsa=self.config.channel_permutation == "lsa")
                keep = torch.empty_like(s, dtype=torch.bool).index_copy_(1, perm, pattern.keep(s[:, perm])[0])
                tiers = None
                self.permutations[fname] = perm.to("cpu", torch.int32)
            else:
                keep, tiers = pattern.keep(s, inner, floor=floor, budget=budgets.get(fname))
            st = stats.get(name)
            if self.config.dsnot and floor is None and st is not None and st.sequences and \
                    not any(models.name_matches(name, p) for p in self.config.dsnot_skip):
                keep = self.dsnot(W.detach().float(), keep, (st.sum / st.sequences).to(W.device),
                                  (st.var_sum / st.sequences).to(W.device), inner, pattern, tiers, perm)
            if floor is not None:
                keep &= W != 0  # progressive rounds never regrow a weight pruned in an earlier round
            if hinv[name] is not None:
                Wf = W.detach().float().clone()
                fixed = keep if (self.tiered or floor is not None) else None
                keep = sparsegpt_prune(Wf, hinv[name], pattern, self.config.sparsegpt_block,
                                       self.config.percdamp, fixed_keep=fixed)
                W.copy_(Wf.to(W.dtype))
            W.mul_(keep)
            if W0 is not None and st is not None and st.tokens:
                if not refit_kept(W, W0, keep, st.H, self.refit, self.config.percdamp):
                    warnings.warn(f"the refit of {fname} went non-finite; its weights are kept as masked "
                                  "(raise --percdamp or use --refit 0)", stacklevel=2)
            if tiers is not None:
                tier_maps[fname] = tiers.to("cpu", torch.int8)

    def run(self, samples, dry: bool = False, desc: str = "pruning") -> dict:
        """The layer loop. dry=True only scores (for model-scope budgets) and prunes nothing."""
        tier_maps, block_scores = {}, {}
        batches = None
        if self.calibrated:  # magnitude needs no data, also for model-scope block budgets
            if samples is None:
                raise HybridPruneError(f"method {self.config.method} needs calibration samples")
            if self.stream:
                self.stream.load_outside(self.device)
            batches = capture_layer_inputs(self.model, self.layers, samples, self.config.batch_size, self.device)
            if self.stream:
                self.stream.free_outside()
            _check_finite(batches, "the embeddings (inputs of decoder layer 0)")
        owl_pass = dry and self.config.layer_sparsity == "owl"  # outlier ratios need Wanda's scores only
        hessian = (self.config.method == "sparsegpt" and not owl_pass) or (self.refit > 0 and not dry)
        for i, layer in enumerate(tqdm(self.layers, desc=desc, unit="layer", leave=False, disable=None)):
            if self.stream:  # a layer-streamed model: read this layer's weights now, straight onto the device
                self.stream.load_layer(i, layer, self.device)
            home = next(layer.parameters()).device
            # Models dispatched by accelerate (device_map) keep each layer where it is; others visit --device.
            where = home if hasattr(self.model, "hf_device_map") else torch.device(self.device)
            moved = home != where
            if moved:
                layer.to(where)
            if batches is not None and batches[0][0].device != where:
                batches = [[h.to(where), _to(a, where), {k: _to(v, where) for k, v in kw.items()}]
                           for h, a, kw in batches]
            linears = self.linears(i, layer)
            # a scoring pass (dry) changes no weight: the forward that collects statistics also gives the outputs
            forwarded = dry and batches is not None and bool(linears) and i + 1 < len(self.layers)
            stats = collect_stats(layer, linears, batches, hessian, self.config.dsnot and not dry, forwarded) \
                if batches is not None and linears else {}
            for name, st in stats.items():
                if not torch.isfinite(st.sq).all():
                    raise _non_finite(f"the input of {self.prefix}.{i}.{name}")
            if owl_pass:  # Wanda's score (|W| without calibration data)
                owl = [score("wanda" if self.calibrated else "magnitude", models.weight_matrix(mod), stats.get(n))
                       for n, mod in linears.items()]
                self.outliers.append(outlier_ratio(owl, self.config.owl_m))
                self.sizes.append(sum(x.numel() for x in owl))
                del owl
            elif dry:
                hinv = self.inverse_hessians(linears, stats)
                for name, (s, _) in self.scores(linears, stats, hinv).items():
                    block_scores[f"{self.prefix}.{i}.{name}"] = self.pattern.block_scores(s).cpu()
            else:
                self.prune_layer(i, linears, stats, tier_maps)
            del stats
            if batches is not None and i + 1 < len(self.layers):
                if not forwarded:
                    for b in batches:
                        b[0] = _layer_output(layer(b[0], *b[1], **b[2]))
                _check_finite(batches, f"the output of decoder layer {self.prefix}.{i}")
            if moved:
                layer.to(home)
            if self.stream:  # written to its output shard (not in a scoring-only pass), then freed
                self.stream.release_layer(i, layer, write=not dry)
        return block_scores if dry else tier_maps


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig | None = None, tokenizer=None, samples: torch.Tensor | None = None,
          floors: dict[str, torch.Tensor] | None = None, stream=None,
          calib: calibration.Calibration | None = None) -> PruneResult:
    """Prune `model` in place. Calibration samples are drawn from config.calib (calibration.draw) unless given.

    floors: tier maps of a previous progressive round (blocks only move down).
    stream: a streaming.LayerStream when the model is an empty skeleton whose layers are read one at a time.
    calib: windows drawn beforehand (a streamed prune generates its self-calibration text with the whole model
    before the skeleton is filled layer by layer).
    """
    config = config or PruneConfig()
    start = time.perf_counter()
    if stream is None:
        check_finite_weights(model)
    else:
        stream.check_finite_weights()  # reads one matrix at a time
    pruner = _Pruner(model, config, floors, stream)
    pruner.check_skip()
    if not needs_calibration(config.method):
        bos = "no calibration"
    else:
        bos = "given samples" if samples is not None or tokenizer is None else resolve_bos(tokenizer, config.bos)
    if pruner.calibrated and samples is None:
        if calib is None:
            if tokenizer is None:
                raise HybridPruneError("pass a tokenizer or calibration samples for a calibrated method")
            if stream is not None and generates(config.calib):
                raise HybridPruneError("a streamed prune needs its generated calibration drawn first (calib=)")
            calib = calibration.draw(tokenizer, config, model)
        samples, bos = calib.samples, calib.bos
    was_training = model.training
    model.eval()
    if pruner.tiered and pruner.pattern.scope == "model":
        # Model scope needs every matrix's block scores before the first is pruned: one dense scoring pass.
        bs = pruner.run(samples, dry=True, desc="scoring blocks")
        pruner.budgets = layer_budgets(pruner.pattern, bs, pruner.floors)
        pruner.skipped = []
    layer_sparsity = {}
    if config.layer_sparsity == "owl":
        # OWL needs every layer's outlier ratio before the first is pruned: one dense scoring pass.
        pruner.run(samples, dry=True, desc="outlier ratios")
        pruner.skipped = []
        targets = owl_sparsities(pruner.outliers, pruner.sizes, pruner.pattern.expected_sparsity, config.owl_lambda)
        pruner.layer_patterns = {i: layer_pattern(pruner.pattern, s) for i, s in enumerate(targets)}
        layer_sparsity = {str(i): s for i, s in enumerate(targets)}
    tier_maps = pruner.run(samples)
    model.train(was_training)
    return PruneResult(tier_maps=tier_maps, seconds=time.perf_counter() - start,
                       pattern=pruner.pattern.describe(), skipped=pruner.skipped,
                       uncalibrated=sorted(set(pruner.uncalibrated)), bos=bos, layer_sparsity=layer_sparsity,
                       permutations=pruner.permutations, calibration=calib.record if calib else {},
                       texts=calib.texts if calib else [])


def pruned_record(config: PruneConfig, result: PruneResult, source: str, extra: dict | None = None) -> dict:
    """What hybridprune.json says about a pruning run."""
    return {"model": source, "prune": {**config.record(), "bos": result.bos or config.bos},
            "prune_seconds": round(result.seconds, 2), "skipped": result.skipped,
            "uncalibrated": result.uncalibrated, "layer_sparsity": result.layer_sparsity or None,
            **({"calibration": result.calibration} if result.calibration else {}), **(extra or {})}


def save_pruned(model, tokenizer, out, config: PruneConfig, result: PruneResult, source: str,
                overwrite: bool = False, extra_record: dict | None = None):
    """Save the pruned model with its record and, for block patterns, the tier map of every matrix (for a channel
    permutation, each matrix's column order)."""

    record = pruned_record(config, result, source, {"loading": "in memory", **(extra_record or {})})

    def extra(tmp):
        save_maps(result, tmp)

    return models.save_model(model, tokenizer, out, record, overwrite=overwrite, extra=extra)


def save_maps(result: PruneResult, folder) -> None:
    """The per-matrix tier maps and column orders that a pruned folder keeps beside its weights, and the text the
    model generated to calibrate itself."""
    folder_format.save_maps(folder, result.tier_maps, result.permutations)
    folder_format.save_calibration_text(folder, result.texts)
