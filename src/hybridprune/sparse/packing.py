"""The packed format: a pruned matrix keeps only what is kept, in safetensors.

    unstructured  mask [N, ceil(K/8)] uint8 (bit k%8 of byte k/8 = column k kept), values [nnz] in row order
    N:M           values [N, K/M*N] and positions [N, ceil(K/M*N*bits/8)] uint8, the position of each kept value
                  inside its group in `bits` bits (2 for M <= 4, 4 for M <= 16, 8 above), ascending per group;
                  pruned with a channel permutation ("permuted": true): the groups are cut from the columns in
                  the order perm [K] int32, so these fields describe W[:, perm] and the kernels read x[:, perm]
    tiered        tiers [R, C] int8 (0 dense, 1 N:M, 2 top-k) over BxB blocks (edge blocks padded with zeros),
                  then per tier in block order (row of blocks by row of blocks):
                    dense         [nd, B, B]   the block, column-major (column j's B values together)
                    nm_values     [nn, B/M*N, B]  kept value t of every block row, t-major
                    nm_positions  [nn, B/M*N] int32  the 2-bit positions of value t of the B rows in one word
                    topk_values   [nt, k]       and  topk_positions [nt, k] uint8: row * B + column
Values are stored in the model's dtype, or with --values int8 ("values": "int8", "scale": "row") as int8 with a
float32 scale [out] per output row (quantize). Tensors that were not pruned are stored as they are. Every packed tensor of matrix `W` is named `W.<field>`,
and the folder's hybridprune.json records {"packed": {"format", "version", "matrices": {W: layout}}}.
The layouts are the ones the kernels read (kernels.py), so loading never converts them.

Unpacking restores every weight bit for bit (int8 values: the dequantized weights, q * scale, which the kernels
compute with); a pruned weight reads back as +0.0 (pruning by a multiply can leave -0.0, the same number).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from pathlib import Path

import torch

from hybridprune.core import files
from hybridprune.io import models
from hybridprune.io.folder import (PACKED_FILE, PERMUTATIONS_FILE, RECORD_FILE, TIERS_FILE,  # noqa: F401
                                   check_safetensors, is_packed, load_permutations, load_tier_maps, read_record,
                                   weight_files)
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.patterns import from_blocks, to_blocks

logger = logging.getLogger(__name__)
FORMAT, VERSION = "hybridprune-packed", 2
INT8_VERSION = 3  # a folder with int8 values: a version-2 reader would take the int8 numbers for the weights
VERSIONS = (1, 2, 3)  # what this release reads; version 1 (hybridprune 0.1) carries no checksums
KINDS = ("unstructured", "nm", "tiered")
DTYPES = ("float32", "float16", "bfloat16")
VALUES = ("float", "int8")  # how kept values are stored: in the model's dtype, or int8 with a scale per output row
VALUE_FIELDS = ("values", "dense", "nm_values", "topk_values")


def _bits(m: int) -> int:
    return 2 if m <= 4 else 4 if m <= 16 else 8


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., L] small ints -> [..., ceil(L*bits/8)] uint8, value i at bits (i % per) * bits of byte i // per."""
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    v = torch.nn.functional.pad(values.to(torch.int32), (0, pad)).reshape(*values.shape[:-1], -1, per)
    return (v << (bits * torch.arange(per, dtype=torch.int32))).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per = 8 // bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> (bits * torch.arange(per, dtype=torch.int32))) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], -1)[..., :length].to(torch.int64)


def _choose(nonzero: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of `count` entries per row of the last dim: the non-zeros first, then zeros, ascending."""
    width = nonzero.shape[-1]
    key = (~nonzero).to(torch.int64) * width + torch.arange(width)
    return torch.sort(torch.topk(key, count, dim=-1, largest=False).indices, dim=-1).values


# ----------------------------------------------------------------------------- one matrix

def pack_matrix(W: torch.Tensor, layout: dict, name: str, tiers: torch.Tensor | None = None) -> dict:
    """Pack one [out, in] matrix. Refuses (naming the matrix) where its zeros break the pattern."""
    W = W.detach().cpu().contiguous()
    N, K = W.shape
    kind = layout["kind"]
    if kind == "unstructured":
        Kp = -(-K // 8) * 8
        keep = torch.nn.functional.pad(W != 0, (0, Kp - K))
        return {"mask": _pack_bits(keep, 1), "values": W[W != 0].contiguous()}
    if kind == "nm":
        n, m = layout["n"], layout["m"]
        if K % m:
            raise HybridPruneError(f"{name}: {K} inputs do not split into groups of {m}; it cannot be packed as {n}:{m}")
        g = W.reshape(N, K // m, m)
        nz = g != 0
        if (nz.sum(-1) > n).any():
            raise HybridPruneError(f"{name} breaks its recorded {n}:{m} pattern (a group keeps more than {n}); "
                                   "it was changed after pruning: re-prune it or save it unpacked")
        pos = _choose(nz, n)
        return {"values": g.gather(-1, pos).reshape(N, -1).contiguous(),
                "positions": _pack_bits(pos.reshape(N, -1), _bits(m))}
    if kind == "tiered":
        return _pack_tiered(W, layout, name, tiers)
    raise HybridPruneError(f"{name}: unknown packed layout {kind!r}")


def _pack_tiered(W, layout, name, tiers):
    b, n, m, k = layout["block"], layout["n"], layout["m"], layout["k"]
    N, K = W.shape
    R, C = -(-N // b), -(-K // b)
    if tiers is None or tuple(tiers.shape) != (R, C):
        got = "none" if tiers is None else "x".join(map(str, tiers.shape))
        raise HybridPruneError(f"{name}: its tier map is {got}, a {N}x{K} matrix in {b}x{b} blocks needs {R}x{C}; "
                               "the folder's tiers.safetensors does not belong to these weights")
    blocks = to_blocks(W, b).reshape(R * C, b, b)  # edge blocks padded with zeros
    flat = tiers.reshape(-1).to(torch.int64)
    out = {"tiers": tiers.to(torch.int8).contiguous()}
    out["dense"] = blocks[flat == 0].transpose(1, 2).contiguous()
    nmb = blocks[flat == 1].reshape(-1, b, b // m, m)
    nz = nmb != 0
    if (nz.sum(-1) > n).any():
        raise HybridPruneError(f"{name} breaks its recorded pattern: an N:M-tier block has a group with more than "
                               f"{n} of {m} kept; re-prune it or save it unpacked")
    pos = _choose(nz, n)  # [nn, b rows, groups, n]
    vals = nmb.gather(-1, pos).reshape(-1, b, b // m * n)
    out["nm_values"] = vals.transpose(1, 2).contiguous()  # [nn, t, rows]
    shifts = 2 * torch.arange(b, dtype=torch.int64)
    words = (pos.reshape(-1, b, b // m * n).transpose(1, 2).to(torch.int64) << shifts).sum(-1)
    out["nm_positions"] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()
    tk = blocks[flat == 2].reshape(-1, b * b)
    nz = tk != 0
    if (nz.sum(-1) > k).any():
        raise HybridPruneError(f"{name} breaks its recorded pattern: a top-k block keeps more than k={k}; "
                               "re-prune it or save it unpacked")
    pos = _choose(nz, k) if k else torch.zeros(tk.shape[0], 0, dtype=torch.int64)
    out["topk_values"] = tk.gather(-1, pos).contiguous()
    out["topk_positions"] = pos.to(torch.uint8).contiguous()
    return out


def unpack_matrix(t: dict, layout: dict) -> torch.Tensor:
    """The dense [out, in] matrix back from its packed tensors (int8 values: q * scale, in float32, then the
    layout's dtype)."""
    N, K = layout["shape"]
    kind = layout["kind"]
    if layout.get("values") == "int8":
        plain, base = dequantized(t, layout)
        W = unpack_matrix(plain, base) * t["scale"].float().unsqueeze(1)
        return W.to(getattr(torch, layout.get("dtype", "float32")))
    if kind == "unstructured":
        keep = ((t["mask"].to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).bool()
        keep = keep.reshape(N, -1)[:, :K]
        W = torch.zeros(N, K, dtype=t["values"].dtype)
        W[keep] = t["values"]
        return W
    if kind == "nm":
        n, m = layout["n"], layout["m"]
        pos = _unpack_bits(t["positions"], _bits(m), K // m * n).reshape(N, K // m, n)
        W = torch.zeros(N, K // m, m, dtype=t["values"].dtype)
        W.scatter_(-1, pos, t["values"].reshape(N, K // m, n))
        W = W.reshape(N, K)
        if layout.get("permuted"):  # position j holds column perm[j]
            W = torch.empty_like(W).index_copy_(1, t["perm"].to(torch.int64), W)
        return W
    b, n, m = layout["block"], layout["n"], layout["m"]
    tiers = t["tiers"]
    R, C = tiers.shape
    flat = tiers.reshape(-1).to(torch.int64)
    dtype = t["dense"].dtype
    blocks = torch.zeros(R * C, b, b, dtype=dtype)
    blocks[flat == 0] = t["dense"].transpose(1, 2)
    words = t["nm_positions"].to(torch.int64) & 0xFFFFFFFF
    pos = ((words.unsqueeze(-1) >> (2 * torch.arange(b))) & 3).transpose(1, 2)  # [nn, rows, t]
    nn_ = pos.shape[0]
    nmb = torch.zeros(nn_, b, b // m, m, dtype=dtype)
    nmb.scatter_(-1, pos.reshape(nn_, b, b // m, n), t["nm_values"].transpose(1, 2).reshape(nn_, b, b // m, n))
    blocks[flat == 1] = nmb.reshape(nn_, b, b)
    tk = torch.zeros(t["topk_values"].shape[0], b * b, dtype=dtype)
    tk.scatter_(-1, t["topk_positions"].to(torch.int64), t["topk_values"])
    blocks[flat == 2] = tk.reshape(-1, b, b)
    return from_blocks(blocks.reshape(R, C, b * b), N, K, b).contiguous()


def quantize(t: dict, layout: dict) -> tuple[dict, dict]:
    """A packed matrix's kept values as int8 with one float32 scale per output row: s_r = max |kept value of row r|
    / 127 (1 for a row that keeps nothing), q = round(v / s_r), in [-127, 127]. Returns (layout, tensors) with
    "values": "int8", "scale": "row" and the scales as tensor `scale` [out].

    Per output row rather than per block: the kernels then multiply each output by its row's scale once
    (y_r = s_r * sum_k q_rk x_k), so their inner loops only widen int8 to fp32, as they widen bf16; a scale per
    16x16 block would cost a multiply per block and output in every kernel and in the GEMMs' decoders."""
    if layout.get("values") == "int8":
        return layout, t
    rows = _value_rows(t, layout)
    N = layout["shape"][0]
    amax = torch.zeros(-(-N // layout["block"]) * layout["block"] if layout["kind"] == "tiered" else N)
    for field, r in rows.items():
        amax.scatter_reduce_(0, r.reshape(-1), t[field].float().abs().reshape(-1), "amax")
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    out = dict(t)
    for field, r in rows.items():
        out[field] = torch.round(t[field].float() / scale[r]).clamp_(-127, 127).to(torch.int8).contiguous()
    out["scale"] = scale[:N].contiguous()
    return {**layout, "values": "int8", "scale": "row"}, out


def _value_rows(t: dict, layout: dict) -> dict:
    """For each tensor of kept values, the output row of every value (int64, the tensor's shape)."""
    N = layout["shape"][0]
    if layout["kind"] == "unstructured":
        return {"values": torch.repeat_interleave(torch.arange(N), kept_per_row(t["mask"]))}
    if layout["kind"] == "nm":
        return {"values": torch.arange(N).unsqueeze(1).expand_as(t["values"])}
    b = layout["block"]
    C = t["tiers"].shape[1]
    flat = t["tiers"].reshape(-1).to(torch.int64)
    block_row = torch.arange(flat.numel()) // C
    lane = torch.arange(b)
    rows = {}
    for field, tier in (("dense", 0), ("nm_values", 1)):  # [blocks, columns, rows]: row i is the last index
        first = block_row[flat == tier] * b
        rows[field] = (first.view(-1, 1, 1) + lane.view(1, 1, -1)).expand_as(t[field])
    first = block_row[flat == 2] * b
    rows["topk_values"] = first.view(-1, 1) + (t["topk_positions"].to(torch.int64) // b)
    return rows


def dequantized(t: dict, layout: dict) -> tuple[dict, dict]:
    """The packed tensors with float32 values (q as numbers) and the layout without "values": what unpack_matrix
    reads before multiplying the rows by their scales."""
    plain = {k: (v.float() if k in VALUE_FIELDS else v) for k, v in t.items() if k != "scale"}
    return plain, {k: v for k, v in layout.items() if k not in ("values", "scale")}


def kept_per_row(mask: torch.Tensor) -> torch.Tensor:
    """Kept weights per row of an unstructured bitmask [N, bytes] (int64 [N])."""
    popcount = torch.tensor([bin(i).count("1") for i in range(256)])
    return popcount[mask.to(torch.int64)].sum(1)


def expected_shapes(layout: dict, t: dict) -> dict:
    """The shape each packed tensor must have, from the layout (and, for values, from the mask / tier map)."""
    out = _expected_shapes(layout, t)
    return {**out, "scale": (layout["shape"][0],)} if layout.get("values") == "int8" else out


def expected_dtypes(layout: dict) -> dict:
    """The dtype the value tensors (and an int8 layout's scales) must have."""
    if layout.get("values") == "int8":
        return {**dict.fromkeys(VALUE_FIELDS, torch.int8), "scale": torch.float32}
    return dict.fromkeys(VALUE_FIELDS, getattr(torch, layout.get("dtype", "float32")))


def _expected_shapes(layout: dict, t: dict) -> dict:
    N, K = layout["shape"]
    kind = layout["kind"]
    if kind == "unstructured":
        out = {"mask": (N, -(-K // 8))}
        if "mask" in t and tuple(t["mask"].shape) == out["mask"]:
            out["values"] = (int(kept_per_row(t["mask"]).sum()),)
        return out
    if kind == "nm":
        n, m = layout["n"], layout["m"]
        out = {"values": (N, K // m * n), "positions": (N, -(-(K // m * n) * _bits(m) // 8))}
        return {**out, "perm": (K,)} if layout.get("permuted") else out
    b, n, m, k = layout["block"], layout["n"], layout["m"], layout["k"]
    R, C = -(-N // b), -(-K // b)
    out = {"tiers": (R, C)}
    if "tiers" in t and tuple(t["tiers"].shape) == (R, C):
        counts = [int((t["tiers"] == i).sum()) for i in range(3)]
        out.update(dense=(counts[0], b, b), nm_values=(counts[1], b // m * n, b), nm_positions=(counts[1], b // m * n),
                   topk_values=(counts[2], k), topk_positions=(counts[2], k))
    return out


# ----------------------------------------------------------------------------- which layout a matrix gets

def check_packable(pattern: dict) -> None:
    """Refuse, from the pruning pattern alone (before any model is read), what the packed format does not cover."""
    if pattern.get("pattern") in ("three-tier", "block", "block-topk"):
        b = int(pattern.get("block_size", 16))
        n, m = map(int, str(pattern.get("tier_nm", "2:4")).split(":"))
        if b > 16 or m > 4 or b % m:
            raise HybridPruneError(f"the packed format covers blocks up to 16x16 with an N:M tier of M <= 4, not "
                                   f"{b}x{b} blocks with {n}:{m}; use --save dense (or --block-size 16 --tier-nm 2:4)")


def layout_for(pattern: dict, name: str, W: torch.Tensor, tier_maps: dict, skipped: set,
               perms: dict | None = None) -> dict | None:
    """The layout of one prunable matrix under the recorded pattern; None = store it as it is."""
    N, K = W.shape
    base = {"shape": [N, K], "dtype": str(W.dtype).replace("torch.", "")}
    kind = pattern.get("pattern")
    if name in skipped:
        return None
    if name in tier_maps:
        b = int(pattern.get("block_size", 16))
        n, m = map(int, str(pattern.get("tier_nm", "2:4")).split(":"))
        if b > 16 or m > 4 or b % m:
            raise HybridPruneError(f"{name}: the packed format covers blocks up to 16x16 with an N:M tier of M <= 4 "
                                   f"(this model has {b}x{b}, {n}:{m}); keep it unpacked")
        return {**base, "kind": "tiered", "block": b, "n": n, "m": m, "k": int(pattern.get("topk", 0))}
    if kind in ("three-tier", "block", "block-topk"):
        raise HybridPruneError(f"{name} has no tier map in tiers.safetensors although the model was pruned "
                               f"{kind}; the folder is incomplete: re-prune it")
    if kind and ":" in str(kind):
        layout = {**base, "kind": "nm", "n": int(pattern["n"]), "m": int(pattern["m"])}
        if pattern.get("channel_permutation", "none") != "none":
            if name not in (perms or {}):
                raise HybridPruneError(f"{name} was pruned {kind} with a channel permutation, but the folder's "
                                       "permutations.safetensors has no column order for it: re-prune it")
            layout["permuted"] = True
        return layout
    # unstructured (also any other pattern): a bitmask, where it is smaller than the matrix
    kept = int((W != 0).sum())
    item = W.element_size()
    if kept * item + N * -(-K // 8) >= N * K * item:
        return None
    return {**base, "kind": "unstructured"}


def pack_prunable(name: str, W: torch.Tensor, transposed: bool, pattern: dict, tier_maps: dict,
                  skipped: set, perms: dict | None = None, values: str = "float") -> tuple[dict, dict] | None:
    """(layout, packed tensors) of one prunable matrix [out, in] under a record's pattern; None = keep it as it
    is. values="int8" stores the kept values as int8 with a scale per output row (quantize). Used for folders
    (pack_folder) and for models in memory (kernels.sparsify_)."""
    layout = layout_for(pattern, name, W, tier_maps, skipped, perms)
    if layout is None:
        return None
    if layout.get("permuted"):
        perm = perms[name].to(torch.int64)
        if not torch.equal(perm.sort().values, torch.arange(W.shape[1])):
            raise HybridPruneError(f"{name}: its column order in permutations.safetensors is not a permutation of "
                                   f"its {W.shape[1]} inputs; the file does not belong to these weights")
        packed = {**pack_matrix(W[:, perm], layout, name), "perm": perm.to(torch.int32)}
    else:
        packed = pack_matrix(W, layout, name, tier_maps.get(name))
    if values == "int8":
        layout, packed = quantize(packed, layout)
    return {**layout, "transposed": transposed}, packed


def check_values(values: str) -> None:
    if values not in VALUES:
        raise HybridPruneError(f"unknown values {values!r}; use one of {', '.join(VALUES)}")


def packed_bytes(t: dict) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


# ----------------------------------------------------------------------------- folders

def _check_orientation(folder: Path, layouts: dict) -> None:
    """Each layout's `transposed` flag and shape against the module the model's class builds for it (a flipped
    flag on a square matrix would load the weights the wrong way round without a word)."""
    shapes = _prunable_names(folder, shapes=True)
    for key, layout in layouts.items():
        name = key[:-len(".weight")]
        if name not in shapes:
            raise HybridPruneError(f"{folder / RECORD_FILE}: packed matrix {key} is not a prunable matrix of this "
                                   "model; re-pack the model")
        transposed, shape = shapes[name]
        if bool(layout.get("transposed", False)) != transposed or list(layout["shape"]) != shape:
            raise HybridPruneError(f"{folder / RECORD_FILE}: the layout of {key} says shape {layout['shape']}"
                                   f"{' transposed' if layout.get('transposed') else ''}, the model's module is "
                                   f"{shape}{' transposed' if transposed else ''}; re-pack the model")


def _prunable_names(folder: Path, shapes: bool = False) -> dict:
    """Full module name -> whether its weight is stored transposed (GPT-2's Conv1D), from the model's class
    built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    models.check_causal_lm(config, str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix, layers = models.find_decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in models.find_linears(layer).items():
            transposed = not isinstance(mod, torch.nn.Linear)
            out[f"{prefix}.{i}.{name}"] = (transposed, list(models.weight_matrix(mod).shape)) if shapes else transposed
    return out


def pack_folder(src, out, overwrite: bool = False, log=None, values: str = "float") -> dict:
    """Pack a saved pruned model folder into `out`, the kept values in the model's dtype or (values="int8") as
    int8 with a scale per output row. Returns {"dense_bytes", "packed_bytes", "matrices"}."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    check_values(values)
    src = Path(src)
    if is_packed(src):
        raise HybridPruneError(f"{src} is already packed")
    record = read_record(src)
    if not record or "prune" not in record:
        raise HybridPruneError(f"{src} has no hybridprune.json recording a pruning run, so nothing says which "
                               "weights are pruned; prune it with `hybridprune prune` first")
    weights = weight_files(src)
    if not weights:
        raise HybridPruneError(f"{src} has no *.safetensors weights to pack")
    pattern = record["prune"].get("pattern_detail") or {}
    tier_maps, perms = load_tier_maps(src), load_permutations(src)
    skipped = set(record.get("skipped") or [])
    prunable = _prunable_names(src)
    tensors, layouts = {}, {}
    stats = {"dense_bytes": 0, "packed_bytes": 0, "matrices": 0}
    for f in weights:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                mod = key[:-len(".weight")] if key.endswith(".weight") else None
                if mod in prunable and t.dim() == 2:
                    done = pack_prunable(mod, t.t() if prunable[mod] else t, prunable[mod], pattern, tier_maps,
                                         skipped, perms, values)
                    stats["dense_bytes"] += t.numel() * t.element_size()
                    if done is not None:
                        layouts[key], packed = done
                        tensors.update({f"{key}.{field}": v for field, v in packed.items()})
                        stats["packed_bytes"] += packed_bytes(packed)
                        stats["matrices"] += 1
                        continue
                    stats["packed_bytes"] += t.numel() * t.element_size()
                tensors[key] = t.contiguous()
    if not layouts:
        raise HybridPruneError(f"{src}: no matrix has fewer bytes packed than dense (nothing is pruned); "
                               "there is nothing to pack")
    with files.atomic_dir(out, overwrite=overwrite) as tmp:
        for f in src.iterdir():  # config, tokenizer, generation config, tier maps, column orders: as they are
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" \
                    or f.name in (TIERS_FILE, PERMUTATIONS_FILE):
                shutil.copy(f, tmp / f.name)
        version = INT8_VERSION if values == "int8" else VERSION
        save_file(tensors, str(tmp / PACKED_FILE), metadata={"format": FORMAT, "version": str(version)})
        rec = {**record, "packed": {"format": FORMAT, "version": version, "file": PACKED_FILE, "matrices": layouts,
                                    "dense_bytes": stats["dense_bytes"], "packed_bytes": stats["packed_bytes"],
                                    "checksum": "crc32", "checksums": {k: checksum(v) for k, v in tensors.items()}}}
        (tmp / RECORD_FILE).write_text(json.dumps(rec, indent=2, default=str))
    (log or logger.info)(f"packed {stats['matrices']} matrices: {stats['dense_bytes'] / 1e6:.1f} MB -> "
        f"{stats['packed_bytes'] / 1e6:.1f} MB ({stats['packed_bytes'] / stats['dense_bytes']:.3f})")
    return stats


def checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes as stored (zlib's: 3.2 GB/s, 12% of a packed load, results/pack-checksum)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def check_layout(f: Path, key: str, layout) -> None:
    """Every field of a matrix's layout holds what the format allows (the tensors are checked against it next)."""
    def bad(what):
        raise HybridPruneError(f"{f}: the layout of {key} in {RECORD_FILE} {what}; re-pack the model")
    if not isinstance(layout, dict) or layout.get("kind") not in KINDS:
        bad(f"has kind {layout.get('kind') if isinstance(layout, dict) else layout!r}, not one of {', '.join(KINDS)}")
    shape = layout.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)):
        bad(f"has shape {shape!r}, not two positive whole numbers")
    if layout.get("dtype") not in DTYPES:
        bad(f"has dtype {layout.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    if not isinstance(layout.get("transposed", False), bool) or not isinstance(layout.get("permuted", False), bool):
        bad("has a transposed or permuted flag that is not true or false")
    if layout["kind"] in ("nm", "tiered"):
        n, m = layout.get("n"), layout.get("m")
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            bad(f"has N:M {n}:{m}, not 0 < N < M")
    if layout["kind"] == "nm" and shape[1] % layout["m"]:
        bad(f"has M={layout['m']}, which does not divide its {shape[1]} inputs")
    if layout.get("values", "float") not in VALUES or (layout.get("values") == "int8") != (layout.get("scale") == "row"):
        bad(f"has values {layout.get('values')!r} with scale {layout.get('scale')!r}, not float, or int8 with a "
            "scale per row")
    if layout["kind"] == "tiered":
        b, k = layout.get("block"), layout.get("k")
        if not (isinstance(b, int) and 0 < b <= 16 and b % layout["m"] == 0 and layout["m"] <= 4):
            bad(f"has block {b} with N:M {layout['n']}:{layout['m']}, outside the format (blocks up to 16, a "
                "multiple of M <= 4)")
        if not (isinstance(k, int) and 0 <= k <= b * b):
            bad(f"has top-k {k}, outside [0, {b * b}]")


def _check_against_pattern(f: Path, key: str, layout: dict, pattern: dict) -> None:
    """A layout's N:M, block and top-k are the ones the record's pruning pattern made (a layout edited to 1:2
    would decode 2:4 positions as garbage with the same tensor shapes)."""
    if not pattern:
        return
    if layout["kind"] == "tiered":
        want = {"n:m": str(pattern.get("tier_nm", "2:4")), "block": int(pattern.get("block_size", 16)),
                "k": int(pattern.get("topk", 0))}
    elif layout["kind"] == "nm":
        want = {"n:m": f"{pattern.get('n')}:{pattern.get('m')}"}
    else:
        return
    got = {"n:m": f"{layout['n']}:{layout['m']}", "block": layout.get("block"), "k": layout.get("k")}
    for field, value in want.items():
        if got[field] != value:
            raise HybridPruneError(f"{f}: the layout of {key} says {field} {got[field]}, the record's pruning "
                                   f"pattern says {value}; {RECORD_FILE} was changed: restore it or re-pack")


def read_packed(folder) -> tuple[dict, dict, dict]:
    """(plain tensors, {weight name: packed tensors}, {weight name: layout}), every size checked."""
    from safetensors.torch import load_file
    folder = Path(folder)
    record = read_record(folder) or {}
    info = record.get("packed") or {}
    version = info.get("version")
    if info.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) or \
            version not in VERSIONS:
        raise HybridPruneError(f"{folder / RECORD_FILE} does not describe a {FORMAT} folder of version "
                               f"{' or '.join(map(str, VERSIONS))} (it says format {info.get('format')!r}, version "
                               f"{version!r}): a newer hybridprune wrote it, or the file was changed")
    f = folder / PACKED_FILE
    layouts = info.get("matrices")
    if not isinstance(layouts, dict) or not layouts:
        raise HybridPruneError(f"{folder / RECORD_FILE} lists no packed matrices; re-pack the model")
    pattern = (record.get("prune") or {}).get("pattern_detail") or {}
    for key, layout in layouts.items():
        check_layout(f, key, layout)
        _check_against_pattern(f, key, layout, pattern)
        if layout.get("values") == "int8" and version < INT8_VERSION:
            raise HybridPruneError(f"{folder / RECORD_FILE} says version {version}, but {key} has int8 values, which "
                                   f"need version {INT8_VERSION}; the file was changed: re-pack the model")
    check_safetensors(f)
    try:
        everything = load_file(str(f))
    except Exception as e:
        raise HybridPruneError(f"{f} cannot be read ({str(e).splitlines()[0]}); re-pack the model") from None
    if version >= 2:
        sums = info.get("checksums")
        if not isinstance(sums, dict):
            raise HybridPruneError(f"{folder / RECORD_FILE} has no checksums, which version {version} requires; "
                                   "re-pack the model")
        for name, t in everything.items():
            if sums.get(name) != checksum(t):
                raise HybridPruneError(f"{f}: tensor {name} does not match its checksum in {RECORD_FILE}: the file "
                                       "is corrupt; re-pack the model (or restore the file)")
        extra = set(sums) - set(everything)
        if extra:
            raise HybridPruneError(f"{f} lacks tensor {sorted(extra)[0]} that {RECORD_FILE} lists; re-pack the model")
    else:
        logger.warning(f"{folder} is a version-{version} packed folder: it carries no checksums, so corruption "
                       "cannot be detected; unpack and pack it again to add them")
    packed = {key: {} for key in layouts}
    plain = {}
    for name, t in everything.items():
        owner = name.rsplit(".", 1)[0]
        if owner in layouts:
            packed[owner][name.rsplit(".", 1)[1]] = t
        else:
            plain[name] = t
    for key, layout in layouts.items():
        want = expected_shapes(layout, packed[key])
        for field, shape in want.items():
            got = packed[key].get(field)
            if got is None:
                raise HybridPruneError(f"{f}: tensor {key}.{field} is missing; re-pack the model")
            if tuple(got.shape) != tuple(shape):
                raise HybridPruneError(f"{f}: tensor {key}.{field} is {list(got.shape)}, its metadata says "
                                       f"{list(shape)}; re-pack the model")
        for field, dtype in expected_dtypes(layout).items():
            got = packed[key].get(field)
            if got is not None and got.dtype != dtype:
                raise HybridPruneError(f"{f}: tensor {key}.{field} is {str(got.dtype).replace('torch.', '')}, its "
                                       f"layout says {str(dtype).replace('torch.', '')}; re-pack the model")
    return plain, packed, layouts


def unpacked_state(folder) -> tuple[dict, dict, dict]:
    """(the full state dict with every packed matrix unpacked, the packed tensors, the layouts)."""
    plain, packed, layouts = read_packed(folder)
    state = dict(plain)
    for key, layout in layouts.items():
        W = unpack_matrix(packed[key], layout)
        state[key] = W.t().contiguous() if layout.get("transposed") else W
    return state, packed, layouts


@contextlib.contextmanager
def packed_output(out, overwrite: bool = False, values: str = "float"):
    """Yield a temporary sibling of `out` (named as core.files.atomic_dir's, so a killed run's is cleaned up) to
    save a dense pruned folder into; when the block ends it is packed into `out` and removed."""
    out = Path(out)
    files.clean_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-unpacked")
    try:
        yield tmp
        pack_folder(tmp, out, overwrite=overwrite, values=values)
    finally:
        files.remove_path(tmp)


def load_packed(folder, dtype=None):
    """Load a packed folder as an ordinary transformers model, weights unpacked. Returns (model, tokenizer, packed,
    layouts): the packed tensors and their layouts, which sparse.kernels.sparsify_ computes from."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    models.check_causal_lm(config, str(folder))
    state, packed, layouts = unpacked_state(folder)
    _check_orientation(folder, layouts)
    saved = next(iter(layouts.values()))["dtype"] if layouts else "float32"
    torch_dtype = models._dtype(dtype if dtype not in (None, "auto") else saved)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class wants a path; the model class does not
        model = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise HybridPruneError(f"cannot load the packed model {folder}: {str(e).splitlines()[0]}") from None
    del state
    model.eval()
    model.config.use_cache = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, packed, layouts


def unpack_folder(src, out, overwrite: bool = False) -> None:
    """A packed folder back to an ordinary from_pretrained folder (model.safetensors), every weight restored."""
    import shutil

    from safetensors.torch import save_file
    src = Path(src)
    state, _, _ = unpacked_state(src)
    record = read_record(src) or {}
    record.pop("packed", None)
    with files.atomic_dir(out, overwrite=overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in (PACKED_FILE, RECORD_FILE):
                shutil.copy(f, tmp / f.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str))


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())

