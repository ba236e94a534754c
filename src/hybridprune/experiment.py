"""Experiments: calibration data x fine-tuning data x tasks in one resumable command, one report.

    recipe (YAML) -> stages  prune(pattern, calibration) -> finetune(pruned model, setup) -> eval(model, task)
    every stage lives in <out>/stages/<kind>-<key>, where key hashes the stage's whole configuration and the keys
    of its inputs; stages are written atomically, so a finished stage is never computed again, a killed run
    continues where it stopped, and a changed setting re-runs only the stages that depend on it. Stages shared by
    several runs (Exp 1 and Exp 3 share their pruned model) are computed once.
    report: runs x metrics (mean +- stderr), paired differences on the same examples with 95% bootstrap
    intervals (and McNemar's test for accuracies), the recipe's claims judged on those intervals, and the overlap
    (Jaccard) of the pruned sets of different calibrations and of magnitude pruning: summed over matrices,
    |A & B| / |A | B| of all pruned weights, and the same per matrix type and per layer.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import HybridPruneError

TOP_KEYS = {"model", "prune", "patterns", "calibration", "finetune", "runs", "tasks", "claims", "eval", "quick",
            "dtype"}
TASK_KEYS = {"wikitext2": {"windows", "seqlen"}, "boolq": {"limit", "num_fewshot"},
             "squad": {"limit", "num_fewshot"}, "gsm8k": {"limit", "num_fewshot", "mode"}}
METRICS = {"wikitext2": {"ppl"}, "boolq": {"acc", "gold_nll", "margin"}, "squad": {"exact_match", "f1", "gold_nll"},
           "gsm8k": {"exact_match[strict-match]", "exact_match[flexible-extract]", "gold_nll"}}
EVAL_KEYS = ("batch_size", "generate_batch_size")
PER_EXAMPLE = {"ppl": "nll"}  # perplexity is compared on its per-window NLL (same ordering)
BINARY = ("acc", "exact_match")
CLAIM = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+)\s+on\s+(\w+)\.(\S+)\s*$")


# ----------------------------------------------------------------------------- recipe

class _LineLoader(yaml.SafeLoader):
    """YAML that remembers the line of every mapping and key, so an error can name the line to fix."""


def _mapping(loader, node):
    loader.flatten_mapping(node)
    out = {loader.construct_object(k, deep=True): loader.construct_object(v, deep=True) for k, v in node.value}
    out["__lines__"] = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}
    out["__line__"] = node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _plain(x):
    """The value without line bookkeeping."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if k not in ("__lines__", "__line__")}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


@dataclass
class Run:
    name: str
    calibration: str | None     # None: the dense model
    finetune: str               # a name in Recipe.finetune, or "none"
    pattern: str | None


@dataclass
class Claim:
    text: str
    a: str
    op: str
    b: str
    task: str
    metric: str
    line: int


@dataclass
class Recipe:
    path: str
    model: str
    dtype: str | None
    prune: dict
    patterns: dict[str, dict]
    calibration: dict[str, str]
    finetune: dict[str, dict | None]
    runs: list[Run]
    tasks: dict[str, dict]
    claims: list[Claim]
    eval: dict = field(default_factory=dict)


def load_recipe(path, quick: bool = False) -> Recipe:
    """Parse and check a recipe; any mistake is one HybridPruneError naming the file and line."""
    from .data import parse_calib
    from .engine import PruneConfig
    from .finetune import FinetuneConfig

    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"recipe {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise HybridPruneError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise HybridPruneError(f"recipe {path} must be a mapping with model, prune, calibration, runs, tasks")

    def fail(line, msg):
        raise HybridPruneError(f"{path} line {line}: {msg}")

    def line(d, key=None):
        return (d.get("__lines__", {}).get(key) if key is not None else None) or d.get("__line__", 1)

    def section(name, required=True):
        v = raw.get(name)
        if v is None and required:
            fail(1, f"missing `{name}:`")
        return v

    for k in raw:
        if k not in TOP_KEYS and not k.startswith("__"):
            fail(line(raw, k), f"unknown key {k!r}; use any of: {', '.join(sorted(TOP_KEYS))}")
    quick_block = raw.get("quick") or {}
    if quick_block and not isinstance(quick_block, dict):
        fail(line(raw, "quick"), "`quick:` must be a mapping with prune / finetune / tasks overrides")
    for k in quick_block:
        if k not in ("prune", "finetune", "tasks") and not k.startswith("__"):
            fail(line(quick_block, k), f"unknown key {k!r} in quick; use prune, finetune or tasks")

    prune_fields = {f.name for f in dataclasses.fields(PruneConfig)} - {"calib", "device", "data_dir"}
    prune = section("prune")
    if not isinstance(prune, dict):
        fail(line(raw, "prune"), "`prune:` must be a mapping of prune options")
    for k in prune:
        if k not in prune_fields and not k.startswith("__"):
            fail(line(prune, k), f"unknown prune option {k!r}")
    prune_opts = {**_plain(prune), **(_plain(quick_block.get("prune") or {}) if quick else {})}

    patterns_raw = raw.get("patterns") or {prune_opts.get("pattern", "unstructured"): {}}
    patterns = {}
    for name, opts in _plain(patterns_raw).items():
        opts = opts or {}
        bad = set(opts) - prune_fields
        if bad:
            fail(line(patterns_raw, name), f"unknown prune option {sorted(bad)[0]!r} in pattern {name!r}")
        patterns[name] = {**prune_opts, **opts}
        try:
            PruneConfig(**{**patterns[name], "device": "cpu"})
        except (HybridPruneError, TypeError) as e:
            fail(line(patterns_raw, name) if "patterns" in raw else line(raw, "prune"), str(e))

    calib_raw = section("calibration")
    if not isinstance(calib_raw, dict) or not _plain(calib_raw):
        fail(line(raw, "calibration"), "`calibration:` must name at least one source, e.g. wiki: wikitext2")
    for name, spec in _plain(calib_raw).items():
        try:
            parse_calib(str(spec))
        except HybridPruneError as e:
            fail(line(calib_raw, name), f"calibration {name!r}: {e}")

    ft_raw = raw.get("finetune") or {}
    finetune = {"none": None}
    for name, opts in _plain(ft_raw).items():
        if opts is None:
            finetune[name] = None
            continue
        if quick:
            opts = {**opts, **_plain(quick_block.get("finetune") or {})}
        try:
            FinetuneConfig(**opts)
        except TypeError as e:
            fail(line(ft_raw, name), f"fine-tuning {name!r}: {str(e).split('got ')[-1]}")
        except HybridPruneError as e:
            fail(line(ft_raw, name), f"fine-tuning {name!r}: {e}")
        finetune[name] = opts

    runs_raw = section("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        fail(line(raw, "runs"), "`runs:` must be a list of {name, calibration, finetune}")
    runs, seen = [], set()
    for r in runs_raw:
        if not isinstance(r, dict) or "name" not in r:
            fail(line(raw, "runs"), "every run needs a `name:`")
        for k in r:
            if k not in ("name", "calibration", "finetune", "pattern") and not k.startswith("__"):
                fail(line(r, k), f"unknown key {k!r} in run {r['name']!r}; use name, calibration, finetune, pattern")
        name, calib, ft, pat = str(r["name"]), r.get("calibration"), r.get("finetune") or "none", r.get("pattern")
        if name in seen:
            fail(line(r, "name"), f"duplicate run name {name!r}")
        seen.add(name)
        if calib is not None and calib not in _plain(calib_raw):
            fail(line(r, "calibration"), f"run {name!r} names calibration {calib!r}, which `calibration:` does not "
                                         f"define ({', '.join(_plain(calib_raw))})")
        if ft not in finetune:
            fail(line(r, "finetune"), f"run {name!r} names fine-tuning {ft!r}, which `finetune:` does not define "
                                      f"({', '.join(finetune)})")
        if calib is None and ft != "none":
            fail(line(r, "finetune"), f"run {name!r} fine-tunes without calibration; give it a calibration")
        if pat is not None and pat not in patterns:
            fail(line(r, "pattern"), f"run {name!r} names pattern {pat!r}, not in `patterns:`")
        for p in ([pat] if pat else list(patterns)) if calib is not None else [None]:
            full = name if p is None or pat or len(patterns) == 1 else f"{name}@{p}"
            runs.append(Run(full, calib, ft, p))

    tasks_raw = section("tasks")
    if not isinstance(tasks_raw, dict) or not _plain(tasks_raw):
        fail(line(raw, "tasks"), "`tasks:` must name at least one task")
    tasks = {}
    quick_tasks = _plain(quick_block.get("tasks") or {}) if quick else {}
    for k, v in quick_tasks.items():
        known = k in TASK_KEYS or any(k in keys for keys in TASK_KEYS.values())
        if not known or (k in TASK_KEYS and not isinstance(v, dict)):
            fail(line(quick_block, "tasks"), f"quick tasks: unknown option {k!r}; use limit, windows, seqlen, "
                                             "num_fewshot, or a task name with its own options")
    for task, opts in _plain(tasks_raw).items():
        if task not in TASK_KEYS:
            fail(line(tasks_raw, task), f"unknown task {task!r}; use any of: {', '.join(TASK_KEYS)}")
        opts = dict(opts or {})
        for k in opts:
            if k not in TASK_KEYS[task]:
                fail(line(tasks_raw, task), f"unknown option {k!r} for {task}; use any of: "
                                            f"{', '.join(sorted(TASK_KEYS[task]))}")
        opts.update({k: v for k, v in quick_tasks.items() if k in TASK_KEYS[task]})  # every task's limit etc.
        opts.update(quick_tasks.get(task) or {})                                     # then the task's own
        for k, v in opts.items():
            low = 0 if k == "num_fewshot" else 1
            if k != "mode" and (not isinstance(v, int) or v < low):
                fail(line(tasks_raw, task), f"{task} {k} must be a whole number >= {low}, got {v!r}")
        tasks[task] = opts

    names = {r.name for r in runs} | {r.name.split("@")[0] for r in runs}
    claims = []
    claims_raw = raw.get("claims") or []
    for i, text in enumerate(claims_raw):
        where = line(raw, "claims") + 1 + i
        m = CLAIM.match(str(text))
        if not m:
            fail(where, f"claim {text!r} is not of the form `exp2 > exp1 on squad.f1`")
        a, op, b, task, metric = m.groups()
        for run in (a, b):
            if run not in names:
                fail(where, f"claim {text!r} names run {run!r}, which `runs:` does not define")
        if task not in tasks:
            fail(where, f"claim {text!r} names task {task!r}, which `tasks:` does not list")
        if metric not in METRICS[task]:
            fail(where, f"claim {text!r}: {task} has no metric {metric!r}; use any of: "
                        f"{', '.join(sorted(METRICS[task]))}")
        claims.append(Claim(str(text), a, op, b, task, metric, where))

    ev = _plain(raw.get("eval") or {})
    if not isinstance(ev, dict):
        fail(line(raw, "eval"), "`eval:` must be a mapping, e.g. {batch_size: 16, generate_batch_size: 64}")
    for k, v in ev.items():
        if k not in EVAL_KEYS:
            fail(line(raw.get("eval"), k), f"unknown eval option {k!r}; use any of: {', '.join(EVAL_KEYS)}")
        if not isinstance(v, int) or v < 1:
            fail(line(raw.get("eval"), k), f"eval {k} must be a whole number >= 1, got {v!r}")
    return Recipe(str(path), str(raw.get("model", "default")), raw.get("dtype"), prune_opts, patterns,
                  {k: str(v) for k, v in _plain(calib_raw).items()}, finetune, runs, tasks, claims, ev)


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


def plan(recipe: Recipe, out: Path) -> tuple[list[Stage], dict[str, dict[str, Stage]], dict[str, Stage]]:
    """The stages in execution order; for each run {task: eval stage, '_model': model stage}; the pruned models
    by (pattern, calibration), plus magnitude references by pattern under ('magnitude', pattern)."""
    stages: dict[str, Stage] = {}

    def add(stage: Stage) -> Stage:
        return stages.setdefault(stage.key, stage)

    def prune_stage(pattern, calib_name, magnitude=False):
        config = dict(recipe.patterns[pattern])
        if magnitude:  # the calibration-free reference for the overlap table
            config.update(method="magnitude", tier_metric=None, refit=None)
            spec = {"model": recipe.model, "dtype": recipe.dtype, "config": config}
            label = f"prune magnitude ({pattern})"
        else:
            config["calib"] = recipe.calibration[calib_name]
            spec = {"model": recipe.model, "dtype": recipe.dtype, "config": config}
            label = f"prune {pattern} / calibration {calib_name}"
        key = _key(["prune", spec])
        return add(Stage("prune", key, label, spec, out / "stages" / f"prune-{key}"))

    by_run, pruned = {}, {}
    for run in recipe.runs:
        model_stage = None
        if run.calibration is not None:
            model_stage = prune_stage(run.pattern, run.calibration)
            pruned[(run.pattern, run.calibration)] = model_stage
            if run.finetune != "none":
                spec = {"input": model_stage.key, "config": recipe.finetune[run.finetune]}
                key = _key(["finetune", spec])
                model_stage = add(Stage("finetune", key, f"finetune {run.finetune} on {model_stage.label}", spec,
                                        out / "stages" / f"finetune-{key}", model_stage))
        by_run[run.name] = {"_model": model_stage}
        for task, settings in recipe.tasks.items():
            spec = {"input": model_stage.key if model_stage else f"dense:{recipe.model}", "task": task,
                    "settings": settings, "eval": recipe.eval, "dtype": recipe.dtype}
            key = _key(["eval", spec])
            what = model_stage.label if model_stage else "dense"
            by_run[run.name][task] = add(Stage("eval", key, f"eval {task} on {what}", spec,
                                               out / "stages" / f"eval-{key}.json", model_stage))
    for pattern in {p for p, _ in pruned}:
        pruned[("magnitude", pattern)] = prune_stage(pattern, None, magnitude=True)
    order = {"prune": 0, "finetune": 1, "eval": 2}
    return sorted(stages.values(), key=lambda s: order[s.kind]), by_run, pruned


def _run_stage(stage: Stage, recipe: Recipe, device: str | None, loaded: dict) -> None:
    """Run one stage. `loaded` keeps the last model that eval stages loaded (a model's eval stages run one after
    another, so it is read once, not once per task) and the tokenized fine-tuning data (out/stages/data)."""
    from . import models
    from .engine import PruneConfig, prune, save_pruned
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
            model, tok = models.load_model(spec, dtype=recipe.dtype)
            if device:
                model.to(device)
            loaded.update(eval_spec=spec, eval_model=(model, tok))
        model, tok = loaded["eval_model"]
        s = stage.spec["settings"]
        res = evaluate_model(model, tok, [stage.spec["task"]], limit=s.get("limit"),
                             num_fewshot=s.get("num_fewshot"), gsm8k_mode=s.get("mode", "fewshot"),
                             ppl_seqlen=s.get("seqlen", 2048), ppl_windows=s.get("windows"),
                             batch_size=recipe.eval.get("batch_size", 8),
                             generate_batch_size=recipe.eval.get("generate_batch_size"))
        record = models.read_record(spec) if stage.input else None
        models.write_text_atomic(stage.path, json.dumps({"model": spec, "stage": stage.spec, "hybridprune": record,
                                                         "results": res}, default=str))


def run_experiment(recipe_path, out, quick: bool = False, only: str | None = None, device: str | None = None,
                   dtype: str | None = None, log=print) -> dict:
    """Run every unfinished stage of the recipe, then write the report. Returns the results dict."""
    from .engine import default_device
    from .models import write_text_atomic

    if only not in (None, "prune", "finetune", "eval", "report"):
        raise HybridPruneError(f"unknown --only {only!r}; use prune, finetune, eval or report")
    default_device(device)
    recipe = load_recipe(recipe_path, quick=quick)
    if dtype is not None:
        from .models import _dtype
        _dtype(dtype)  # refuse an unknown name before any work
        recipe.dtype = dtype
    out = Path(out)
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


# ----------------------------------------------------------------------------- report

def _metric_values(entry: dict, metric: str):
    per = entry.get("per_example", {}).get(PER_EXAMPLE.get(metric, metric))
    return entry.get(metric), entry.get(metric + "_stderr"), per


def build_report(recipe: Recipe, stages, by_run, pruned, times, out: Path) -> dict:
    from . import models
    from .models import atomic_dir, write_text_atomic
    from .stats import mcnemar, paired_bootstrap

    table = {}
    for run in recipe.runs:
        row = {"tasks": {}, "sparsity": None, "seconds": {}}
        model_stage = by_run[run.name]["_model"]
        if model_stage is not None:
            rec = models.read_record(model_stage.path) or {}
            row["sparsity"] = rec.get("sparsity")
            s = model_stage
            while s is not None:
                row["seconds"][s.kind] = times.get(s.key)
                s = s.input
        for task in recipe.tasks:
            st = by_run[run.name][task]
            if st.done():
                row["tasks"][task] = json.loads(st.path.read_text())["results"][task]
                row["seconds"][f"eval {task}"] = times.get(st.key)
        table[run.name] = row

    pairs = []
    names = [r.name for r in recipe.runs]
    for task in recipe.tasks:
        for metric in sorted(METRICS[task]):
            for a, b in itertools.combinations(names, 2):
                ea, eb = table[a]["tasks"].get(task), table[b]["tasks"].get(task)
                if not ea or not eb:
                    continue
                va, vb = _metric_values(ea, metric)[2], _metric_values(eb, metric)[2]
                if not va or not vb or len(va) != len(vb):
                    continue
                res = {"task": task, "metric": metric, "a": a, "b": b, **paired_bootstrap(va, vb)}
                res["significant"] = res["lo"] > 0 or res["hi"] < 0
                if metric.startswith(BINARY):
                    res["mcnemar_p"] = mcnemar(va, vb)["p"]
                pairs.append(res)

    claims = [_judge(c, pairs, names) for c in recipe.claims]
    overlap = mask_overlap(pruned, recipe)
    results = {"recipe": recipe.path, "model": recipe.model, "runs": table, "pairs": pairs, "claims": claims,
               "overlap": overlap, "stage_seconds": times}
    with atomic_dir(out / "plots", overwrite=True) as tmp:
        _plots(recipe, table, overlap, tmp)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    write_text_atomic(out / "results.csv", _csv(recipe, table))
    write_text_atomic(out / "report.md", _markdown(recipe, table, pairs, claims, overlap, times))
    return results


def _judge(claim: Claim, pairs: list[dict], names: list[str]) -> dict:
    """supported / refuted / inconclusive from the paired interval of a - b (perplexity: on per-window NLL)."""
    out = []
    for a, b in _expand(claim, names):
        hit = [p for p in pairs if p["task"] == claim.task and p["metric"] == claim.metric and {p["a"], p["b"]} == {a, b}]
        if not hit:
            out.append({"claim": claim.text, "a": a, "b": b, "status": "not evaluated"})
            continue
        p = hit[0]
        sign = 1 if p["a"] == a else -1
        diff, lo, hi = sign * p["diff"], *sorted((sign * p["lo"], sign * p["hi"]))
        if claim.op in ("<", "<="):
            diff, lo, hi = -diff, -hi, -lo  # a < b  <=>  b - a > 0
        status = "supported" if lo > 0 or (claim.op in (">=", "<=") and lo >= 0) else \
            "refuted" if hi < 0 else "inconclusive"
        out.append({"claim": claim.text, "a": a, "b": b, "status": status,  # (+ 0.0: no "-0" for a tie)
                    "diff": sign * p["diff"] + 0.0, "interval": sorted((sign * p["lo"] + 0.0, sign * p["hi"] + 0.0))})
    return {"claim": claim.text, "results": out}


def _expand(claim: Claim, names: list[str]):
    """A claim on base run names applies to every pattern of a pattern axis."""
    if claim.a in names and claim.b in names:
        return [(claim.a, claim.b)]
    suffixes = sorted({n.split("@", 1)[1] for n in names if "@" in n})
    return [(f"{claim.a}@{s}" if claim.a not in names else claim.a, f"{claim.b}@{s}" if claim.b not in names else claim.b)
            for s in suffixes]


def mask_overlap(pruned: dict, recipe: Recipe) -> dict:
    """Jaccard index of the pruned sets of every pair of pruned models of one pattern (different calibrations,
    and each against magnitude pruning), overall, per matrix type and per layer."""
    from .stats import jaccard_counts
    from .streaming import ShardReader
    out = {}
    patterns = sorted({p for (p, c) in pruned if p != "magnitude"})
    for pattern in patterns:
        members = {c: s for (p, c), s in pruned.items() if p == pattern}
        members["magnitude"] = pruned[("magnitude", pattern)]
        members = {k: v for k, v in members.items() if v.done()}
        if len(members) < 2:
            continue
        report = json.loads((next(iter(members.values())).path / "sparsity.json").read_text())
        names = [f"{layer['layer']}.{m}.weight" for layer in report["layers"] for m in layer["matrices"]]
        readers = {k: ShardReader(s.path) for k, s in members.items()}  # one file or shards alike
        pairs = list(itertools.combinations(members, 2))
        # counts[pair][group] = [|A & B|, |A | B|] summed over matrices; each matrix is read once per model
        counts = {pair: collections.defaultdict(lambda: [0, 0]) for pair in pairs}
        for n in names:
            zero = {k: r.get([n])[n] == 0 for k, r in readers.items()}
            groups = ("overall", ("by_type", n.rsplit(".", 2)[-2]), ("by_layer", re.search(r"\.(\d+)\.", n).group(1)))
            for a, b in pairs:
                i, u = jaccard_counts(zero[a], zero[b])
                for g in groups:
                    counts[(a, b)][g][0] += i
                    counts[(a, b)][g][1] += u
        rows = {}
        for (a, b), c in counts.items():
            ratio = {g: i / u if u else 1.0 for g, (i, u) in c.items()}
            rows[f"{a} vs {b}"] = {"a": a, "b": b, "overall": ratio["overall"],
                                   "by_type": {g[1]: r for g, r in ratio.items() if g[0] == "by_type"},
                                   "by_layer": {g[1]: r for g, r in ratio.items() if g[0] == "by_layer"}}
        out[pattern] = {"members": list(members), "pairs": rows}
    return out


def _fmt(v, stderr=None):
    if v is None:
        return "-"
    text = f"{v:.4g}"
    return text + (f" ± {stderr:.2g}" if stderr else "")


def _columns(recipe):
    return [(t, m) for t in recipe.tasks for m in sorted(METRICS[t])]


def _markdown(recipe, table, pairs, claims, overlap, times) -> str:
    cols = _columns(recipe)
    lines = [f"# Experiment: {Path(recipe.path).name}", "", f"Model `{recipe.model}`; {len(table)} runs; stage time "
             f"{sum(v for v in times.values() if v) / 60:.1f} min in all (from stages/times.json).", "",
             "## Results (mean ± standard error; perplexity over windows)", "",
             "| run | sparsity | " + " | ".join(f"{t} {m}" for t, m in cols) + " | stage seconds |",
             "|---|---:|" + "---:|" * len(cols) + "---|"]
    for name, row in table.items():
        cells = []
        for t, m in cols:
            e = row["tasks"].get(t)
            cells.append(_fmt(*_metric_values(e, m)[:2]) if e else "-")
        secs = ", ".join(f"{k} {v:.0f}" for k, v in row["seconds"].items() if v)
        sp = "-" if row["sparsity"] is None else f"{row['sparsity']:.4f}"
        lines.append(f"| {name} | {sp} | " + " | ".join(cells) + f" | {secs} |")
    lines += ["", "## Paired differences (a - b on the same examples, 95% bootstrap interval; * excludes 0; "
              "perplexity compared on per-window NLL)", "",
              "| task | metric | a | b | a - b | interval | McNemar p |", "|---|---|---|---|---:|---|---:|"]
    for p in pairs:
        mark = "*" if p["significant"] else ""
        mc = f"{p['mcnemar_p']:.3g}" if "mcnemar_p" in p else ""
        lines.append(f"| {p['task']} | {p['metric']} | {p['a']} | {p['b']} | {p['diff']:+.4g}{mark} | "
                     f"[{p['lo']:+.4g}, {p['hi']:+.4g}] | {mc} |")
    lines += ["", "## Claims", ""]
    for c in claims:
        for r in c["results"]:
            detail = "" if "diff" not in r else f": a - b = {r['diff']:+.4g}, interval [{r['interval'][0]:+.4g}, " \
                                                 f"{r['interval'][1]:+.4g}]"
            lines.append(f"- `{c['claim']}` ({r['a']} vs {r['b']}): **{r['status']}**{detail}")
    lines += ["", "## Mask overlap (Jaccard index of the pruned sets)", ""]
    for pattern, o in overlap.items():
        lines.append(f"Pattern `{pattern}`:")
        lines.append("")
        types = sorted({k for r in o["pairs"].values() for k in r["by_type"]})
        lines.append("| pair | overall | " + " | ".join(types) + " |")
        lines.append("|---|---:|" + "---:|" * len(types))
        for name, r in o["pairs"].items():
            lines.append(f"| {name} | {r['overall']:.4f} | " + " | ".join(f"{r['by_type'][t]:.3f}" for t in types)
                         + " |")
        lines.append("")
    lines.append("Plots: `plots/` (one bar chart per metric with standard errors, `overlap-<pattern>.png`).")
    return "\n".join(lines) + "\n"


def _csv(recipe, table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "task", "metric", "value", "stderr", "n"])
    for name, row in table.items():
        for t, m in _columns(recipe):
            e = row["tasks"].get(t)
            if e and e.get(m) is not None:
                value, stderr, _ = _metric_values(e, m)
                w.writerow([name, t, m, value, "" if stderr is None else stderr, e.get("n")])
    return buf.getvalue()


def _plots(recipe, table, overlap, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(table)
    for t, m in _columns(recipe):
        vals = [(_metric_values(table[n]["tasks"][t], m)[:2] if t in table[n]["tasks"] else (None, None))
                for n in names]
        if all(v is None for v, _ in vals):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names)), 3.2))
        ax.bar(range(len(names)), [v or 0 for v, _ in vals], yerr=[e or 0 for _, e in vals], capsize=3,
               color="#4a7ab5")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{t} {m}")
        fig.tight_layout()
        fig.savefig(folder / f"{t}-{re.sub(r'[^A-Za-z0-9_.-]', '_', m)}.png", dpi=110)
        plt.close(fig)
    for pattern, o in overlap.items():
        members = o["members"]
        mat = np.eye(len(members))
        for r in o["pairs"].values():
            i, j = members.index(r["a"]), members.index(r["b"])
            mat[i, j] = mat[j, i] = r["overall"]
        fig, ax = plt.subplots(figsize=(1.2 * len(members) + 2, 1.0 * len(members) + 1.5))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(members)), members, rotation=30, ha="right")
        ax.set_yticks(range(len(members)), members)
        for i in range(len(members)):
            for j in range(len(members)):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", color="w" if mat[i, j] < 0.6 else "k")
        ax.set_title(f"pruned-set Jaccard, {pattern}")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(folder / f"overlap-{pattern}.png", dpi=110)
        plt.close(fig)
