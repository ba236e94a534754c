"""Experiments: calibration data x fine-tuning data x seeds x tasks in one resumable command, one report.

    recipe (recipe.py) -> stages  prune(pattern, calibration, seed) -> finetune(pruned model, setup, seed)
                                  -> eval(model, task)
    every stage lives in <out>/stages/<kind>-<key>, where key hashes the stage's whole configuration and the keys
    of its inputs; stages are written atomically, so a finished stage is never computed again, a killed run
    continues where it stopped, and a changed setting re-runs only the stages that depend on it. Stages shared by
    several runs (Exp 1 and Exp 3 share their pruned model; the dense model is the same at every seed) are
    computed once, and a recipe with one more seed computes only that seed's stages.
    processes: each stage (a model's eval stages together) runs in a child of multiprocessing's fork server, so it
    starts on a fresh heap and the run's peak memory is its largest stage's; `isolate=False` runs all in process.
    report (report.py): per run and metric the mean over seeds with its spread, paired differences on the same
    examples with intervals over seeds and examples, the claims, and the mask overlap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybridprune.core import files, specs
from hybridprune.core.errors import HybridPruneError, interrupt_on_sigterm
from hybridprune.core.heap import cap_heap_growth, release
from hybridprune.core.files import write_text_atomic
from hybridprune.experiments.recipe import MAGNITUDE, Recipe, load_recipe

logger = logging.getLogger(__name__)
PEAKS_FILE = "peak_rss.json"  # in stages/: the peak RSS (KiB) of the process that ran each stage (isolated runs)


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
            config.update(**recipe.calibration[calib_name], seed=seed)
            label = f"prune {pattern} / calibration {calib_name}" + (f" / seed {seed}" if several else "")
        spec = {"model": recipe.model, "dtype": recipe.dtype, "config": config}
        key = _key(["prune", spec])
        return add(Stage("prune", key, label, spec, out / "stages" / f"prune-{key}"), seed_index)

    by_run, pruned = {}, {}
    for run in recipe.runs:
        by_run[run.name] = {}
        for seed_index, seed in enumerate(recipe.seeds):
            model_stage = None
            if run.calibration == MAGNITUDE:  # the same stage at every seed, as the dense model's
                model_stage = prune_stage(run.pattern, None)
            elif run.calibration is not None:
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


def _generated_calibration(stage: Stage, config):
    """Text the model writes to calibrate itself (--calib self, self:SOURCE) depends on the model, the seed and the
    generation settings, not on the pattern: it is generated once and kept in stages/calibration-KEY for every
    pattern that prunes with it."""
    from hybridprune.pruning import calibration
    if not (specs.generates(config.calib) and specs.needs_calibration(config.method)):
        return None
    key = _key(["calibration", stage.spec["model"], stage.spec["dtype"],
                {f: getattr(config, f) for f in calibration.GENERATION_FIELDS}])
    path = stage.path.parent / f"calibration-{key}"
    if (path / "record.json").is_file():
        return calibration.load(path)
    from hybridprune.io.models import load_dense
    model, tok = load_dense(stage.spec["model"], dtype=stage.spec["dtype"])
    calib = calibration.draw(tok, config, model)
    del model
    calibration.save(calib, path)
    return calib


def _run_stage(stage: Stage, recipe: Recipe, device: str | None, loaded: dict) -> None:
    """Run one stage. `loaded` keeps the last model that eval stages loaded (a model's eval stages run one after
    another, so it is read once, not once per task); tokenized fine-tuning data is cached on disk (out/stages/data)."""
    from hybridprune.pruning.engine import PruneConfig, prune, save_pruned
    from hybridprune.io.folder import read_record
    from hybridprune.sparse.load import load_model
    if stage.kind != "eval" and loaded:  # a prune or fine-tune stage needs no evaluated model
        loaded.clear()
        release()
    if stage.kind == "prune":
        from hybridprune.pruning.streaming import prune_streamed, streamable
        config = PruneConfig(**stage.spec["config"], device=device)
        calib = _generated_calibration(stage, config)
        if streamable(stage.spec["model"]):  # as `prune` does: one layer in memory at a time
            prune_streamed(stage.spec["model"], config, stage.path, overwrite=True, dtype=stage.spec["dtype"],
                           calib=calib)
            return
        model, tok = load_model(stage.spec["model"], dtype=stage.spec["dtype"])
        result = prune(model, config, tokenizer=tok, calib=calib)
        save_pruned(model, tok, stage.path, config, result, source=stage.spec["model"], overwrite=True)
    elif stage.kind == "finetune":
        from hybridprune.finetuning.finetune import FinetuneConfig, finetune_and_save
        config = FinetuneConfig(**stage.spec["config"], device=device)
        finetune_and_save(str(stage.input.path), config, stage.path, overwrite=True, resume=True,
                          dtype=recipe.dtype, data_cache=stage.path.parent / "data")
    else:
        from hybridprune.evaluation.tasks import evaluate_model
        spec = str(stage.input.path) if stage.input else recipe.model
        if loaded.get("eval_spec") != spec:
            loaded.pop("eval_model", None)  # free the previous model before reading the next
            model, tok = load_model(spec, dtype=recipe.dtype, kernels=bool(recipe.eval.get("kernels")))
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
                             generate_batch_size=s.get("generate_batch_size", recipe.eval.get("generate_batch_size")),
                             generate=s.get("generate", True))
        record = read_record(spec) if stage.input else None
        files.write_text_atomic(stage.path, json.dumps({"model": spec, "stage": stage.spec, "hybridprune": record,
                                                         "results": res}, default=str))


def run_experiment(recipe_path, out, quick: bool = False, only: str | None = None, device: str | None = None,
                   dtype: str | None = None, kernels: bool = False, isolate: bool | None = None, log=None) -> dict:
    """Run every unfinished stage of the recipe, then write the report. Returns the results dict.

    isolate: run each stage (a model's eval stages together) in a process of its own, so that a stage starts on a
    fresh heap and the study's peak memory is its largest stage's; None: where the platform can (Linux). This
    process then only plans and waits: the recipe is checked here without torch, and torch is not imported here
    until every stage has run (the report reads the masks). log: where progress lines go (default: the
    `hybridprune` logger at INFO)."""
    log = log or logger.info
    if only not in (None, "prune", "finetune", "eval", "report"):
        raise HybridPruneError(f"unknown --only {only!r}; use prune, finetune, eval or report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HybridPruneError(f"--out {out} is a file; give a folder for the run (its stages are cached there)")
    files.check_out_path(out)
    if isolate is None:
        isolate = can_isolate()
    cap_heap_growth()  # before any stage: freed tensors go back to the OS (the study's peak is one stage's)
    recipe = _check(recipe_path, quick, device, dtype, kernels)  # the configs and checks import no torch
    (out / "stages").mkdir(parents=True, exist_ok=True)
    stages, by_run, pruned = plan(recipe, out)
    times_file = out / "stages" / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    peaks_file = out / "stages" / PEAKS_FILE  # peak RSS (KiB) of the process that ran each stage, where isolated
    peaks = json.loads(peaks_file.read_text()) if peaks_file.is_file() else {}
    todo = [s for s in stages if not s.done() and (only in (None, s.kind))]
    log(f"{len(stages)} stages, {len(stages) - len([s for s in stages if not s.done()])} already done, "
        f"{len(todo)} to run")
    took: dict[str, list[float]] = {}
    number = {s.key: i for i, s in enumerate(todo, 1)}
    by_key = {s.key: s for s in todo}
    for job in _jobs(todo):
        events = _in_child(job, recipe, device) if isolate else _run_job(job, recipe, device)
        for event, key, value in events:
            stage = by_key[key]
            if event == "start":
                eta = _eta(todo[number[key] - 1:], took)
                log(f"[stage {number[key]}/{len(todo)}] {stage.label}" + (f"  (ETA {eta})" if eta else ""))
            elif event == "done":
                took.setdefault(_timing_group(stage), []).append(value)
                times[key] = round(value, 1)
                write_text_atomic(times_file, json.dumps(times, indent=1))
            else:  # "peak": the job's process, KiB
                log(f"  its process peaked at {value / 1024:,.0f} MiB")
                peaks.update({s.key: value for s in job})
                write_text_atomic(peaks_file, json.dumps(peaks, indent=1))
    if any(not s.done() for s in stages):
        log("some stages have not run yet (--only); the report covers what exists")
        if only != "report":
            return {}
    from hybridprune.experiments.report import build_report
    results = build_report(recipe, stages, by_run, pruned, times, out, peaks)
    log(f"wrote {out / 'report.md'}, results.json, results.csv and plots/")
    return results


def _check(recipe_path, quick, device, dtype, kernels) -> Recipe:
    """The recipe, checked, with the command's overrides; every mistake is refused here, before any stage."""
    specs.check_device_name(device)  # whether it exists is asked where a stage uses it
    specs.data_dir()  # the stages read HYBRIDPRUNE_DATA (which --data-dir sets): a missing folder is refused now
    recipe = load_recipe(recipe_path, quick=quick)
    if dtype is not None:
        specs.check_dtype(dtype)  # refuse an unknown name before any work
        recipe.dtype = dtype
    if kernels:
        recipe.eval["kernels"] = True
    if recipe.eval.get("kernels"):
        specs.check_toolchain()  # HYBRIDPRUNE_KERNELS and a compiler, before any stage
    if recipe.model != "default":
        specs.check_model_spec(recipe.model)  # a missing model is refused before anything is written
    return recipe


# ----------------------------------------------------------------------------- one process per stage

def _jobs(todo: list[Stage]) -> list[list[Stage]]:
    """Consecutive eval stages of one model form one job (the model is read once); any other stage is a job."""
    jobs: list[list[Stage]] = []
    for stage in todo:
        last = jobs[-1][-1] if jobs else None
        if last is not None and stage.kind == last.kind == "eval" and stage.spec["input"] == last.spec["input"]:
            jobs[-1].append(stage)
        else:
            jobs.append([stage])
    return jobs


def _run_job(job: list[Stage], recipe: Recipe, device: str | None):
    """Run a job's stages in this process. Yields ("start", key, None) and ("done", key, seconds)."""
    loaded: dict = {}
    for stage in job:
        if stage.input is not None and not stage.input.done():
            raise HybridPruneError(f"{stage.label} needs {stage.input.label}, which has not run; run without --only")
        yield "start", stage.key, None
        t = time.perf_counter()
        _run_stage(stage, recipe, device, loaded)
        release()  # the study's peak RSS is its largest stage, not their sum
        yield "done", stage.key, time.perf_counter() - t
    loaded.clear()
    release()


def can_isolate() -> bool:
    """Stages get processes of their own where multiprocessing has a fork server (Linux; fork itself is unsafe
    once OpenMP has run in the parent: its thread pool does not survive into the child)."""
    return sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()


def _in_child(job: list[Stage], recipe: Recipe, device: str | None):
    """Run a job in a child of the fork server and pass on its events. A child starts on a fresh heap: glibc's
    fragments of earlier stages (0.2 GiB at the study's third SQuAD LoRA) do not add to its peak. Its errors come
    back as they would in process; a child that dies without one (killed, out of memory) is one line naming the
    stage, and its temporaries are removed."""
    current = job[0]
    try:
        for message in _child_events(_run_job, (job, recipe, device), f"hybridprune {job[0].kind}"):
            if message[0] == "start":
                current = next(s for s in job if s.key == message[1])
            yield message
    except _ChildFailed as e:
        if e.exitcode is not None:
            _clean_after(job, e.pid)
        raise e.error(current.label) from None


class _ChildFailed(Exception):
    """A child's error (kind 'input' or 'crash', with its text) or its death (exitcode, pid)."""

    def __init__(self, kind=None, text=None, exitcode=None, pid=None):
        super().__init__(text or exitcode)
        self.kind, self.text, self.exitcode, self.pid = kind, text, exitcode, pid

    def error(self, what: str) -> Exception:
        if self.exitcode is None:
            return HybridPruneError(self.text) if self.kind == "input" else RuntimeError(f"{what} failed: {self.text}")
        how = (f"was killed by signal {-self.exitcode}" + (" (out of memory?)" if self.exitcode == -9 else "")
               if self.exitcode < 0 else f"ended with exit code {self.exitcode}")
        return HybridPruneError(f"{what}: its process {how}; rerun to continue from there")


def _child_events(target, args: tuple, name: str):
    """Run the generator target(*args) in a child of multiprocessing's fork server, which imported the libraries
    once and never computed, and yield what it yields. Raises _ChildFailed if it fails or dies."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "hybridprune.pruning.engine", "hybridprune.finetuning.finetune", "hybridprune.evaluation.tasks"])
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None  # as set in this process
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, name=name, args=(send, target, args, dict(os.environ), threads))
    child.start()
    send.close()
    error = None
    try:
        while True:
            try:
                message = receive.recv()
            except EOFError:
                break
            if message[0] == "error":
                error = message
                continue
            yield message
        child.join()
    finally:
        if child.is_alive():  # interrupted here (Ctrl-C, SIGTERM): the child cleans up as the CLI does, then ends
            child.terminate()
            child.join()
        receive.close()
    if error is not None:
        raise _ChildFailed(kind=error[1], text=error[2])
    if child.exitcode:
        raise _ChildFailed(exitcode=child.exitcode, pid=child.pid)


def _clean_after(job: list[Stage], pid: int) -> None:
    """What a job's process, `pid`, killed mid-stage left: temporary siblings of its stages' outputs, and a
    fine-tuning work folder without a checkpoint to resume from (as the fine-tuning leaves on an error)."""
    from hybridprune.core.files import clean_stale_temporaries
    for stage in job:
        clean_stale_temporaries(stage.path)
        for tmp in stage.path.parent.glob(f".{stage.path.name}.tmp-{pid}"):
            tmp.unlink(missing_ok=True)
        work = stage.path.with_name(stage.path.name + ".checkpoints")
        if stage.kind == "finetune" and work.is_dir() and not any(work.glob("checkpoint-*")):
            shutil.rmtree(work, ignore_errors=True)


def _child_main(conn, target, args, environ, threads) -> None:
    """A child's process: the parent's environment and threads (multiprocessing moves it to the parent's folder), a
    capped heap, SIGTERM as Ctrl-C (its temporaries go); sends target(*args)'s events, then its peak RSS (KiB) for
    the last stage it named."""
    import resource
    import signal
    import traceback

    import torch

    os.environ.clear()
    os.environ.update(environ)  # the fork server keeps the environment it started with
    if threads is not None:
        torch.set_num_threads(threads)
    cap_heap_growth()
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)  # as the command itself takes it
    try:
        last = None
        for event in target(*args):
            conn.send(event)
            last = event[1]
        if last is not None:
            conn.send(("peak", last, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    except HybridPruneError as e:
        conn.send(("error", "input", str(e)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it there
        traceback.print_exc()
        conn.send(("error", "crash", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    finally:
        conn.close()


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


