"""Load any model spec: a dense folder, GGUF file or hub id (io.models), or a packed folder (sparse.packing);
with kernels=True the pruned matrices are computed from their packed form (sparse.kernels)."""
from __future__ import annotations

import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.io import models
from hybridprune.io.folder import is_packed, read_record
from hybridprune.sparse.kernels import check_activations, int8_activations_, pack_lm_head_, sparsify_, use_kernels
from hybridprune.sparse.packing import load_packed


def load_model(spec: str = "default", dtype: str | torch.dtype | None = None, device: str | None = None,
               trust_remote_code: bool = False, device_map: str | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None, kernels: bool = False, lm_head: str = "float",
               activations: str = "float"):
    """Load (model, tokenizer) from any spec. The model is in eval mode with the KV cache off.
    device_map / max_memory / offload_folder: accelerate's placement and offloading (from_pretrained's).
    A packed folder loads as the same model; kernels=True computes its pruned matrices from their packed form,
    also for an unpacked pruned folder, which is then packed in memory; lm_head="int8" (with kernels) also packs
    the output layer with int8 values (kernels.pack_lm_head_); activations="int8" (with kernels and int8 values)
    rounds the inputs of the int8-valued packed matrices to int8, "int8x2" to two int8 terms
    (kernels.int8_activations_)."""
    if lm_head not in ("float", "int8"):
        raise HybridPruneError(f"unknown LM head {lm_head!r}; use float or int8")
    check_activations(activations)
    for what, value in (("LM head", lm_head), ("activations", activations)):
        if value != "float" and not kernels:
            raise HybridPruneError(f"{value} {what} run on the kernels; add --kernels (kernels=True)")
    path, _ = models.resolve_model(spec)
    models._hub_check(spec, path)
    if activations != "float":  # refused before the model loads: only a folder packed with int8 values has them
        layouts = (((read_record(path) if is_packed(path) else None) or {}).get("packed") or {}).get("matrices")
        if not layouts or any(layout.get("values") != "int8" for layout in layouts.values()):
            raise HybridPruneError(f"{activations} activations need int8 values: pack {spec} with --values int8 first")
    if is_packed(path):
        if device_map:
            raise HybridPruneError(f"{spec} is packed: --device-map is not supported for packed folders; "
                                   "unpack it with `hybridprune pack --unpack`, or drop --device-map")
        model, tok, packed, layouts = load_packed(path, dtype=dtype)
        if kernels:
            sparsify_(model, packed=packed, layouts=layouts)
            if lm_head == "int8":
                pack_lm_head_(model)
            if activations != "float":
                int8_activations_(model, activations)
        if device:
            model.to(device)
        return model, tok
    model, tok = models.load_dense(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                   device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if kernels:
        use_kernels(model, path)
        if lm_head == "int8":
            pack_lm_head_(model)
        if activations != "float":
            int8_activations_(model, activations)
    return model, tok
