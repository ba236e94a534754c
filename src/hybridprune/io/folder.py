"""The model folder: every file name hybridprune writes beside a model's weights, and how each is read.

    config.json, model.safetensors (or an index and shards)   transformers' own, from save_pretrained
    hybridprune.json        the record: what made the folder (prune / finetune / packed settings), versions, time
    sparsity.json           zeros per matrix, per layer and overall
    tiers.safetensors       three-tier and block patterns: each pruned matrix's tier map (int8, one per block)
    permutations.safetensors  N:M with a channel permutation: each matrix's column order (int32)
    packed.safetensors      a packed folder's pruned matrices (sparse/packing.py holds the layouts)

Every other module asks this one for these names and readers; nothing else spells a file name.
"""
from __future__ import annotations

import importlib.metadata
import json
import struct
import time
from pathlib import Path

import torch

from hybridprune.core.errors import HybridPruneError

RECORD_FILE = "hybridprune.json"
REPORT_FILE = "sparsity.json"
TIERS_FILE = "tiers.safetensors"
PERMUTATIONS_FILE = "permutations.safetensors"  # N:M column order per matrix (--channel-permutation)
PACKED_FILE = "packed.safetensors"
CALIBRATION_FILE = "calibration.jsonl"  # the text a model generated to calibrate itself (--calib self...)
INDEX = "model.safetensors.index.json"
SIDE_FILES = (TIERS_FILE, PERMUTATIONS_FILE, PACKED_FILE)  # safetensors files that are not model weights
_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


# ----------------------------------------------------------------------------- the record

def versions() -> dict:
    out = {}
    for pkg in ("hybridprune", "torch", "transformers", "accelerate", "peft"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def write_record(folder: Path, record: dict, report: dict) -> None:
    """hybridprune.json (the record, with versions, time and overall sparsity) and sparsity.json (the report)."""
    record = {**record, "versions": versions(), "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "sparsity": report["overall"]}
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2))


def read_record(path: str | Path) -> dict | None:
    """hybridprune.json of a folder, None if it has none; a corrupt or truncated one is one line naming it."""
    f = Path(path) / RECORD_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HybridPruneError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}); restore it or save the "
                               "model again") from None
    if not isinstance(record, dict):
        raise HybridPruneError(f"{f} is not a JSON object; restore it or save the model again")
    return record


# ----------------------------------------------------------------------------- tier maps and column orders

def save_maps(folder, tier_maps: dict, permutations: dict) -> None:
    """The per-matrix tier maps and column orders that a pruned folder keeps beside its weights."""
    from safetensors.torch import save_file
    for name, maps in ((TIERS_FILE, tier_maps), (PERMUTATIONS_FILE, permutations)):
        if maps:
            save_file({k: v.contiguous() for k, v in maps.items()}, str(Path(folder) / name))


def save_calibration_text(folder, rows: list[dict]) -> None:
    """The text a model generated to calibrate its own pruning, one JSON line a sequence (kept or dropped)."""
    if rows:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (Path(folder) / CALIBRATION_FILE).write_text(text, encoding="utf-8")


def _load(folder, name) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    f = Path(folder) / name
    if not f.is_file():
        return {}
    check_safetensors(f)
    try:
        return load_file(str(f))
    except Exception as e:  # a corrupt file is one line naming it
        raise HybridPruneError(f"{f} cannot be read ({str(e).splitlines()[0]}); prune the model again") from None


def check_safetensors(f: Path) -> dict:
    """A safetensors file's header, refusing (one line naming the file, and the tensor) a file that is truncated or
    whose header is not the JSON it must be. Reads the header only."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise HybridPruneError(f"{f} is truncated ({size} bytes); save the model again")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise HybridPruneError(f"{f} is truncated inside its header; save the model again")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
            ends = {key: info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"}
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise HybridPruneError(f"{f} has a corrupt header (not a safetensors file any more); save the model "
                                   "again") from None
    for key, end in ends.items():
        if 8 + n + end > size:
            raise HybridPruneError(f"{f} is truncated: tensor {key} lies past the end of the file; save the model "
                                   "again")
    return header


def load_tier_maps(folder) -> dict[str, torch.Tensor]:
    return _load(folder, TIERS_FILE)


def load_permutations(folder) -> dict[str, torch.Tensor]:
    """Each N:M matrix's column order (int32 [in]) where the model was pruned with --channel-permutation."""
    return _load(folder, PERMUTATIONS_FILE)


# ----------------------------------------------------------------------------- weights

def is_packed(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PACKED_FILE).is_file()


def has_safetensors(folder) -> bool:
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / "model.safetensors").is_file()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding model weights (not tier maps, column orders, packed matrices or adapters)."""
    found = sorted(Path(folder).glob("*.safetensors"))
    return [f for f in found if f.name not in SIDE_FILES and f.parent.name != "adapter"]


class ShardReader:
    """Tensors by checkpoint key from a safetensors folder (one file or an index of shards). A shard is opened
    for each read and closed after it, so pages read from its memory map do not pile up in the process."""

    def __init__(self, folder):
        try:
            self._open(folder)
        except HybridPruneError:
            raise
        except Exception as e:  # a truncated or corrupt shard: one line naming the folder and the cause
            raise HybridPruneError(f"cannot read the safetensors weights of {folder}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def _open(self, folder):
        from safetensors import safe_open
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.where = {k: self.folder / "model.safetensors" for k in f.keys()}
        else:
            raise HybridPruneError(f"{folder} holds no safetensors weights (model.safetensors or {INDEX}); "
                                   "use --stream off")
        self.meta: dict[str, tuple[str, int]] = {}  # key -> (dtype name, bytes), from the shard headers
        for file in sorted(set(self.where.values())):
            if not file.is_file():
                raise HybridPruneError(f"shard {file.name} named in {INDEX} is missing from {self.folder}")
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    if self.where.get(k) == file:
                        sl = f.get_slice(k)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        self.meta[k] = (sl.get_dtype(), n * _BYTES.get(sl.get_dtype(), 1))

    def get(self, keys) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        out, by_file = {}, {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for file, ks in by_file.items():
            with safe_open(file, "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out

    def first_float_dtype(self):
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        return next((names[d] for d, _ in self.meta.values() if d in names), torch.float32)
