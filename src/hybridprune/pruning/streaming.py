"""Layer-streamed pruning: prune a model that does not fit in memory.

The model is built without weights (accelerate's `init_empty_weights`: every parameter on the meta device).
The engine's layer loop asks for a decoder layer's weights only when it reaches that layer; they are read from
the safetensors shards, the layer is calibrated and pruned, written to its own output shard, and returned to the
meta device. The embeddings are read only while the calibration samples are embedded (the inputs of layer 0),
and every tensor outside the decoder layers (embeddings, final norm, head) is copied from the source shards to
the output unchanged. Peak memory: one decoder layer, the calibration activations, and the embeddings while
capturing, never the model.

The output is an ordinary sharded safetensors folder (index + shards, keys named as in the source), so it loads
with `from_pretrained`; computations are the in-memory engine's, so masks and weights are bit-identical to it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hybridprune.core import files
from hybridprune.io import models
from hybridprune.core.errors import HybridPruneError
from hybridprune.core.heap import trim_heap
from hybridprune.core.specs import generates, needs_calibration
from hybridprune.pruning import calibration
from hybridprune.io.folder import INDEX, ShardReader, has_safetensors

def streamable(spec: str) -> bool:
    """Whether the model spec resolves to a local folder of safetensors, which prune reads layer by layer."""
    path = Path(models.resolve_model(spec)[0])
    return path.is_dir() and has_safetensors(path)


def _checkpoint_keys(model, reader: ShardReader) -> dict[str, str]:
    """Model state-dict name -> checkpoint key (the same name, or without/with the base model prefix, as
    from_pretrained accepts). A name absent from the shards is allowed only for tied output embeddings."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = set()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) and model.get_output_embeddings():
        head = model.get_output_embeddings()
        tied = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
    out = {}
    for name in model.state_dict():
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in reader.where:
                out[name] = key
                break
        else:
            if name not in tied:
                raise HybridPruneError(f"{reader.folder}: no tensor for {name} in its safetensors shards (a renamed "
                                       "or converted checkpoint); prune it in memory with --stream off")
    return out


class LayerStream:
    """What the engine's layer loop calls to bring a layer in and send it out (see engine._Pruner.run)."""

    def __init__(self, model, folder, out_dir, dtype: torch.dtype):
        self.model, self.out, self.dtype = model, Path(out_dir), dtype
        self.reader = ShardReader(folder)
        self.keys = _checkpoint_keys(model, self.reader)
        self.prefix, self.layers = models.find_decoder_layers(model)
        n = len(self.layers)
        layer_keys = [{k for name, k in self.keys.items() if name.startswith(f"{self.prefix}.{i}.")} for i in range(n)]
        self.inside = set().union(*layer_keys)
        rest = [k for k in self.reader.where if k not in self.inside]
        # tensors outside the layers go to shards no larger than the largest layer (or one tensor each)
        cap = max(sum(self.reader.meta[k][1] for k in ks) for ks in layer_keys)
        self.rest_shards, size = [], cap + 1
        for k in rest:
            if size + self.reader.meta[k][1] > cap:
                self.rest_shards.append([])
                size = 0
            self.rest_shards[-1].append(k)
            size += self.reader.meta[k][1]
        self.total = n + len(self.rest_shards)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.report: list[dict | None] = [None] * n
        self.outside: list[str] = []
        self._loaded: list[str] = []

    def _shard(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.total:05d}.safetensors"

    def _load(self, names, device) -> list[str]:
        """Read these state-dict tensors (full names) from the shards onto `device`, in the run's dtype."""
        from accelerate.utils import set_module_tensor_to_device
        tensors = self.reader.get([self.keys[n] for n in names])
        for name in names:
            value = tensors.pop(self.keys[name])
            set_module_tensor_to_device(self.model, name, device, value=value,
                                        dtype=self.dtype if value.is_floating_point() else None)
        return list(names)

    def _free(self, names) -> None:
        from accelerate.utils import set_module_tensor_to_device
        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def load_outside(self, device) -> None:
        """Everything outside the decoder layers but an untied output head: what embedding the samples needs."""
        head = self.model.get_output_embeddings()
        head_names = {n for n, m in self.model.named_modules() if m is head} if head is not None else set()
        self.outside = self._load([n for n in self.keys if not n.startswith(self.prefix + ".")
                                   and n.rsplit(".", 1)[0] not in head_names], device)

    def free_outside(self) -> None:
        self._free(self.outside)
        self.outside = []

    def check_finite_weights(self) -> None:
        """Refuse NaN/inf weights before any work, as the in-memory engine does: one matrix read at a time."""
        from hybridprune.pruning.engine import refuse_non_finite
        for i, layer in enumerate(self.layers):
            for name in models.find_linears(layer):
                key = self.keys.get(f"{self.prefix}.{i}.{name}.weight")
                if key:
                    refuse_non_finite(f"{self.prefix}.{i}.{name}", self.reader.get([key])[key])

    def load_layer(self, i: int, layer, device) -> None:
        self._loaded = self._load([n for n in self.keys if n.startswith(f"{self.prefix}.{i}.")], device)

    @torch.no_grad()
    def release_layer(self, i: int, layer, write: bool) -> None:
        if write:
            from safetensors.torch import save_file
            tensors = {self.keys[f"{self.prefix}.{i}.{n}"]: t.detach().to("cpu").contiguous()
                       for n, t in layer.state_dict().items() if f"{self.prefix}.{i}.{n}" in self.keys}
            save_file(tensors, str(self.out / self._shard(i)), metadata={"format": "pt"})
            for k, t in tensors.items():
                self.weight_map[k] = self._shard(i)
                self.total_size += t.numel() * t.element_size()
            self.report[i] = models.layer_sparsity(f"{self.prefix}.{i}", layer)
        self._free(self._loaded)
        self._loaded = []
        trim_heap()

    def finish(self) -> dict:
        """Copy the tensors outside the layers, write the index; returns the sparsity report (models format)."""
        from safetensors.torch import save_file
        n = len(self.layers)
        for j, keys in enumerate(self.rest_shards):
            tensors = {k: (t.to(self.dtype) if t.is_floating_point() else t).contiguous()
                       for k, t in self.reader.get(keys).items()}
            save_file(tensors, str(self.out / self._shard(n + j)), metadata={"format": "pt"})
            for k, t in tensors.items():
                self.weight_map[k] = self._shard(n + j)
                self.total_size += t.numel() * t.element_size()
            del tensors
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total_size},
                                                  "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        if any(r is None for r in self.report):
            raise HybridPruneError("internal: a decoder layer was never written")
        return models.summarize_sparsity(self.report)


def empty_model(folder, dtype=None, trust_remote_code: bool = False):
    """(model skeleton on the meta device, config, tokenizer, dtype) without reading a weight."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise models._load_error(str(folder), e) from None
    models.check_causal_lm(config, str(folder))
    want = models._dtype(dtype)
    if want == "auto":
        want = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(want, str):
            want = getattr(torch, want)
        if not isinstance(want, torch.dtype):
            want = ShardReader(folder).first_float_dtype()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=want, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, config, tok, want


def prune_streamed(spec: str, config, out, overwrite: bool = False, dtype=None, trust_remote_code: bool = False,
                   extra_record: dict | None = None, calib=None):
    """Prune the safetensors model folder `spec` layer by layer into `out` (written atomically).
    calib: calibration windows drawn beforehand (else drawn here). Returns (PruneResult, out path)."""
    from hybridprune.pruning.engine import prune, pruned_record, save_maps

    folder, _ = models.resolve_model(spec)
    folder = Path(folder)
    if not folder.is_dir() or not has_safetensors(folder):
        raise HybridPruneError(f"--stream needs a folder of safetensors weights; {spec} is not one (use --stream off)")
    if calib is None and generates(config.calib) and needs_calibration(config.method):
        # the model writes its calibration text whole, before the skeleton is filled one layer at a time
        whole, tok = models.load_dense(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
        calib = calibration.draw(tok, config, whole)
        del whole
    model, mconfig, tok, want = empty_model(folder, dtype, trust_remote_code)
    with files.atomic_dir(out, overwrite=overwrite) as tmp:
        stream = LayerStream(model, folder, tmp, want)
        result = prune(model, config, tokenizer=tok, stream=stream, calib=calib)
        report = stream.finish()
        mconfig.dtype = want
        mconfig.save_pretrained(tmp)
        if (folder / "generation_config.json").is_file():
            shutil.copy(folder / "generation_config.json", tmp / "generation_config.json")
        tok.save_pretrained(tmp)
        record = pruned_record(config, result, spec, {**(extra_record or {}), "loading": "streamed"})
        models.write_record(tmp, record, report)
        save_maps(result, tmp)
    return result, Path(out)
