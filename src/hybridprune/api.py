"""The Python API: one verb per step, a PrunedModel in and out, nothing written to disk until `save`.

    import hybridprune as hp
    pm = hp.load("default")                                        # any causal LM: folder, .gguf, hub id
    pm = hp.prune(pm, hp.PruneConfig(method="wanda", pattern="2:4"))
    pm = hp.finetune(pm, hp.FinetuneConfig(data="squad", steps=50))  # pruned weights stay zero
    print(hp.evaluate(pm, ["wikitext2"]))
    pm.save("out/model", packed=True)                              # the folder `hybridprune prune` writes
    fast = hp.load("out/model", kernels=True)                      # sparse kernels on the CPU

Each verb is the library function the CLI calls; a PrunedModel carries the model, its tokenizer, the record that
hybridprune.json will hold, the tier maps and column orders, so every step sees what the previous one did.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hybridprune.core.config import FinetuneConfig, PruneConfig
from hybridprune.core.errors import HybridPruneError
from hybridprune.evaluation.tasks import evaluate_model, parse_tasks
from hybridprune.finetuning import finetune as finetuning
from hybridprune.io import folder, models
from hybridprune.pruning import engine
from hybridprune.sparse import kernels, packing
from hybridprune.sparse.load import load_model

logger = logging.getLogger(__name__)

__all__ = ["PrunedModel", "load", "prune", "finetune", "evaluate", "save", "use_kernels"]


@dataclass
class PrunedModel:
    """A model with what hybridprune knows about it.

    model, tokenizer: the transformers objects (pruned in place by `prune`);
    source: the spec it was loaded from; record: what hybridprune.json says (the "prune" and "finetune" settings);
    tier_maps / permutations: per pruned matrix, the three-tier map and the N:M column order;
    losses: the fine-tuning loss curve; adapter: an unmerged LoRA adapter (FinetuneConfig(merge=False));
    calibration_text: the sequences a --calib self / self:SOURCE prune generated (saved as calibration.jsonl).
    """

    model: nn.Module
    tokenizer: Any
    source: str = "memory"
    record: dict = field(default_factory=dict)
    tier_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: list | None = None
    adapter: Any = None
    calibration_text: list[dict] = field(default_factory=list)  # what the model wrote to calibrate itself

    @property
    def sparsity(self) -> float:
        """The fraction of zeros over the prunable matrices of the decoder layers."""
        return models.sparsity_report(self.model)["overall"]

    def save(self, out: str | Path, *, packed: bool = False, overwrite: bool = False, values: str = "float") -> Path:
        return save(self, out, packed=packed, overwrite=overwrite, values=values)


def load(spec: str = "default", *, dtype: str | torch.dtype | None = None, device: str | None = None,
         kernels: bool = False, trust_remote_code: bool = False, lm_head: str = "float",
         activations: str = "float") -> PrunedModel:
    """Load a model: "default" (SmolLM2-135M-Instruct), a folder (dense, pruned or packed), a .gguf file or a hub
    id. A folder saved by hybridprune brings its record, tier maps and column orders; kernels=True computes the
    pruned matrices from their packed form (CPU), and with lm_head="int8" the output layer too, in int8;
    activations="int8" rounds the inputs of the int8-valued packed matrices to int8 as well, "int8x2" to two int8
    terms (x and its rounding error)."""
    model, tok = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code, kernels=kernels,
                            lm_head=lm_head, activations=activations)
    is_folder = Path(spec).is_dir()
    record = (folder.read_record(spec) if is_folder else None) or {}
    return PrunedModel(model, tok, source=spec, record=record,
                       tier_maps=folder.load_tier_maps(spec) if is_folder else {},
                       permutations=folder.load_permutations(spec) if is_folder else {})


def _config(cls, config, options: dict):
    if config is None:
        return cls(**options)
    if not isinstance(config, cls):
        raise HybridPruneError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return replace(config, **options) if options else config


def _as_pruned(model) -> PrunedModel:
    if isinstance(model, PrunedModel):
        return model
    if isinstance(model, str):
        return load(model)
    raise HybridPruneError(f"model must be a PrunedModel (hybridprune.load) or a model spec, got "
                           f"{type(model).__name__}")


def prune(model: PrunedModel | str, config: PruneConfig | None = None, **options) -> PrunedModel:
    """Prune in place, layer by layer, and return the PrunedModel with its record and tier maps.

    config: a PruneConfig; options: its fields, to build one or to override the given one
    (`hp.prune(pm, method="sparsegpt", pattern="2:4")`)."""
    pm = _as_pruned(model)
    config = _config(PruneConfig, config, options)
    if pm.record.get("packed"):
        raise HybridPruneError(f"{pm.source} is packed; unpack it first (hybridprune pack --unpack)")
    result = engine.prune(pm.model, config, tokenizer=pm.tokenizer)
    logger.info(f"pruned in {result.seconds:.1f}s ({config.method}, {result.pattern['pattern']}, in memory)")
    record = engine.pruned_record(config, result, pm.source, {"loading": "in memory"})
    return replace(pm, record=record, tier_maps=result.tier_maps, permutations=result.permutations,
                   calibration_text=result.texts)


def finetune(model: PrunedModel, config: FinetuneConfig | None = None, *, work_dir: str | Path | None = None,
             **options) -> PrunedModel:
    """Fine-tune without regrowing a pruned weight (LoRA merged through the mask, or masked full tuning).

    work_dir: where the Trainer keeps its checkpoints (default: a temporary folder, removed afterwards)."""
    pm = _as_pruned(model)
    config = _config(FinetuneConfig, config, options)
    with tempfile.TemporaryDirectory(prefix="hybridprune-finetune-") as tmp:
        res = finetuning.finetune(pm.model, pm.tokenizer, config, Path(work_dir) if work_dir else Path(tmp))
    record = finetuning.finetuned_record(pm.record or None, pm.source, res)
    return replace(pm, model=res["model"], record=record, losses=res["losses"],
                   adapter=res["adapter"] if not config.merge else None)


def evaluate(model: PrunedModel, tasks: Sequence[str] | str = ("wikitext2",), **options) -> dict:
    """Task metrics of the in-memory model: wikitext2 (perplexity), squad, gsm8k, boolq (lm-evaluation-harness).

    options: evaluation.tasks.evaluate_model's (limit, sample, batch_size, num_fewshot, ppl_seqlen, ppl_windows,
    data_dir_path, ...)."""
    pm = _as_pruned(model)
    names = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    return evaluate_model(pm.model, pm.tokenizer, names, **options)


def save(model: PrunedModel, out: str | Path, *, packed: bool = False, overwrite: bool = False,
         values: str = "float") -> Path:
    """Write the folder the CLI writes: safetensors weights, tokenizer, hybridprune.json, sparsity.json, tier maps
    and column orders (and, after fine-tuning, the loss curve and any unmerged adapter). packed=True stores only
    what is kept (the packed format), values="int8" its kept values as int8 with a scale per output row; the
    folder appears whole or not at all."""
    packing.check_values(values)
    if values != "float" and not packed:
        raise HybridPruneError(f"values={values!r} stores packed weights; pass packed=True as well")
    pm = _as_pruned(model)
    if packed and "prune" not in pm.record:
        raise HybridPruneError("only a pruned model can be saved packed; prune it first, or save it dense")
    if packed:
        packing.check_packable(pm.record["prune"].get("pattern_detail") or {})
    if Path(out).exists() and not overwrite:
        raise HybridPruneError(f"output folder {out} exists; pass overwrite=True or choose another folder")
    if packed:
        with packing.packed_output(out, overwrite=overwrite, values=values) as tmp:
            _save_dense(pm, tmp, overwrite=True)
        return Path(out)
    return _save_dense(pm, out, overwrite=overwrite)


def _save_dense(pm: PrunedModel, out, overwrite: bool) -> Path:
    if "finetune" in pm.record:
        res = {"model": pm.model, "adapter": pm.adapter, "losses": pm.losses or [], "record": pm.record["finetune"]}
        return finetuning.save_finetuned(res, pm.tokenizer, out, pm.record, pm.adapter is None,
                                         pm.tier_maps, pm.permutations, overwrite=overwrite)

    def extra(tmp):
        folder.save_maps(tmp, pm.tier_maps, pm.permutations)
        folder.save_calibration_text(tmp, pm.calibration_text)
    record = {k: v for k, v in pm.record.items() if k not in ("versions", "saved", "sparsity", "packed")}
    return models.save_model(pm.model, pm.tokenizer, out, record or {"model": pm.source}, overwrite=overwrite,
                             extra=extra)


def use_kernels(model: PrunedModel, *, values: str = "float", lm_head: str = "float",
                activations: str = "float") -> PrunedModel:
    """Compute every pruned matrix from its packed form with hybridprune's CPU kernels (in place); values="int8"
    packs the kept values as int8 with a scale per output row first; lm_head="int8" packs the output layer so too
    (the tied input embedding keeps its weights); activations="int8" (with int8 values) also rounds each input row
    of every packed matrix, the int8 head included, to int8 (one scale per row), so that the sparse kernels sum
    int8 products (AVX-512 VNNI); activations="int8x2" rounds each row and its rounding error to int8 (two int8
    terms, about 16 bits of x) and sums both in one pass over the weights."""
    packing.check_values(values)
    packing.check_values(lm_head)
    kernels.check_activations(activations)
    if activations != "float" and values != "int8":
        raise HybridPruneError(f'activations="{activations}" needs int8 values; add values="int8"')
    pm = _as_pruned(model)
    n = kernels.sparsify_(pm.model, record=pm.record, tier_maps=pm.tier_maps, perms=pm.permutations, values=values)
    if lm_head == "int8":
        kernels.pack_lm_head_(pm.model)
    if activations != "float":
        kernels.int8_activations_(pm.model, activations)
    if n == 0:
        logger.warning("use_kernels: nothing to pack (the model was not pruned by hybridprune); running dense")
    return pm
