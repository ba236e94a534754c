"""`hybridprune inspect`: what a saved model's sparsity really is, checked against what was asked for."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from hybridprune.io import models
from hybridprune.sparse.load import load_model
from hybridprune.io.folder import (PACKED_FILE, RECORD_FILE, TIERS_FILE, load_permutations, load_tier_maps,
                                   read_record)
from hybridprune.sparse.packing import read_packed
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.patterns import NM_TIER, TOPK_TIER, check_nm, expand_tiers, parse_nm, to_blocks

TIER_NAMES = ("dense", "N:M", "top-k")


@torch.no_grad()
def check_tiers(W: torch.Tensor, tiers: torch.Tensor, b: int, n: int, m: int, k: int) -> dict:
    """Block counts per tier, whether every tier-2 block is N:M and every tier-3 block has <= k non-zeros, and
    the (block row, block column) of every block that breaks its tier's rule."""
    nz = W != 0
    full = expand_tiers(tiers, *W.shape, b)
    nm_ok = check_nm(nz & (full == NM_TIER), n, m)
    per_block = to_blocks(nz.float(), b).sum(-1)
    bad_topk = (tiers == TOPK_TIER) & (per_block > k)
    bad_nm = torch.zeros_like(bad_topk)
    if not nm_ok:  # which N:M blocks hold a group of m with more than n non-zeros
        cols = W.shape[1] - W.shape[1] % m
        groups = (nz & (full == NM_TIER))[:, :cols].reshape(W.shape[0], -1, m).sum(-1) > n
        over = groups.repeat_interleave(m, 1)
        over = torch.nn.functional.pad(over, (0, W.shape[1] - cols))
        bad_nm = (to_blocks(over.float(), b).sum(-1) > 0) & (tiers == NM_TIER)
    bad = [tuple(map(int, rc)) for rc in (bad_nm | bad_topk).nonzero().tolist()]
    counts = [int((tiers == t).sum()) for t in range(3)]
    return {"blocks": dict(zip(TIER_NAMES, counts)), "nm_valid": nm_ok, "topk_valid": not bool(bad_topk.any()),
            "bad_blocks": bad}


TIER_TOLERANCE = 0.02  # tier counts are rounded per matrix (or layer) and edge blocks are smaller than 16 x 16


TIERED = ("three-tier", "block", "block-topk")


def _tier_maps(folder: Path, record: dict) -> dict:
    """Each pruned matrix's tier map: tiers.safetensors, or, in a packed folder, each matrix's packed `tiers`."""
    if not record.get("packed"):
        return load_tier_maps(folder)
    _, packed, _ = read_packed(folder)
    return {key[:-len(".weight")]: t["tiers"] for key, t in packed.items() if "tiers" in t}


def inspect_folder(folder, plot_dir=None, matrices=None) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HybridPruneError(f"{folder} is not a saved model folder (no config.json)")
    if plot_dir and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        raise HybridPruneError(f"--plot {plot_dir} is a file; give a folder for the PNG pictures")
    model, _ = load_model(str(folder))
    report = models.sparsity_report(model)
    record = read_record(folder) or {}
    detail = (record.get("prune") or {}).get("pattern_detail") or {}
    tier_maps = _tier_maps(folder, record)
    mats = models.prunable_matrices(model)
    lines = [f"{folder}: overall sparsity {report['overall']:.4f} over {report['prunable_params']:,} prunable weights"]
    violations = []
    if detail:
        lines.append(f"pattern {detail.get('pattern')}: expected {detail.get('sparsity', 0):.4f}")
    packed = record.get("packed")
    if packed:
        lines.append(f"packed ({packed['format']} v{packed['version']}): {len(packed['matrices'])} matrices, "
                     f"{packed['dense_bytes'] / 1e6:.1f} MB dense -> {packed['packed_bytes'] / 1e6:.1f} MB "
                     f"({packed['packed_bytes'] / packed['dense_bytes']:.4f})")
    skipped = set(record.get("skipped") or [])
    if detail.get("pattern") == "unstructured" or detail.get("pattern", "").count(":") == 1:
        # Unstructured and N:M fix every matrix's zero count (up to rounding to whole weights of a row).
        by_layer = record.get("layer_sparsity") or {}  # OWL: each layer's own target
        for name, mod in mats.items():
            layer = re.search(r"\.(\d+)\.", name)
            want = by_layer.get(layer.group(1), detail.get("sparsity", 0)) if layer else detail.get("sparsity", 0)
            W = models.weight_matrix(mod)
            got = float((W == 0).float().mean())
            # per row int(cols * s) (per matrix or column block: at least as many), N:M exactly 1 - n/m
            if name not in skipped and got < math.floor(W.shape[1] * want + 1e-9) / W.shape[1] - 1e-9:
                violations.append(f"{name}: sparsity {got:.4f} below the pattern's {want:.4f}")
    if detail.get("pattern", "").count(":") == 1:
        nm = parse_nm(detail["pattern"])
        perms = load_permutations(folder)  # --channel-permutation: groups are cut in each matrix's column order
        permuted = detail.get("channel_permutation", "none") != "none"
        bad, unordered = [], []
        for name, mod in mats.items():
            if name in skipped:
                continue
            W = models.weight_matrix(mod)
            if permuted and (name not in perms or perms[name].numel() != W.shape[1]):
                unordered.append(name)
            elif not check_nm((W[:, perms[name].long()] if permuted else W) != 0, *nm):
                bad.append(name)
        report["nm_valid"] = not bad and not unordered
        violations += [f"{name}: a group of {nm[1]} holds more than {nm[0]} non-zeros"
                       + (" (in its saved column order)" if permuted else "") for name in bad]
        violations += [f"{name}: pruned with a channel permutation, but permutations.safetensors has no column "
                       "order of its size" for name in unordered]
        lines.append(f"N:M groups valid{' (permuted columns)' if permuted else ''}: "
                     f"{'yes' if report['nm_valid'] else 'NO: ' + ', '.join((bad + unordered)[:5])}")
    if detail.get("pattern") in TIERED:  # what the record promises must be there
        missing = [name for name in mats if name not in skipped and name not in tier_maps]
        if missing:
            where = f"{PACKED_FILE} holds" if record.get("packed") else \
                f"{TIERS_FILE} {'is missing' if not (folder / TIERS_FILE).is_file() else 'holds'}"
            violations.append(f"the record says {detail['pattern']}, but {where} no tier map for {len(missing)} "
                              f"pruned matrices (e.g. {missing[0]}): the folder is incomplete; re-prune it")
    if tier_maps:
        b, k = detail.get("block_size", 16), detail.get("topk", 15)
        n, m = parse_nm(detail.get("tier_nm", "2:4"))
        tiers_report = {name: check_tiers(models.weight_matrix(mats[name]), t, b, n, m, k)
                        for name, t in tier_maps.items() if name in mats}
        report["tiers"] = tiers_report
        totals = [sum(r["blocks"][t] for r in tiers_report.values()) for t in TIER_NAMES]
        ok = all(r["nm_valid"] and r["topk_valid"] for r in tiers_report.values())
        for name, r in tiers_report.items():
            if r["bad_blocks"]:
                blocks = ", ".join(f"({i},{j})" for i, j in r["bad_blocks"][:4])
                violations.append(f"{name}: {len(r['bad_blocks'])} block(s) break their tier's rule, e.g. block "
                                  f"(row,col) {blocks}")
        lines.append("blocks by tier: " + ", ".join(f"{t} {c}" for t, c in zip(TIER_NAMES, totals))
                     + f"; tier rules hold: {'yes' if ok else 'NO'}")
        want = detail.get("sparsity")
        if want is not None and detail.get("retention") is None:  # the adaptive rule has no fixed target
            tiered = [models.weight_matrix(mats[n]) for n in tier_maps if n in mats and n not in skipped]
            got = sum(int((W == 0).sum()) for W in tiered) / max(sum(W.numel() for W in tiered), 1)
            if abs(got - want) > TIER_TOLERANCE:
                violations.append(f"tiered matrices: measured sparsity {got:.4f}, but the recorded pattern "
                                  f"({detail.get('tiers')}) gives {want:.4f}")
    recorded = record.get("sparsity")
    if recorded is not None and abs(recorded - report["overall"]) > 1e-4:
        violations.append(f"measured sparsity {report['overall']:.4f} differs from the {recorded:.4f} recorded in "
                          f"{RECORD_FILE}")
    lines.append(f"{'layer':<24}{'sparsity':>9}  matrices")
    for layer in report["layers"]:
        cells = " ".join(f"{n.split('.')[-1]}={v['sparsity']:.3f}" for n, v in layer["matrices"].items())
        lines.append(f"{layer['layer']:<24}{layer['sparsity']:>9.4f}  {cells}")
    if plot_dir:
        from hybridprune.core.plots import plot_layer_sparsity, plot_tier_maps
        written = [plot_layer_sparsity(report, tier_maps, Path(plot_dir) / "sparsity_by_layer.png")]
        if tier_maps:
            chosen = _choose(tier_maps, matrices)
            written.append(plot_tier_maps({n: tier_maps[n] for n in chosen}, Path(plot_dir) / "tier_maps.png"))
        lines.append("plots: " + ", ".join(map(str, written)))
        report["plots"] = [str(p) for p in written]
    lines += [f"VIOLATION {v}" for v in violations]
    report["text"] = "\n".join(lines)
    report["record"] = record
    report["violations"] = violations
    return report


def _choose(tier_maps, patterns):
    """Matrices to draw: those matching the patterns, else every matrix of the first decoder layer."""
    names = list(tier_maps)
    if patterns:
        chosen = [n for n in names if any(models.name_matches(n, p) for p in patterns)]
        if not chosen:
            raise HybridPruneError(f"no matrix matches {patterns}; names look like {names[0]}")
        return chosen[:12]
    first_layer = re.match(r"^(.*?\.\d+)\.", names[0])
    prefix = first_layer.group(1) + "." if first_layer else ""
    return [n for n in names if n.startswith(prefix)][:8]
