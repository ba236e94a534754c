"""Experiment recipes: one YAML file = model x patterns x calibration data x fine-tuning data x seeds x tasks.

    model, dtype      the model spec and the dtype it is loaded and computed in
    prune             PruneConfig options shared by every pruned run; `patterns:` an axis of overrides
    methods           an axis crossed with patterns: {wanda: {}, ria: {}, owl: {layer_sparsity: owl}} (an empty entry
                      is the method of that name); runs are then `exp1@three-tier+ria`
    calibration       named calibration sources: a spec (wikitext2, self, self:wikitext2, mixed:...) or a mapping of
                      calibration options, e.g. {calib: wikitext2, calib_select: diversity}
    finetune          named FinetuneConfig option sets
    seeds             an axis: each seed sets the calibration draw and the fine-tuning seed (LoRA initialisation,
                      data order); the evaluated examples stay the same for every seed
    runs              {name, calibration, finetune, pattern}: what to build and evaluate; `calibration: magnitude`
                      is each pattern's magnitude-pruned floor, no calibration read
    tasks             per task: limit (first N) or sample (a seeded subset spread over articles), windows, ...;
                      a generating task may set its own generate_batch_size (long prompts: a narrower batch
                      holds a smaller KV cache), or `generate: false` to score the gold answer's NLL only
    eval              batch sizes and the seed of the evaluation sample
    claims            `a > b on task.metric`, judged by the report
    quick             prune / finetune / tasks overrides for a smoke run (both profiles are checked)
    notes             free text the report prints under its title: what the budgets are and why

Every mistake is one HybridPruneError naming the file and the line to fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridprune.core.config import PRUNE_GROUPS, FinetuneConfig, PruneConfig, recipe_keys
from hybridprune.core import yamlfile
from hybridprune.core.errors import HybridPruneError
from hybridprune.core.specs import check_dtype, parse_calib

TOP_KEYS = {"model", "prune", "patterns", "methods", "calibration", "finetune", "runs", "tasks", "claims", "eval",
            "quick", "dtype", "seeds", "notes"}
TASK_KEYS = {"wikitext2": {"windows", "seqlen"}, "boolq": {"limit", "sample", "num_fewshot"},
             "squad": {"limit", "sample", "num_fewshot", "generate_batch_size", "generate"},
             "gsm8k": {"limit", "sample", "num_fewshot", "mode", "generate_batch_size", "generate"}}
METRICS = {"wikitext2": {"ppl"}, "boolq": {"acc", "gold_nll", "margin"}, "squad": {"exact_match", "f1", "gold_nll"},
           "gsm8k": {"exact_match[strict-match]", "exact_match[flexible-extract]", "gold_nll"}}
EVAL_KEYS = ("batch_size", "generate_batch_size", "sample_seed", "kernels")
CLAIM = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+)\s+on\s+(\w+)\.(\S+)\s*$")


class _LineLoader(yamlfile.StrictLoader):
    """YAML that remembers the line of every mapping and key, so an error can name the line to fix, and refuses a
    key given twice."""


def _mapping(loader, node):
    loader.flatten_mapping(node)
    yamlfile.check_unique(loader, node)
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


MAGNITUDE = "magnitude"  # a run's calibration: the pattern's magnitude-pruned floor, which reads no calibration
# what a named calibration entry may set: PruneConfig's calibration options, less the budget and the seed (prune:, seeds:)
CALIB_KEYS = tuple(k for k in PRUNE_GROUPS["calibration"] if k not in ("nsamples", "seqlen", "seed", "batch_size"))


@dataclass
class Run:
    name: str
    calibration: str | None     # None: the dense model; "magnitude": the pattern's calibration-free floor
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
    calibration: dict[str, dict]   # name -> PruneConfig calibration options ({"calib": spec, ...})
    finetune: dict[str, dict | None]
    runs: list[Run]
    tasks: dict[str, dict]
    claims: list[Claim]
    eval: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    notes: str = ""


def load_recipe(path, quick: bool = False) -> Recipe:
    """Parse and check a recipe; any mistake is one HybridPruneError naming the file and line. With quick, the
    main profile is checked too (a mistake there would surface on the first full run)."""
    path = Path(path)
    raw = yamlfile.load(path, "recipe", loader=_LineLoader)
    if not isinstance(raw, dict):
        raise HybridPruneError(f"recipe {path} must be a mapping with model, prune, calibration, runs, tasks")
    recipe = _build(path, raw, quick=False)
    return _build(path, raw, quick=True) if quick else recipe


def _build(path: Path, raw: dict, quick: bool) -> Recipe:
    profile = " (quick profile)" if quick else ""

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
        if k not in ("prune", "finetune", "tasks", "seeds") and not k.startswith("__"):
            fail(line(quick_block, k), f"unknown key {k!r} in quick; use prune, finetune, tasks or seeds")

    prune_fields = set(recipe_keys(PruneConfig))
    prune = section("prune")
    if not isinstance(prune, dict):
        fail(line(raw, "prune"), "`prune:` must be a mapping of prune options")
    for k in prune:
        if k not in prune_fields and not k.startswith("__"):
            fail(line(prune, k), f"unknown prune option {k!r}")
    prune_opts = {**_plain(prune), **(_plain(quick_block.get("prune") or {}) if quick else {})}

    seeds = _seeds(quick_block if quick and "seeds" in quick_block else raw, raw, prune_opts, fail, line)
    try:
        check_dtype(raw.get("dtype"))
    except HybridPruneError as e:
        fail(line(raw, "dtype"), str(e))

    patterns_raw = raw.get("patterns") or {prune_opts.get("pattern", "unstructured"): {}}
    methods_raw = raw.get("methods")
    if methods_raw is not None and (not isinstance(methods_raw, dict) or not _plain(methods_raw)):
        fail(line(raw, "methods"), "`methods:` must name at least one method, e.g. {wanda: {}, ria: {}, "
                                   "owl: {layer_sparsity: owl}}")
    methods = {}
    for name, opts in _plain(methods_raw or {}).items():  # an empty entry is the method of that name
        methods[name] = dict(opts) if opts else {"method": name}
    patterns, bases = {}, {}
    for name, opts in _plain(patterns_raw).items():
        opts = opts or {}
        bad = set(opts) - prune_fields
        if bad:
            fail(line(patterns_raw, name), f"unknown prune option {sorted(bad)[0]!r} in pattern {name!r}")
        # the methods axis crosses the patterns axis: one variant per pattern and method, `three-tier+ria`
        for mname, mopts in (methods.items() if methods else [(None, {})]):
            bad = set(mopts) - prune_fields
            if bad:
                fail(line(methods_raw, mname), f"unknown prune option {sorted(bad)[0]!r} in method {mname!r}")
            variant = name if mname is None else f"{name}+{mname}"
            patterns[variant], bases[variant] = {**prune_opts, **opts, **mopts}, name
            try:
                PruneConfig(**{**patterns[variant], "device": "cpu"})
            except (HybridPruneError, TypeError) as e:
                where = line(methods_raw, mname) if mname is not None else \
                    line(patterns_raw, name) if "patterns" in raw else line(raw, "prune")
                fail(where, f"{variant}: {e}" if mname is not None else str(e))

    calib_raw = section("calibration")
    if not isinstance(calib_raw, dict) or not _plain(calib_raw):
        fail(line(raw, "calibration"), "`calibration:` must name at least one source, e.g. wiki: wikitext2")
    calibration = {}
    for name, spec in _plain(calib_raw).items():
        if name == MAGNITUDE:
            fail(line(calib_raw, name), f"`{MAGNITUDE}` is the name of each pattern's calibration-free floor "
                                        "(a run's `calibration: magnitude`); name this source otherwise")
        entry = dict(spec) if isinstance(spec, dict) else {"calib": str(spec)}
        bad = set(entry) - set(CALIB_KEYS)
        if bad or "calib" not in entry:
            fail(line(calib_raw, name), f"calibration {name!r}: a source spec, or a mapping with calib: and any of "
                                        f"{', '.join(CALIB_KEYS[1:])}")
        try:
            PruneConfig(**{**prune_opts, **entry, "device": "cpu"})
        except (HybridPruneError, TypeError) as e:
            fail(line(calib_raw, name), f"calibration {name!r}: {e}")
        calibration[name] = entry

    ft_raw = raw.get("finetune") or {}
    finetune = {"none": None}
    for name, opts in _plain(ft_raw).items():
        if opts is None:
            finetune[name] = None
            continue
        if quick:
            opts = {**opts, **_plain(quick_block.get("finetune") or {})}
        bad = set(opts) - set(recipe_keys(FinetuneConfig))
        if bad:
            fail(line(ft_raw, name), f"fine-tuning {name!r}: unknown option {sorted(bad)[0]!r}")
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
        if calib is not None and calib != MAGNITUDE and calib not in calibration:
            fail(line(r, "calibration"), f"run {name!r} names calibration {calib!r}, which `calibration:` does not "
                                         f"define ({', '.join(_plain(calib_raw))})")
        if ft not in finetune:
            fail(line(r, "finetune"), f"run {name!r} names fine-tuning {ft!r}, which `finetune:` does not define "
                                      f"({', '.join(finetune)})")
        if calib in (None, MAGNITUDE) and ft != "none":
            fail(line(r, "finetune"), f"run {name!r} fine-tunes without calibration; give it a calibration")
        if pat is not None and pat not in bases.values():
            fail(line(r, "pattern"), f"run {name!r} names pattern {pat!r}, not in `patterns:`")
        chosen = [v for v in patterns if pat is None or bases[v] == pat]
        for p in chosen if calib is not None else [None]:
            full = name if p is None or len(chosen) == 1 else f"{name}@{p}"
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
        for override in ({k: v for k, v in quick_tasks.items() if k in TASK_KEYS[task]},  # every task's limit etc.
                         quick_tasks.get(task) or {}):                                      # then the task's own
            for k in ("limit", "sample"):  # a profile's limit replaces the other profile's sample, and back
                if k in override:
                    opts.pop("sample" if k == "limit" else "limit", None)
            opts.update(override)
        for k, v in opts.items():
            low = 0 if k == "num_fewshot" else 1
            if k == "generate" and not isinstance(v, bool):
                fail(line(tasks_raw, task), f"{task} generate must be true or false (false: gold NLL only), got {v!r}")
            if k not in ("mode", "generate") and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                fail(line(tasks_raw, task), f"{task} {k} must be a whole number >= {low}, got {v!r}{profile}")
        if "limit" in opts and "sample" in opts:
            fail(line(tasks_raw, task), f"{task}: give limit (the first N examples) or sample (a seeded subset "
                                        "spread over the split), not both")
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
        if k == "kernels":
            if not isinstance(v, bool):
                fail(line(raw.get("eval"), k), f"eval kernels must be true or false, got {v!r}")
            continue
        low = 0 if k == "sample_seed" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            fail(line(raw.get("eval"), k), f"eval {k} must be a whole number >= {low}, got {v!r}")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        fail(line(raw, "notes"), "`notes:` is free text (a string, e.g. a YAML block after `notes: |`)")
    return Recipe(str(path), str(raw.get("model", "default")), raw.get("dtype"), prune_opts, patterns,
                  calibration, finetune, runs, tasks, claims, ev, seeds, notes.strip())


def _seeds(block: dict, raw: dict, prune_opts: dict, fail, line) -> list[int]:
    """`seeds: [0, 1, 2]` (in the recipe or its quick block): whole, distinct numbers; without it, the prune seed
    alone (default 0)."""
    if "seeds" not in block:
        return [int(prune_opts.get("seed", 0))]
    seeds, where = block["seeds"], line(block, "seeds")
    if not isinstance(seeds, list) or not seeds:
        fail(where, f"`seeds:` must be a non-empty list of whole numbers, e.g. [0, 1, 2], got {_plain(seeds)!r}")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            fail(where, f"seed {s!r} is not a whole number >= 0")
    if len(set(seeds)) != len(seeds):
        fail(where, f"seed {next(s for s in seeds if seeds.count(s) > 1)} is repeated in `seeds:`")
    if "seed" in (raw.get("prune") or {}):
        fail(line(raw["prune"], "seed"), "give the seed in `seeds:` or in `prune:`, not both")
    return list(seeds)
