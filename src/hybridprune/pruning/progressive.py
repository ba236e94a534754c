"""Progressive three-tier pruning: several rounds of tier ratios, blocks only ever move down.

    rounds:               # dense, N:M, top-k share of blocks per round
      - [0.90, 0.10, 0.00]
      - [0.80, 0.10, 0.10]
      - [0.35, 0.45, 0.20]

Each round re-scores the current (already partly pruned) model on the calibration samples and re-ranks the
blocks on their surviving weights; a block keeps at least the tier it had (dense -> N:M -> top-k) and no weight
pruned earlier is regrown. Between rounds an optional `recover(model, tokenizer, round)` callable runs (the place
for sparsity-preserving fine-tuning). After every round the model and its tier maps are written to
`<out>.partial/`, so `--resume` continues from the last finished round.
"""
from __future__ import annotations

import dataclasses
import logging
import json
import shutil
from pathlib import Path


from hybridprune.io import models
from hybridprune.io.data import resolve_bos
from hybridprune.core.specs import generates
from hybridprune.pruning import calibration
from hybridprune.io.folder import load_tier_maps
from hybridprune.pruning.engine import PruneConfig, PruneResult, prune, save_pruned
from hybridprune.core import yamlfile
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.patterns import TieredBlocks, parse_tiers

logger = logging.getLogger(__name__)


def load_schedule(path) -> list[tuple[float, float, float]]:
    path = Path(path)
    data = yamlfile.load(path, "schedule file")
    rounds = data.get("rounds") if isinstance(data, dict) else data
    if not rounds:
        raise HybridPruneError(f"schedule {path} has no `rounds:` list")
    if not isinstance(rounds, list) or not all(isinstance(r, (list, str)) for r in rounds):
        raise HybridPruneError(f"schedule {path}: `rounds:` must be a list of [dense, nm, topk] triples, e.g. "
                               f"[[0.5, 0.3, 0.2], [0.35, 0.45, 0.2]], got {rounds!r}")
    out = []
    for i, r in enumerate(rounds, 1):
        tiers = parse_tiers(r.replace("/", ",") if isinstance(r, str) else tuple(r))
        TieredBlocks(tiers=tiers)  # validates the ratios
        tiers = tuple(float(x) for x in tiers)
        if out and (tiers[0] > out[-1][0] + 1e-9 or tiers[2] < out[-1][2] - 1e-9):
            raise HybridPruneError(f"schedule {path}: round {i} {list(tiers)} moves blocks up the tiers after round "
                                   f"{i - 1} {list(out[-1])}; blocks only move down, so the dense share may only "
                                   "shrink and the top-k share only grow")
        out.append(tiers)
    return out


def _settings(config: PruneConfig) -> dict:
    """Options that change the result (the tiers come from the schedule; the device does not matter)."""
    rec = config.record()
    for k in ("tiers", "pattern_detail", "device"):
        rec.pop(k, None)
    return rec


def run_progressive(model, tokenizer, config: PruneConfig, schedule, out, source: str = "", overwrite=False,
                    resume=False, recover=None, samples=None) -> PruneResult:
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    floors, start, history = {}, 0, []
    settings = {"schedule": [list(r) for r in schedule], "prune": _settings(config),
                "recover": getattr(recover, "settings", None)}
    if resume and (partial / "state.json").is_file():
        state = json.loads((partial / "state.json").read_text())
        before = state.get("settings")
        if before != json.loads(json.dumps(settings, default=str)):
            changed = sorted(k for k in settings if (before or {}).get(k) != json.loads(json.dumps(settings[k],
                                                                                                 default=str)))
            raise HybridPruneError(f"--resume: the {' and '.join(changed) or 'settings'} differ from the run in "
                                   f"{partial}; rerun with the same schedule and options, or without --resume")
        start, history = state["finished_rounds"], state["history"]
        model, tokenizer = models.load_dense(str(partial / "model"))
        floors = load_tier_maps(partial / "model")
        logger.info(f"resuming after round {start} of {len(schedule)}")
    elif partial.exists():
        shutil.rmtree(partial)
    bos = resolve_bos(tokenizer, config.bos)
    if samples is None and config.method != "magnitude":
        if start and generates(config.calib):
            raise HybridPruneError(f"--resume would have the partly pruned model write its calibration text again "
                                   f"({config.calib}); rerun without --resume")
        samples = calibration.draw(tokenizer, config, model).samples
    seconds, result = 0.0, None
    for r in range(start, len(schedule)):
        cfg = dataclasses.replace(config, pattern="three-tier", tiers=schedule[r])
        result = prune(model, cfg, samples=samples, floors=floors)
        result.bos = bos
        floors, seconds = result.tier_maps, seconds + result.seconds
        report = models.sparsity_report(model)
        history.append({"round": r + 1, "tiers": list(schedule[r]), "sparsity": report["overall"],
                        "seconds": round(result.seconds, 2)})
        logger.info(f"round {r + 1}/{len(schedule)} tiers {schedule[r]}: sparsity {report['overall']:.4f}")
        if recover is not None:
            recover(model, tokenizer, r)
        partial.mkdir(parents=True, exist_ok=True)
        save_pruned(model, tokenizer, partial / "model", cfg, result, source, overwrite=True)
        (partial / "state.json").write_text(json.dumps({"finished_rounds": r + 1, "history": history,
                                                        "settings": settings}, default=str))
    if result is None:
        raise HybridPruneError("nothing to do: every round of the schedule already finished")
    result.seconds = seconds
    final = dataclasses.replace(config, pattern="three-tier", tiers=schedule[-1])
    save_pruned(model, tokenizer, out, final, result, source, overwrite=overwrite,
                extra_record={"progressive": {"schedule": [list(s) for s in schedule], "rounds": history}})
    shutil.rmtree(partial, ignore_errors=True)
    return result
