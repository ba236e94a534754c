"""Experiments: calibration data x fine-tuning data x seeds x tasks in one resumable command, one report.

    recipe (recipe.py) -> stages  prune(pattern, calibration, seed) -> finetune(pruned model, setup, seed)
                                  -> eval(model, task)
    every stage lives in <out>/stages/<kind>-<key>, where key hashes the stage's whole configuration and the keys
    of its inputs; stages are written atomically, so a finished stage is never computed again, a killed run
    continues where it stopped, and a changed setting re-runs only the stages that depend on it. Stages shared by
    several runs (Exp 1 and Exp 3 share their pruned model; the dense model is the same at every seed) are
    computed once, and a recipe with one more seed computes only that seed's stages.
    report (report.py): per run and metric the mean over seeds with its spread, paired differences on the same
    examples with intervals over seeds and examples, the claims, and the mask overlap.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import HybridPruneError
from .heap import cap_heap_growth, release
from .recipe import Recipe, load_recipe
from .report import build_report


# ----------------------------------------------------------------------------- stages

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Stage:
    kind: str          # prune | finetune | eval
    key: str
    label: str
    spec: dict
    path: Path
    input: "Stage | None" = None

    def done(self) -> bool:
        return self.path.exists()


def plan(recipe: Recipe, out: Path) -> tuple[list[Stage], dict, dict]:
    """The stages in execution order; by_run[run][seed] = {task: eval stage, '_model': model stage}; the pruned
    models by (pattern, calibration, seed), plus magnitude references by pattern under ('magnitude', pattern)."""
    stages: dict[str, Stage] = {}
    rank: dict[str, int] = {}  # the index of the first seed that needs a stage: seeds run one after another
    several = len(recipe.seeds) > 1

    def add(stage: Stage, seed_index: int = 0) -> Stage:
        rank.setdefault(stage.key, seed_index)
        return stages.setdefault(stage.key, stage)

    def prune_stage(pattern, calib_name, seed=None, seed_index=0):
        config = dict(recipe.patterns[pattern])
        if calib_name is None:  # the calibration-free reference for the overlap table
            config.update(method="magnitude", tier_metric=None, refit=None, dsnot=False, layer_sparsity="uniform")
            label = f"prune magnitude ({pattern})"
        else:
            config.update(calib=recipe.calibration[calib_name], seed=seed)
            label = f"prune {pattern} / calibration {calib_name}" + (f" / seed {seed}" if several else "")
        spec = {"model": recipe.model, "dtype": recipe.dtype, "config": config}
        key = _key(["prune", spec])
        return add(Stage("prune", key, label, spec, out / "stages" / f"prune-{key}"), seed_index)

    by_run, pruned = {}, {}
    for run in recipe.runs:
        by_run[run.name] = {}
        for seed_index, seed in enumerate(recipe.seeds):
            model_stage = None
            if run.calibration is not None:
                model_stage = prune_stage(run.pattern, run.calibration, seed, seed_index)
                pruned[(run.pattern, run.calibration, seed)] = model_stage
                if run.finetune != "none":
                    spec = {"input": model_stage.key, "config": {**recipe.finetune[run.finetune], "seed": seed}}
                    key = _key(["finetune", spec])
                    model_stage = add(Stage("finetune", key, f"finetune {run.finetune} on {model_stage.label}", spec,
                                            out / "stages" / f"finetune-{key}", model_stage), seed_index)
            cell = by_run[run.name][seed] = {"_model": model_stage}
            for task, settings in recipe.tasks.items():  # the dense model's stages are the same at every seed
                spec = {"input": model_stage.key if model_stage else f"dense:{recipe.model}", "task": task,
                        "settings": settings, "eval": recipe.eval, "dtype": recipe.dtype}
                key = _key(["eval", spec])
                what = model_stage.label if model_stage else "dense"
                cell[task] = add(Stage("eval", key, f"eval {task} on {what}", spec, out / "stages" / f"eval-{key}.json",
                                       model_stage), seed_index)
    for pattern in {p for p, _, _ in pruned}:
        pruned[("magnitude", pattern)] = prune_stage(pattern, None)
    order = {"prune": 0, "finetune": 1, "eval": 2}  # seed by seed, so that a stopped run leaves whole seeds
    return sorted(stages.values(), key=lambda s: (rank[s.key], order[s.kind])), by_run, pruned


def _run_stage(stage: Stage, recipe: Recipe, device: str | None, loaded: dict) -> None:
    """Run one stage. `loaded` keeps the last model that eval stages loaded (a model's eval stages run one after
    another, so it is read once, not once per task); tokenized fine-tuning data is cached on disk (out/stages/data)."""
    from . import models
    from .engine import PruneConfig, prune, save_pruned
    if stage.kind != "eval" and loaded:  # a prune or fine-tune stage needs no evaluated model
        loaded.clear()
        release()
    if stage.kind == "prune":
        from .streaming import prune_streamed, streamable
        config = PruneConfig(**stage.spec["config"], device=device)
        if streamable(stage.spec["model"]):  # as `prune` does: one layer in memory at a time
            prune_streamed(stage.spec["model"], config, stage.path, overwrite=True, dtype=stage.spec["dtype"])
            return
        model, tok = models.load_model(stage.spec["model"], dtype=stage.spec["dtype"])
        result = prune(model, config, tokenizer=tok)
        save_pruned(model, tok, stage.path, config, result, source=stage.spec["model"], overwrite=True)
    elif stage.kind == "finetune":
        from .finetune import FinetuneConfig, finetune_and_save
        config = FinetuneConfig(**stage.spec["config"], device=device)
        finetune_and_save(str(stage.input.path), config, stage.path, overwrite=True, resume=True,
                          dtype=recipe.dtype, data_cache=stage.path.parent / "data")
    else:
        from .tasks import evaluate_model
        spec = str(stage.input.path) if stage.input else recipe.model
        if loaded.get("eval_spec") != spec:
            loaded.pop("eval_model", None)  # free the previous model before reading the next
            model, tok = models.load_model(spec, dtype=recipe.dtype, kernels=bool(recipe.eval.get("kernels")))
            if device:
                model.to(device)
            loaded.update(eval_spec=spec, eval_model=(model, tok))
        model, tok = loaded["eval_model"]
        s = stage.spec["settings"]
        res = evaluate_model(model, tok, [stage.spec["task"]], limit=s.get("limit"), sample=s.get("sample"),
                             sample_seed=recipe.eval.get("sample_seed", 0),
                             num_fewshot=s.get("num_fewshot"), gsm8k_mode=s.get("mode", "fewshot"),
                             ppl_seqlen=s.get("seqlen", 2048), ppl_windows=s.get("windows"),
                             batch_size=recipe.eval.get("batch_size", 8),
                             generate_batch_size=s.get("generate_batch_size", recipe.eval.get("generate_batch_size")))
        record = models.read_record(spec) if stage.input else None
        models.write_text_atomic(stage.path, json.dumps({"model": spec, "stage": stage.spec, "hybridprune": record,
                                                         "results": res}, default=str))


def run_experiment(recipe_path, out, quick: bool = False, only: str | None = None, device: str | None = None,
                   dtype: str | None = None, kernels: bool = False, log=print) -> dict:
    """Run every unfinished stage of the recipe, then write the report. Returns the results dict."""
    from . import models
    from .engine import default_device
    from .models import write_text_atomic

    if only not in (None, "prune", "finetune", "eval", "report"):
        raise HybridPruneError(f"unknown --only {only!r}; use prune, finetune, eval or report")
    default_device(device)
    recipe = load_recipe(recipe_path, quick=quick)
    cap_heap_growth()  # before any stage: freed tensors go back to the OS (the study's peak is one stage's)
    if dtype is not None:
        from .models import _dtype
        _dtype(dtype)  # refuse an unknown name before any work
        recipe.dtype = dtype
    if kernels:
        recipe.eval["kernels"] = True
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HybridPruneError(f"--out {out} is a file; give a folder for the run (its stages are cached there)")
    if recipe.model != "default":
        models.resolve_model(recipe.model)  # a missing model is refused before anything is written
    (out / "stages").mkdir(parents=True, exist_ok=True)
    stages, by_run, pruned = plan(recipe, out)
    times_file = out / "stages" / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    todo = [s for s in stages if not s.done() and (only in (None, s.kind))]
    log(f"{len(stages)} stages, {len(stages) - len([s for s in stages if not s.done()])} already done, "
        f"{len(todo)} to run")
    took: dict[str, list[float]] = {}
    loaded: dict = {}
    for i, stage in enumerate(todo, 1):
        if stage.input is not None and not stage.input.done():
            raise HybridPruneError(f"{stage.label} needs {stage.input.label}, which has not run; run without --only")
        eta = _eta(todo[i - 1:], took)
        log(f"[stage {i}/{len(todo)}] {stage.label}" + (f"  (ETA {eta})" if eta else ""))
        t = time.perf_counter()
        _run_stage(stage, recipe, device, loaded)
        release()  # the study's peak RSS is its largest stage, not their sum
        seconds = time.perf_counter() - t
        took.setdefault(_timing_group(stage), []).append(seconds)
        times[stage.key] = round(seconds, 1)
        write_text_atomic(times_file, json.dumps(times, indent=1))
    if any(not s.done() for s in stages):
        log("some stages have not run yet (--only); the report covers what exists")
        if only != "report":
            return {}
    results = build_report(recipe, stages, by_run, pruned, times, out)
    log(f"wrote {out / 'report.md'}, results.json, results.csv and plots/")
    return results


def _timing_group(stage: Stage) -> str:
    """Stages expected to take alike: eval stages per task (GSM8K generation is not a perplexity pass)."""
    return f"eval {stage.spec['task']}" if stage.kind == "eval" else stage.kind


def _eta(remaining: list[Stage], took: dict[str, list[float]]) -> str:
    """Sum over the remaining stages of the mean time of finished stages alike (same group, else same kind,
    else any)."""
    if not took:
        return ""

    def mean(values):
        return sum(values) / len(values)
    every = [x for v in took.values() for x in v]
    by_kind: dict[str, list[float]] = {}
    for group, values in took.items():
        by_kind.setdefault(group.split()[0], []).extend(values)
    seconds = sum(mean(took.get(_timing_group(s)) or by_kind.get(s.kind) or every) for s in remaining)
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


