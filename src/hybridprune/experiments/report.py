"""The experiment's report: what the stages measured, read as evidence.

    table    per run and metric: the mean over seeds, the between-seed standard deviation and each seed's value
             (one seed: mean +- standard error over examples)
    pairs    every two runs on every metric: the mean paired difference a - b on the same examples, with a 95%
             interval from a two-level bootstrap (seeds, then clusters of examples within each seed:
             stats.seeds_bootstrap), and how many seeds' own intervals exclude 0 on the same side
    claims   `a > b on task.metric` judged supported / refuted / inconclusive on that interval, beside "holds in k
             of n seeds"; with fewer than MIN_UNITS independent units (clusters, windows) per seed no verdict is
             given ("too few to judge")
    ranking  per pattern, the calibration sources ranked on each task's continuous metric (perplexity, gold NLL),
             each with its paired difference to the best and that difference's two-level interval; and the spread
             between sources (best / worst perplexity) in each seed, which the papers expect to grow with sparsity
             and with structure
    overlap  Jaccard index of the pruned sets: between calibrations at the same seed, between seeds of the same
             calibration (does the text move the mask more than a new draw of the same text does?), and
             against magnitude pruning; summed over matrices, overall, per matrix type and per layer
Written as report.md, results.json, results.csv and plots/ (one PNG per metric, one overlap heat map per pattern).
"""
from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import re
import statistics
from pathlib import Path

from hybridprune.core.config import PruneConfig
from hybridprune.experiments.recipe import METRICS, Claim, Recipe
from hybridprune.experiments.stats import MIN_UNITS, mcnemar, paired_bootstrap, seeds_bootstrap

PER_EXAMPLE = {"ppl": "nll"}  # perplexity is compared on its per-window NLL (same ordering)
BINARY = ("acc", "exact_match")
TOO_FEW = "too few to judge"


def _per_example(entry: dict, metric: str):
    return entry.get("per_example", {}).get(PER_EXAMPLE.get(metric, metric))


def _metric_values(entry: dict, metric: str, several: bool):
    """(value, spread): with several seeds in the recipe the spread is the between-seed SD (none while a run has
    one seed's value, or for a run that no seed changes), else the standard error over examples; the two are
    never mixed in one table."""
    return entry.get(metric), entry.get(metric + ("_sd" if several else "_stderr"))


def _summary(task: str, by_seed: dict[int, dict]) -> dict:
    """One task's entry over seeds: mean, between-seed SD, each seed's value; one seed: that seed's entry."""
    entries = list(by_seed.values())
    if len(entries) == 1:
        return entries[0]
    first = entries[0]
    out = {k: first[k] for k in ("n", "split", "selection", "clusters", "doc_ids") if k in first}
    out["per_seed"] = {}
    for metric in sorted(METRICS[task]):
        values = [e.get(metric) for e in entries]
        if any(v is None for v in values):
            continue
        out[metric] = statistics.fmean(values)
        out[metric + "_sd"] = statistics.stdev(values)
        out["per_seed"][metric] = dict(zip(by_seed, values))
    return out


def build_report(recipe: Recipe, stages, by_run, pruned, times, out: Path, peaks: dict | None = None) -> dict:
    from hybridprune.io import models
    from hybridprune.core.files import atomic_dir, write_text_atomic

    table = {}
    for run in recipe.runs:
        row = {"tasks": {}, "sparsity": None, "seconds": {}, "seeds": {}}
        sparsity, seconds = [], collections.defaultdict(list)
        for seed, cell in by_run[run.name].items():
            model_stage = cell["_model"]
            if model_stage is not None and model_stage.done():  # a partial report: the seeds that have a model
                sparsity.append((models.read_record(model_stage.path) or {}).get("sparsity"))
                s = model_stage
                while s is not None:
                    seconds[s.kind].append(times.get(s.key))
                    s = s.input
            row["seeds"][seed] = {}
            for task in recipe.tasks:
                st = cell[task]
                if st.done():
                    row["seeds"][seed][task] = json.loads(st.path.read_text())["results"][task]
                    seconds[f"eval {task}"].append(times.get(st.key))
        if sparsity and None not in sparsity:
            row["sparsity"] = statistics.fmean(sparsity)
        row["seconds"] = {k: statistics.fmean(v) for k, v in seconds.items() if v and None not in v}
        for task in recipe.tasks:
            by_seed = {s: e[task] for s, e in row["seeds"].items() if task in e}
            if by_seed:
                row["tasks"][task] = _summary(task, by_seed)
        table[run.name] = row

    names = [r.name for r in recipe.runs]
    pairs = [p for task in recipe.tasks for metric in sorted(METRICS[task])
             for a, b in itertools.combinations(names, 2) if (p := _pair(table, task, metric, a, b))]
    claims = [_judge(c, pairs, names) for c in recipe.claims]
    overlap = mask_overlap(pruned, recipe)
    ranking = rank_sources(recipe, table, pairs)
    peaks = peaks or {}
    peak = max(((v, s.label) for s in stages if (v := peaks.get(s.key))), default=None)
    results = {"recipe": recipe.path, "model": recipe.model, "seeds": recipe.seeds, "min_units": MIN_UNITS,
               "runs": table, "pairs": pairs, "claims": claims, "ranking": ranking, "overlap": overlap, "stage_seconds": times,
               "stage_peak_rss_kib": peaks, "peak_rss": {"kib": peak[0], "stage": peak[1]} if peak else None}
    with atomic_dir(out / "plots", overwrite=True) as tmp:
        _plots(recipe, table, overlap, tmp)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    write_text_atomic(out / "results.csv", _csv(recipe, table))
    write_text_atomic(out / "report.md", _markdown(recipe, table, pairs, claims, overlap, times, results["peak_rss"],
                                                   ranking))
    return results


RANK_METRIC = {"wikitext2": "ppl", "squad": "gold_nll", "boolq": "gold_nll", "gsm8k": "gold_nll"}  # lower is better


def rank_sources(recipe: Recipe, table: dict, pairs: list[dict]) -> dict:
    """Per pattern: the pruned runs (not the dense model) ranked on each task's continuous metric, best first,
    each with its paired difference to the best and the two-level interval; and the per-seed spread of WikiText-2
    perplexity between calibration sources (best / worst, magnitude left out)."""
    groups: dict[str, list] = collections.defaultdict(list)
    for run in recipe.runs:
        if run.calibration is not None:
            groups[run.pattern or ""].append(run)
    out = {}
    for pattern, runs in groups.items():
        entry = {"tasks": {}, "spread": {}}
        for task, metric in RANK_METRIC.items():
            if task not in recipe.tasks:
                continue
            rows = [(r, e[metric]) for r in runs if (e := table[r.name]["tasks"].get(task)) and e.get(metric) is not None]
            rows.sort(key=lambda x: x[1])
            if not rows:
                continue
            best = rows[0][0].name
            ranked = []
            for r, value in rows:
                item = {"run": r.name, "calibration": r.calibration, "value": value}
                p = next((p for p in pairs if p["task"] == task and p["metric"] == metric
                          and {p["a"], p["b"]} == {r.name, best}), None)
                if p is not None and r.name != best:
                    sign = 1 if p["a"] == r.name else -1
                    lo, hi = sorted((sign * p["lo"], sign * p["hi"]))
                    item.update(diff_to_best=sign * p["diff"], interval=[lo, hi], tied_with_best=lo <= 0,
                                judged=p["judged"])
                ranked.append(item)
            entry["tasks"][f"{task}.{metric}"] = ranked
        sources = [r for r in runs if r.calibration != "magnitude" and "wikitext2" in recipe.tasks]
        for seed in recipe.seeds:
            vals = [table[r.name]["seeds"].get(seed, {}).get("wikitext2", {}).get("ppl") for r in sources]
            vals = [v for v in vals if v is not None]
            if len(vals) > 1:
                entry["spread"][seed] = max(vals) / min(vals)
        out[pattern] = entry
    return out


def _pair(table: dict, task: str, metric: str, a: str, b: str) -> dict | None:
    """a - b on the seeds both runs have, on the same examples; None where they cannot be paired."""
    sa, sb = table[a]["seeds"], table[b]["seeds"]
    seeds = [s for s in sa if task in sa[s] and task in sb.get(s, {})]
    if not seeds:
        return None
    ea, eb = [sa[s][task] for s in seeds], [sb[s][task] for s in seeds]
    va, vb = [_per_example(e, metric) for e in ea], [_per_example(e, metric) for e in eb]
    if any(not v for v in va + vb) or len({len(v) for v in va + vb}) != 1:
        return None
    if len({json.dumps(e.get("doc_ids")) for e in ea + eb}) != 1:  # not the same examples: no pairing
        return None
    clusters = ea[0].get("clusters")
    res = {"task": task, "metric": metric, "a": a, "b": b, **seeds_bootstrap(va, vb, clusters=clusters)}
    res["judged"] = res["units"] >= MIN_UNITS
    res["significant"] = res["judged"] and (res["lo"] > 0 or res["hi"] < 0)
    res["seed_intervals"] = [[(r := paired_bootstrap(x, y, clusters=clusters))["lo"], r["hi"]]
                             for x, y in zip(va, vb)] if len(seeds) > 1 else [[res["lo"], res["hi"]]]
    res["seed_list"] = seeds
    if metric.startswith(BINARY):
        ps = [mcnemar(x, y)["p"] for x, y in zip(va, vb)]
        res["mcnemar_p"] = ps[0] if len(ps) == 1 else ps
    return res


def _status(op: str, lo: float, hi: float) -> str:
    """The claim `a op b` from the interval of a - b."""
    if op in ("<", "<="):
        lo, hi = -hi, -lo  # a < b  <=>  b - a > 0
    return "supported" if lo > 0 or (op in (">=", "<=") and lo >= 0) else "refuted" if hi < 0 else "inconclusive"


def _judge(claim: Claim, pairs: list[dict], names: list[str]) -> dict:
    """supported / refuted / inconclusive from the paired interval of a - b (perplexity: on per-window NLL), or
    too few to judge; with "holds in k of n seeds" from each seed's own interval."""
    out = []
    for a, b in _expand(claim, names):
        hit = [p for p in pairs if p["task"] == claim.task and p["metric"] == claim.metric and {p["a"], p["b"]} == {a, b}]
        if not hit:
            out.append({"claim": claim.text, "a": a, "b": b, "status": "not evaluated"})
            continue
        p = hit[0]
        sign = 1 if p["a"] == a else -1

        def oriented(lo, hi):
            return sorted((sign * lo + 0.0, sign * hi + 0.0))  # (+ 0.0: no "-0" for a tie)
        lo, hi = oriented(p["lo"], p["hi"])
        judged = p.get("units", MIN_UNITS) >= MIN_UNITS
        seeds = [_status(claim.op, *oriented(*iv)) for iv in p.get("seed_intervals", [[p["lo"], p["hi"]]])]
        out.append({"claim": claim.text, "a": a, "b": b, "status": _status(claim.op, lo, hi) if judged else TOO_FEW,
                    "diff": sign * p["diff"] + 0.0, "interval": [lo, hi], "units": p.get("units"), "n": p.get("n"),
                    "holds_in": sum(s == "supported" for s in seeds), "of_seeds": len(seeds),
                    "per_seed_diff": [sign * d + 0.0 for d in p.get("per_seed", [p["diff"]])]})
    return {"claim": claim.text, "results": out}


def _expand(claim: Claim, names: list[str]):
    """A claim on base run names applies to every pattern of a pattern axis."""
    if claim.a in names and claim.b in names:
        return [(claim.a, claim.b)]
    suffixes = sorted({n.split("@", 1)[1] for n in names if "@" in n})
    return [(f"{claim.a}@{s}" if claim.a not in names else claim.a, f"{claim.b}@{s}" if claim.b not in names else claim.b)
            for s in suffixes]


def mask_overlap(pruned: dict, recipe: Recipe) -> dict:
    """Jaccard index of the pruned sets of every pair of pruned models of one pattern (calibrations x seeds, and
    magnitude pruning), overall, per matrix type and per layer; with several seeds also summarised as between
    calibrations at the same seed and between seeds of the same calibration."""
    import torch
    from hybridprune.experiments.stats import pair_counts
    from hybridprune.io.folder import ShardReader
    several = len(recipe.seeds) > 1
    out = {}
    for pattern in sorted({k[0] for k in pruned if k[0] != "magnitude"}):
        members = {(f"{c}/seed {s}" if several else c): st for (p, c, s), st in
                   ((k, v) for k, v in pruned.items() if len(k) == 3) if p == pattern}
        members["magnitude"] = pruned[("magnitude", pattern)]
        members = {k: v for k, v in members.items() if v.done()}
        if len(members) < 2:
            continue
        report = json.loads((next(iter(members.values())).path / "sparsity.json").read_text())
        names = [f"{layer['layer']}.{m}.weight" for layer in report["layers"] for m in layer["matrices"]]
        readers = {k: ShardReader(s.path) for k, s in members.items()}  # one file or shards alike
        keys = list(members)
        pairs = list(itertools.combinations(range(len(keys)), 2))
        # counts[pair][group] = [|A & B|, |A | B|] summed over matrices; each matrix is read once per model, and
        # every pair's counts come from one matrix product over the members' zero masks
        counts = {(keys[x], keys[y]): collections.defaultdict(lambda: [0, 0]) for x, y in pairs}
        for n in names:
            inter, union = pair_counts(torch.stack([readers[k].get([n])[n].reshape(-1) == 0 for k in keys]))
            groups = ("overall", ("by_type", n.rsplit(".", 2)[-2]), ("by_layer", re.search(r"\.(\d+)\.", n).group(1)))
            for x, y in pairs:
                c = counts[(keys[x], keys[y])]
                i, u = int(inter[x, y]), int(union[x, y])
                for g in groups:
                    c[g][0] += i
                    c[g][1] += u
        rows = {}
        for (a, b), c in counts.items():
            ratio = {g: i / u if u else 1.0 for g, (i, u) in c.items()}
            rows[f"{a} vs {b}"] = {"a": a, "b": b, "overall": ratio["overall"],
                                   "by_type": {g[1]: r for g, r in ratio.items() if g[0] == "by_type"},
                                   "by_layer": {g[1]: r for g, r in ratio.items() if g[0] == "by_layer"}}
        out[pattern] = {"members": list(members), "pairs": rows}
        if several:
            out[pattern]["summary"] = _overlap_summary(rows, recipe)
    return out


def _overlap_summary(rows: dict, recipe: Recipe) -> dict:
    """Mean overall Jaccard (and its range) of: each two calibrations at the same seed; each calibration between
    its seeds; each calibration against magnitude."""
    def member(c, s):
        return f"{c}/seed {s}"

    def get(x, y):
        r = rows.get(f"{x} vs {y}") or rows.get(f"{y} vs {x}")
        return None if r is None else r["overall"]

    calibs = sorted({r[k].split("/seed ")[0] for r in rows.values() for k in ("a", "b")} - {"magnitude"})
    groups = {}
    for c1, c2 in itertools.combinations(calibs, 2):
        groups[f"{c1} vs {c2} (same seed)"] = [get(member(c1, s), member(c2, s)) for s in recipe.seeds]
    for c in calibs:
        groups[f"{c}: seed vs seed"] = [get(member(c, s), member(c, t)) for s, t in itertools.combinations(recipe.seeds, 2)]
        groups[f"{c} vs magnitude"] = [get(member(c, s), "magnitude") for s in recipe.seeds]
    groups = {k: [x for x in v if x is not None] for k, v in groups.items()}  # a partial report: seeds that ran
    return {k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "values": v} for k, v in groups.items() if v}


def _fmt(v, spread=None):
    if v is None:
        return "-"
    text = f"{v:.4g}"
    return text + (f" ± {spread:.2g}" if spread else "")


def _columns(recipe):
    return [(t, m) for t in recipe.tasks for m in sorted(METRICS[t])]


def _units(entry: dict | None) -> str:
    if not entry:
        return "-"
    clusters = entry.get("clusters")
    k = len(set(clusters)) if clusters else entry.get("n")
    return f"{entry.get('n')} / {k}"


def _markdown(recipe, table, pairs, claims, overlap, times, peak=None, ranking=None) -> str:
    cols = _columns(recipe)
    several = len(recipe.seeds) > 1
    spread = "mean over seeds ± between-seed SD" if several else "mean ± standard error; perplexity over windows"
    lines = [f"# Experiment: {Path(recipe.path).name}", "",
             f"Model `{recipe.model}`; {len(table)} runs; seeds {recipe.seeds} (each: the calibration draw and the "
             f"fine-tuning seed; the evaluated examples are the same for every seed); stage time "
             f"{sum(v for v in times.values() if v) / 60:.1f} min in all (from stages/times.json)" +
             (f"; the largest peak RSS of a stage's process {peak['kib'] / 1024:,.0f} MiB ({peak['stage']})"
              if peak else "") + ".", ""]
    if recipe.notes:
        lines += [recipe.notes, ""]
    calib = {k: recipe.prune.get(k, PruneConfig.__dataclass_fields__[k].default) for k in ("nsamples", "seqlen")}
    lines += [f"Calibration per prune: {calib['nsamples']} windows of {calib['seqlen']} tokens "
              f"({calib['nsamples'] * calib['seqlen']:,} tokens).", ""]
    first = next(iter(table.values()))["tasks"]
    lines += ["Examples per task (n / independent units, the clusters the bootstrap resamples): " +
              "; ".join(f"{t} {_units(first.get(t))} ({(first.get(t) or {}).get('selection', 'windows')})"
                        for t in recipe.tasks), ""]
    lines += [f"## Results ({spread})", "",
              "| run | sparsity | " + " | ".join(f"{t} {m}" for t, m in cols) + " | stage seconds |",
              "|---|---:|" + "---:|" * len(cols) + "---|"]
    for name, row in table.items():
        cells = []
        for t, m in cols:
            e = row["tasks"].get(t)
            cells.append(_fmt(*_metric_values(e, m, several)) if e else "-")
        secs = ", ".join(f"{k} {v:.0f}" for k, v in row["seconds"].items() if v)
        sp = "-" if row["sparsity"] is None else f"{row['sparsity']:.4f}"
        lines.append(f"| {name} | {sp} | " + " | ".join(cells) + f" | {secs} |")
    if several:
        lines += ["", "### Each seed's value", "", "| run | metric | " + " | ".join(f"seed {s}" for s in recipe.seeds)
                  + " |", "|---|---|" + "---:|" * len(recipe.seeds)]
        for name, row in table.items():
            for t, m in cols:
                per = (row["tasks"].get(t) or {}).get("per_seed", {}).get(m)
                if per:
                    lines.append(f"| {name} | {t} {m} | " + " | ".join(_fmt(per.get(s)) for s in recipe.seeds) + " |")
    how = ("two-level bootstrap: seeds, then clusters within each seed" if several else
           "bootstrap over clusters of examples")
    lines += ["", f"## Paired differences (a - b on the same examples; 95% interval, {how}; * excludes 0; "
              f"perplexity compared on per-window NLL; no verdict below {MIN_UNITS} independent units)", "",
              "| task | metric | a | b | a - b | interval | n / units | seeds excluding 0 | McNemar p |",
              "|---|---|---|---|---:|---|---:|---:|---:|"]
    for p in pairs:
        mark = "*" if p["significant"] else "" if p["judged"] else " (too few)"
        mc = p.get("mcnemar_p")
        mc = "" if mc is None else f"{mc:.3g}" if not isinstance(mc, list) else ", ".join(f"{x:.2g}" for x in mc)
        side = sum(lo > 0 or hi < 0 for lo, hi in p["seed_intervals"])
        lines.append(f"| {p['task']} | {p['metric']} | {p['a']} | {p['b']} | {p['diff']:+.4g}{mark} | "
                     f"[{p['lo']:+.4g}, {p['hi']:+.4g}] | {p['n']} / {p['units']} | {side} of {p['seeds']} | {mc} |")
    lines += ["", "## Claims", ""]
    for c in claims:
        for r in c["results"]:
            detail = "" if "diff" not in r else (
                f": a - b = {r['diff']:+.4g}, interval [{r['interval'][0]:+.4g}, {r['interval'][1]:+.4g}], "
                f"{r['units']} units; holds in {r['holds_in']} of {r['of_seeds']} seed(s)"
                + (" (per seed " + ", ".join(f"{d:+.3g}" for d in r["per_seed_diff"]) + ")" if several else ""))
            lines.append(f"- `{c['claim']}` ({r['a']} vs {r['b']}): **{r['status']}**{detail}")
    if ranking:
        lines += ["", "## Sources ranked per pattern (best first; difference to the best with its 95% interval, "
                  f"{how}; perplexity compared on per-window NLL; = marks an interval that reaches 0)", ""]
        for pattern, entry in ranking.items():
            for key, ranked in entry["tasks"].items():
                lines.append(f"- `{pattern or 'all'}` {key}: " + "; ".join(
                    f"{i + 1}. {x['run'].split('@')[0]} {x['value']:.4g}" +
                    (f" ({x['diff_to_best']:+.3g} [{x['interval'][0]:+.3g}, {x['interval'][1]:+.3g}]"
                     f"{' =' if x['tied_with_best'] else ''})" if "interval" in x else "")
                    for i, x in enumerate(ranked)))
        spreads = {p: e["spread"] for p, e in ranking.items() if e["spread"]}
        if spreads:
            lines += ["", "Spread between calibration sources (worst / best WikiText-2 perplexity, magnitude left "
                      "out), per seed:", "", "| pattern | " + " | ".join(f"seed {s}" for s in recipe.seeds) + " |",
                      "|---|" + "---:|" * len(recipe.seeds)]
            for p, sp in spreads.items():
                lines.append(f"| {p or 'all'} | " + " | ".join(f"{sp[s]:.3f}" if s in sp else "-"
                                                               for s in recipe.seeds) + " |")
    lines += ["", "## Mask overlap (Jaccard index of the pruned sets)", ""]
    for pattern, o in overlap.items():
        lines += [f"Pattern `{pattern}`:", ""]
        if o.get("summary"):
            lines += ["| what | mean | range |", "|---|---:|---|"]
            lines += [f"| {k} | {v['mean']:.4f} | {v['min']:.4f} - {v['max']:.4f} |" for k, v in o["summary"].items()]
            lines.append("")
        types = sorted({k for r in o["pairs"].values() for k in r["by_type"]})
        lines.append("| pair | overall | " + " | ".join(types) + " |")
        lines.append("|---|---:|" + "---:|" * len(types))
        for name, r in o["pairs"].items():
            lines.append(f"| {name} | {r['overall']:.4f} | " + " | ".join(f"{r['by_type'][t]:.3f}" for t in types)
                         + " |")
        lines.append("")
    lines.append("Plots: `plots/` (one bar chart per metric, error bars as in the table, dots for each seed; "
                 "`overlap-<pattern>.png`).")
    return "\n".join(lines) + "\n"


def _csv(recipe, table) -> str:
    """One row per run, task, metric and seed, and for several seeds a `mean` row with the between-seed SD."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "task", "metric", "seed", "value", "stderr", "sd", "n"])
    for name, row in table.items():
        for t, m in _columns(recipe):
            for seed, entries in row["seeds"].items():
                e = entries.get(t)
                if e and e.get(m) is not None:
                    w.writerow([name, t, m, seed, e[m], e.get(m + "_stderr", ""), "", e.get("n")])
            s = row["tasks"].get(t)
            if len(row["seeds"]) > 1 and s and s.get(m) is not None:
                w.writerow([name, t, m, "mean", s[m], "", s.get(m + "_sd", ""), s.get("n")])
    return buf.getvalue()


def _plots(recipe, table, overlap, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(table)
    for t, m in _columns(recipe):
        vals = [_metric_values(table[n]["tasks"][t], m, len(recipe.seeds) > 1) if t in table[n]["tasks"]
                else (None, None) for n in names]
        if all(v is None for v, _ in vals):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names)), 3.2))
        ax.bar(range(len(names)), [v or 0 for v, _ in vals], yerr=[e or 0 for _, e in vals], capsize=3,
               color="#4a7ab5")
        for i, n in enumerate(names):
            per = (table[n]["tasks"].get(t) or {}).get("per_seed", {}).get(m)
            if per:
                ax.plot([i] * len(per), list(per.values()), "o", color="k", ms=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{t} {m}" + (f" ({len(recipe.seeds)} seeds)" if len(recipe.seeds) > 1 else ""))
        fig.tight_layout()
        fig.savefig(folder / f"{t}-{re.sub(r'[^A-Za-z0-9_.-]', '_', m)}.png", dpi=110)
        plt.close(fig)
    for pattern, o in overlap.items():
        members = o["members"]
        mat = np.eye(len(members))
        for r in o["pairs"].values():
            i, j = members.index(r["a"]), members.index(r["b"])
            mat[i, j] = mat[j, i] = r["overall"]
        fig, ax = plt.subplots(figsize=(0.9 * len(members) + 2.5, 0.8 * len(members) + 1.8))
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(members)), members, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(members)), members, fontsize=8)
        for i in range(len(members)):
            for j in range(len(members)):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if mat[i, j] < 0.6 else "k")
        ax.set_title(f"pruned-set Jaccard, {pattern}")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(folder / f"overlap-{pattern}.png", dpi=110)
        plt.close(fig)
