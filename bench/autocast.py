"""Does bf16 autocast in fine-tuning change a study's answers? A variant of the recipe with `autocast: bf16` in every
fine-tuning entry is run (only its fine-tuning stages and their evaluations are new: prunes and the other
evaluations are the fp32 study's, when --bf16 starts as a copy of --fp32's folder), then compared with the fp32 study
on the same seeds and examples:

    python bench/autocast.py recipes/calibration-study.yaml --fp32 runs/calib-study --bf16 runs/calib-bf16 --seeds 0

Per fine-tuned run, task and metric: the fp32 and bf16 values at each seed, their paired difference with its
clustered bootstrap interval (the report's units: SQuAD paragraphs, BoolQ passages, WikiText-2 windows), and the
fp32 study's between-seed SD (perplexity's interval is on the per-window NLL, as in the report). bf16 agrees where
the difference is within that SD. Also per fine-tuning stage: the
loss curves' largest gap and both stages' seconds. Writes <bf16>/autocast.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from hybridprune.experiments.experiment import plan, run_experiment
from hybridprune.experiments.recipe import METRICS, load_recipe
from hybridprune.experiments.report import _per_example
from hybridprune.experiments.stats import paired_bootstrap

MAIN = {"wikitext2": ["ppl"], "squad": ["f1", "exact_match", "gold_nll"], "boolq": ["acc", "gold_nll"],
        "gsm8k": ["exact_match[flexible-extract]"]}


def variant(recipe_path: Path, seeds: list[int], out: Path) -> Path:
    raw = yaml.safe_load(recipe_path.read_text())
    raw["seeds"] = seeds
    for opts in (raw.get("finetune") or {}).values():
        if opts:
            opts["autocast"] = "bf16"
    path = out / "recipe-bf16.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_seconds(folder: Path) -> dict:
    f = folder / "stages" / "times.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def result(stage, task: str) -> dict:
    return json.loads(stage.path.read_text())["results"][task]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--fp32", type=Path, required=True, help="the fp32 study's folder (all of its seeds run)")
    ap.add_argument("--bf16", type=Path, required=True, help="the bf16 variant's folder (a copy of --fp32's reuses "
                                                             "its prunes and evaluations)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()

    path = variant(args.recipe, args.seeds, args.bf16)
    run_experiment(path, args.bf16)
    fp, bf = load_recipe(args.recipe), load_recipe(path)
    _, fp_runs, _ = plan(fp, args.fp32)
    _, bf_runs, _ = plan(bf, args.bf16)
    t_fp, t_bf = stage_seconds(args.fp32), stage_seconds(args.bf16)
    rows, stages = [], []
    for run in (r for r in bf.runs if r.finetune != "none"):
        for seed in args.seeds:
            a, b = fp_runs[run.name][seed]["_model"], bf_runs[run.name][seed]["_model"]
            la = json.loads((a.path / "loss.json").read_text())
            lb = json.loads((b.path / "loss.json").read_text())
            stages.append({"run": run.name, "seed": seed, "fp32_seconds": t_fp.get(a.key),
                           "bf16_seconds": t_bf.get(b.key), "final_loss": [la[-1][1], lb[-1][1]],
                           "largest_loss_gap": max(abs(x[1] - y[1]) for x, y in zip(la, lb))})
            for task in bf.tasks:
                fp_seeds = {s: result(fp_runs[run.name][s][task], task) for s in fp.seeds}
                ea, eb = fp_seeds[seed], result(bf_runs[run.name][seed][task], task)
                for metric in (m for m in MAIN.get(task, []) if m in METRICS[task] and m in ea):
                    spread = statistics.stdev(e[metric] for e in fp_seeds.values()) if len(fp_seeds) > 1 else None
                    row = {"run": run.name, "seed": seed, "task": task, "metric": metric, "fp32": ea[metric],
                           "bf16": eb[metric], "diff": eb[metric] - ea[metric], "fp32_seed_sd": spread}
                    pa, pb = _per_example(ea, metric), _per_example(eb, metric)
                    if pa is not None and pb is not None:
                        ci = paired_bootstrap(pb, pa, clusters=ea.get("clusters"))
                        row.update(per_example_diff=ci["diff"], lo=ci["lo"], hi=ci["hi"], units=ci.get("units"))
                    row["agrees"] = spread is not None and abs(row["diff"]) <= spread
                    rows.append(row)
    print(f"{'run':9} {'seed':>4} {'task.metric':19} {'fp32':>9} {'bf16':>9} {'diff':>8} {'paired 95% CI':>20} "
          f"{'fp32 seed SD':>12}  within SD")
    for r in rows:
        ci = f"[{r['lo']:+.3f}, {r['hi']:+.3f}]" if "lo" in r else "-"
        sd = f"{r['fp32_seed_sd']:.3f}" if r["fp32_seed_sd"] is not None else "-"
        print(f"{r['run']:9} {r['seed']:>4} {r['task'] + '.' + r['metric']:19} {r['fp32']:9.3f} {r['bf16']:9.3f} "
              f"{r['diff']:+8.3f} {ci:>20} {sd:>12}  {'yes' if r['agrees'] else 'NO'}")
    print(f"\n{sum(r['agrees'] for r in rows)} of {len(rows)} differences within the fp32 between-seed SD")
    for s in stages:
        print(f"fine-tuning {s['run']} seed {s['seed']}: {s['fp32_seconds']} s fp32 -> {s['bf16_seconds']} s bf16; "
              f"final loss {s['final_loss'][0]:.4f} -> {s['final_loss'][1]:.4f}, largest gap in the logged curve "
              f"{s['largest_loss_gap']:.4f}")
    (args.bf16 / "autocast.json").write_text(json.dumps({"rows": rows, "stages": stages}, indent=1))


if __name__ == "__main__":
    main()
