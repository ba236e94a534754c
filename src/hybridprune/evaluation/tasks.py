"""Downstream tasks as data, run by lm-evaluation-harness on the in-memory model.

Each task is an lm-eval task config (prompt, target, answer extraction, metric) that reads our local files
(written once as flat JSON lines into the cache) or the hub. Prompts and extraction follow lm-eval's stock tasks:
BoolQ 0-shot log-likelihood of " no"/" yes"; GSM8K 5-shot from train, greedy until "Question:", strict
(`#### n`) and flexible (last number) extraction. SQuAD v1.1 has no stock v1.1 task in lm-eval, so its metric
(official normalisation, EM and token F1, max over gold answers) is ours, in `squad_scores`.
WikiText-2 perplexity is the papers' computation from evaluate.py, reported in the same results.

Every task also reports a continuous score that is meaningful at any model size (a 135M model sits at the floor of
GSM8K accuracy): `gold_nll`, the mean per-token negative log-likelihood of the gold answer given the exact prompt
that was scored (SQuAD: the first gold answer; GSM8K: the reference solution; BoolQ: the correct choice), through
lm-eval log-likelihood requests, and for BoolQ `margin`, the log-odds of the correct choice over the wrong one.
Per-example values of every metric are kept (`per_example`, in doc order) for paired comparisons.

Few-shot exemplars only ever come from a training split (GSM8K train, BoolQ train, the SQuAD *fit* half), drawn
by lm-eval's sampler with lm-eval's own default seed (1234), so prompts equal the stock tasks'.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import re
import string

from hybridprune.io.data import boolq_examples, data_dir, gsm8k_examples, local_file, squad_examples
from hybridprune.core.errors import HybridPruneError, require
from hybridprune.evaluation import adapters
from hybridprune.evaluation.adapters import SAME_LENGTH  # noqa: F401
from hybridprune.io.models import cache_dir

TASKS = ("wikitext2", "boolq", "gsm8k", "squad")
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampler seed: the stock tasks' exemplars
BOOLQ_PROMPT = "{{passage}}\nQuestion: {{question}}?\nAnswer:"
GSM8K_PROMPT = "Question: {{question}}\nAnswer:"
GSM8K_INSTRUCT = ("Solve the math problem step by step. End with a line '#### <number>' giving the final answer.\n"
                  "Question: {{question}}\nAnswer:")
SQUAD_PROMPT = "Title: {{title}}\n\nBackground: {{context}}\n\nQuestion: {{question}}\n\nAnswer:"


# ----------------------------------------------------------------------------- SQuAD v1.1 metric

def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1: lowercase, drop punctuation and the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: list[str]) -> dict:
    """EM and F1 (x100), each the max over the gold answers."""
    if not golds:
        raise HybridPruneError("a SQuAD v1.1 question without gold answers")
    return {"exact_match": 100.0 * max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds),
            "f1": 100.0 * max(squad_f1(prediction, g) for g in golds)}


def _squad_process_results(doc, results):
    return squad_scores(results[0].strip(), doc["answers"])


# ----------------------------------------------------------------------------- task configs

def _write_jsonl(name: str, rows: list[dict]) -> str:
    """Flat JSON lines in the cache, named by content hash so a changed source never reuses a stale file."""
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    path = cache_dir() / "tasks" / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.rename(path)
    return str(path)


def _fewshot_rows(name: str, loader, shots: int) -> list[dict]:
    """Training rows for few-shot exemplars; without a training split, shots > 0 is refused (never sampled
    from the evaluated examples)."""
    try:
        rows = loader()
    except HybridPruneError as e:
        raise HybridPruneError(f"--num-fewshot {shots} needs a {name} training split for the exemplars ({e}); "
                               "use --num-fewshot 0") from None
    if shots > len(rows):
        raise HybridPruneError(f"--num-fewshot {shots} is more than the {len(rows)} examples of {name}'s training "
                               f"split that exemplars come from; use --num-fewshot {len(rows)} or less")
    return rows


def task_config(name: str, data_dir_path=None, num_fewshot: int | None = None, gsm8k_mode: str = "fewshot") -> dict:
    """The lm-eval config of one task, reading local files when a data directory is set."""
    root = data_dir(data_dir_path)
    if num_fewshot is not None and num_fewshot < 0:
        raise HybridPruneError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if name == "boolq":
        shots = 0 if num_fewshot is None else num_fewshot
        cfg = {"output_type": "multiple_choice", "doc_to_text": BOOLQ_PROMPT, "doc_to_target": "label",
               "doc_to_choice": ["no", "yes"], "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                                "higher_is_better": True}],
               "num_fewshot": shots}
        if root is None:
            cfg.update(dataset_path="aps/super_glue", dataset_name="boolq", validation_split="validation",
                       training_split="train", fewshot_split="train")
        else:
            def flat(split):
                return [{"question": r["question"], "passage": r["passage"], "label": int(r["label"])}
                        for r in boolq_examples(split, root)]
            files = {"validation": _write_jsonl("boolq-validation", flat("validation"))}
            if shots:
                files["train"] = _write_jsonl("boolq-train", _fewshot_rows("boolq", lambda: flat("train"), shots))
                cfg.update(training_split="train", fewshot_split="train")
            cfg.update(dataset_path="json", validation_split="validation", dataset_kwargs={"data_files": files})
        return {"task": "hybridprune_boolq", **cfg, "_split": "validation", "_prompt": BOOLQ_PROMPT}
    if name == "gsm8k":
        if gsm8k_mode not in ("fewshot", "instruct"):
            raise HybridPruneError(f"unknown --gsm8k-mode {gsm8k_mode!r}; use fewshot or instruct")
        fewshot = (5 if gsm8k_mode == "fewshot" else 0) if num_fewshot is None else num_fewshot
        prompt = GSM8K_PROMPT if gsm8k_mode == "fewshot" else GSM8K_INSTRUCT
        cfg = {"output_type": "generate_until", "doc_to_text": prompt, "doc_to_target": "{{answer}}",
               "num_fewshot": fewshot, "training_split": "train", "fewshot_split": "train", "test_split": "test",
               "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                     "temperature": 0.0, "max_gen_toks": 256},
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                "ignore_case": True, "ignore_punctuation": False,
                                "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
               "filter_list": [
                   {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                       {"function": "take_first"}]},
                   {"name": "flexible-extract", "filter": [
                       {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                       {"function": "take_first"}]}]}
        if root is None:
            cfg.update(dataset_path="openai/gsm8k", dataset_name="main")
        else:
            gsm8k_examples("test", root)  # fails early, naming the file, if it is missing or holds a bad line
            if fewshot:
                _fewshot_rows("gsm8k", lambda: gsm8k_examples("train", root), fewshot)
            cfg.update(dataset_path="json", dataset_kwargs={"data_files": {
                "train": str(local_file(root, "gsm8k", "train")), "test": str(local_file(root, "gsm8k", "test"))}})
        return {"task": "hybridprune_gsm8k", **cfg, "_split": "test", "_prompt": prompt, "_mode": gsm8k_mode}
    if name == "squad":
        cfg = {"output_type": "generate_until", "doc_to_text": SQUAD_PROMPT, "doc_to_target": "{{answers[0]}}",
               "num_fewshot": 0 if num_fewshot is None else num_fewshot, "test_split": "test",
               "generation_kwargs": {"until": ["\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 32},
               "process_results": _squad_process_results,
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "f1", "aggregation": "mean", "higher_is_better": True}]}
        rows = squad_examples("eval", root)
        split = "validation" if root is None else "dev, evaluation half (odd-numbered articles)"
        if not rows:
            raise HybridPruneError(f"SQuAD's evaluation split ({split}) holds no questions; fix the data file")
        files = {"test": _write_jsonl("squad-eval", rows)}
        if cfg["num_fewshot"]:  # exemplars from the fitting half (offline) or train (hub), never from the test rows
            fit = _fewshot_rows("squad", lambda: squad_examples("fit", root), cfg["num_fewshot"])
            files["train"] = _write_jsonl("squad-fit", fit)
            cfg.update(training_split="train", fewshot_split="train")
        cfg.update(dataset_path="json", dataset_kwargs={"data_files": files})
        return {"task": "hybridprune_squad", **cfg, "_split": split, "_prompt": SQUAD_PROMPT}
    raise HybridPruneError(f"unknown task {name!r}; use any of: {', '.join(TASKS)}")


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for t in names:
        if t not in TASKS:
            raise HybridPruneError(f"unknown task {t!r}; use any of: {', '.join(TASKS)}")
    if not names:
        raise HybridPruneError(f"no task given; use any of: {', '.join(TASKS)}")
    return names


# ----------------------------------------------------------------------------- which examples

# Examples that share a passage are not independent units: SQuAD questions on one paragraph, BoolQ questions on
# one passage. (stratum, cluster) fields per task; a seeded sample spreads over strata (SQuAD articles) and
# takes at most PER_CLUSTER examples of a cluster; the paired bootstrap resamples clusters.
UNITS = {"squad": ("title", "context"), "boolq": (None, "passage"), "gsm8k": (None, None)}
PER_CLUSTER = 2


def task_rows(name: str, root=None) -> list[dict]:
    """The evaluated split of a task, in lm-eval's document order."""
    if name == "squad":
        return squad_examples("eval", root)
    if name == "boolq":
        return boolq_examples("validation", root)
    if name == "gsm8k":
        return gsm8k_examples("test", root)
    raise HybridPruneError(f"unknown task {name!r}; use any of: {', '.join(TASKS)}")


def _unit_keys(name: str, rows: list[dict]) -> tuple[list, list]:
    stratum_key, cluster_key = UNITS[name]
    clusters = [r[cluster_key] if cluster_key else i for i, r in enumerate(rows)]
    strata = [r[stratum_key] if stratum_key else c for r, c in zip(rows, clusters)]
    return strata, clusters


def spread_sample(name: str, rows: list[dict], n: int, seed: int = 0) -> list[int]:
    """n document indices (sorted), the same for a given seed: strata (articles) in a seeded order take turns, each
    turn adding one not yet used cluster (paragraph or passage) of that stratum with at most PER_CLUSTER of its
    examples, so the sample is spread over the whole split instead of being its first article."""
    import random
    rng = random.Random(seed)
    strata, clusters = _unit_keys(name, rows)
    tree: dict = {}
    for i, (s, c) in enumerate(zip(strata, clusters)):
        tree.setdefault(s, {}).setdefault(c, []).append(i)
    queues = []
    for s in sorted(tree, key=str):
        cl = [sorted(v) for _, v in sorted(tree[s].items(), key=lambda kv: kv[1][0])]
        rng.shuffle(cl)
        for members in cl:
            rng.shuffle(members)
        queues.append([m[:PER_CLUSTER] for m in cl])
    rng.shuffle(queues)
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.extend(q.pop(0)[: n - len(chosen)])
    return sorted(chosen)


def cluster_ids(name: str, rows: list[dict], indices: list[int]) -> list[int]:
    """For each selected document, the number of its cluster (first appearance order): equal numbers move
    together in the bootstrap."""
    _, clusters = _unit_keys(name, rows)
    numbering: dict = {}
    return [numbering.setdefault(clusters[i], len(numbering)) for i in indices]


# ----------------------------------------------------------------------------- running

def require_eval(tasks: list[str]) -> None:
    """lm-evaluation-harness is an extra: asked for before any model is loaded or any metric computed."""
    if any(task != "wikitext2" for task in tasks):
        require("lm_eval", "eval", "evaluating SQuAD, GSM8K and BoolQ")


def evaluate_model(model, tokenizer, tasks: list[str], limit: int | None = None, seed: int = 0, batch_size: int = 8,
                   num_fewshot: int | None = None, gsm8k_mode: str = "fewshot", chat_template: bool = False,
                   data_dir_path=None, ppl_seqlen: int = 2048, ppl_windows: int | None = None,
                   samples_path=None, fewshot_seed: int = LM_EVAL_FEWSHOT_SEED, bos: str = "auto",
                   generate_batch_size: int | None = None, sample: int | None = None, sample_seed: int = 0,
                   generate: bool = True) -> dict:
    """Run the tasks on an in-memory model; returns {task: {metric: value, metric_stderr: ..., n, split, prompt}}.

    seed seeds sampling (none of these tasks samples); fewshot_seed picks the exemplars (lm-eval's default);
    bos: whether every prompt starts with BOS (data.resolve_bos; auto asks the tokenizer).
    batch_size: log-likelihood requests (their logits are batch x length x vocab); generate_batch_size: greedy
    generation (default batch_size), which keeps only the last position's logits and gains most from width.
    sample: a seeded subset of each task's split spread over its articles/passages (spread_sample, seed
    sample_seed), instead of lm-eval's first `limit` examples. Every entry records its `doc_ids` and `clusters`.
    generate=False: SQuAD and GSM8K report their gold-answer NLL only; no answer is generated (one token is, for
    lm-eval's sake, and its scores are dropped), which is where a small pruned model sits at the accuracy floor.
    """
    require_eval(tasks)
    from hybridprune.io.data import resolve_bos
    from hybridprune.evaluation.ppl import perplexity

    check_eval_args(limit=limit, sample=sample, batch_size=batch_size, generate_batch_size=generate_batch_size)
    if not hasattr(model, "generate") and any(t in ("gsm8k", "squad") for t in tasks):
        raise HybridPruneError(f"{type(model).__name__} cannot generate; gsm8k and squad need a causal LM")
    configs = {t: task_config(t, data_dir_path, num_fewshot, gsm8k_mode) for t in tasks if t != "wikitext2"}
    if not generate:
        for c in configs.values():
            if c["output_type"] == "generate_until":
                c["generation_kwargs"] = {**c["generation_kwargs"], "max_gen_toks": 1}
    bos = resolve_bos(tokenizer, bos)
    results = {}
    if "wikitext2" in tasks:
        ppl = perplexity(model, tokenizer, seqlen=ppl_seqlen, max_windows=ppl_windows, data_dir_path=data_dir_path,
                         bos=bos)
        results["wikitext2"] = {"ppl": ppl["ppl"], "n": ppl["windows"], "split": "test", "bos": bos,
                                "clusters": list(range(ppl["windows"])),
                                "prompt": f"rows joined with blank lines, windows of {ppl_seqlen} tokens",
                                "per_example": {"nll": ppl["window_nll"]}}
    if not configs:
        return results
    from lm_eval import simple_evaluate

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos == "always")
    lm.generate_batch_size = generate_batch_size or batch_size
    from hybridprune.io.models import input_device
    lm._device = input_device(model)  # a model offloaded by accelerate reports the meta device as its own
    root = data_dir(data_dir_path)
    rows = {name: task_rows(name, root) for name in configs}
    if sample is not None:
        docs = {name: spread_sample(name, rows[name], sample, sample_seed) for name in configs}
    else:
        docs = {name: list(range(min(limit or len(r), len(r)))) for name, r in rows.items()}
    out = simple_evaluate(model=lm, tasks=[{k: v for k, v in c.items() if not k.startswith("_")}
                                           for c in configs.values()], task_manager=_task_manager(),
                          limit=None if sample is not None else limit, log_samples=True,
                          samples={configs[n]["task"]: d for n, d in docs.items()} if sample is not None else None,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=fewshot_seed, apply_chat_template=chat_template)
    for name, cfg in configs.items():
        raw = out["results"][cfg["task"]]
        entry = {"n": raw.get("sample_len", out["n-samples"][cfg["task"]]["effective"]), "split": cfg["_split"],
                 "prompt": cfg["_prompt"], "num_fewshot": cfg["num_fewshot"], "fewshot_seed": fewshot_seed,
                 "bos": bos}
        entry.update(doc_ids=docs[name], clusters=cluster_ids(name, rows[name], docs[name]),
                     selection=f"seeded sample of {sample} spread over {UNITS[name][0] or 'the split'}, seed "
                               f"{sample_seed}" if sample is not None else f"first {len(docs[name])}")
        if "_mode" in cfg:
            entry["mode"] = cfg["_mode"] + (" (chat template)" if chat_template else "")
        for key, value in raw.items():
            if "," not in key or key.startswith("alias"):
                continue
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric[: -len("_stderr")] if stderr else metric
            label = base if filt == "none" else f"{base}[{filt}]"
            entry[label + ("_stderr" if stderr else "")] = value
        task_samples = out.get("samples", {}).get(cfg["task"], [])
        entry["per_example"] = _per_example(task_samples)
        if not generate and cfg["output_type"] == "generate_until":  # one token generated: no answer to score
            entry = {k: v for k, v in entry.items() if not k.startswith(("exact_match", "f1"))}
            entry["per_example"] = {}
            entry["mode"] = (entry["mode"] + ", " if entry.get("mode") else "") + "gold NLL only (no generation)"
        gold = gold_scores(lm, name, task_samples)
        entry.update(_mean_and_stderr(gold))
        entry["per_example"].update(gold)
        results[name] = entry
    if samples_path is not None:
        _write_samples(out.get("samples", {}), configs, samples_path)
    return results


def check_eval_args(limit=None, sample=None, batch_size=8, generate_batch_size=None, windows=None,
                    windows_flag: str = "--ppl-windows") -> None:
    """Evaluation options, checked before any model is read (the CLI and recipes call this too)."""
    for flag, value, low in (("--limit", limit, 1), ("--sample", sample, 1), ("--batch-size", batch_size, 1),
                             ("--generate-batch-size", generate_batch_size, 1), (windows_flag, windows, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise HybridPruneError(f"{flag} must be a whole number >= {low}, got {value!r}")
    if limit is not None and sample is not None:
        raise HybridPruneError("--limit (the first N examples) and --sample (a spread-out seeded subset) exclude "
                               "each other; give one")


@functools.lru_cache(maxsize=1)
def _lm_class():
    """lm-eval's HFLM with our speed-ups (evaluation.adapters.lm_class), scoring gold answers as gold_pair says."""
    return adapters.lm_class(gold_pair)


_StopPerRow = adapters.StopPerRow


@functools.lru_cache(maxsize=1)
def _task_manager():
    """Our tasks are config dicts: lm-eval need not index its ~26,000 built-in task files (18 of 21 s of a
    4-example BoolQ run on a tiny model were that index)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_defaults=False)


def _by_doc(samples: list[dict]) -> list[dict]:
    """One sample per document (the first filter's), in doc order."""
    first = {}
    for s in samples:
        first.setdefault(s["doc_id"], s)
    return [first[k] for k in sorted(first)]


def _per_example(samples: list[dict]) -> dict[str, list[float]]:
    """{metric label: values in doc order}, labels as in the results (metric[filter] unless the filter is none)."""
    out: dict[str, dict[int, float]] = {}
    for s in samples:
        for metric in s.get("metrics", []):
            label = metric if s.get("filter", "none") == "none" else f"{metric}[{s['filter']}]"
            out.setdefault(label, {})[s["doc_id"]] = float(s[metric])
    return {label: [v[k] for k in sorted(v)] for label, v in out.items()}


def _mean_and_stderr(values: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for label, v in values.items():
        n = len(v)
        mean = sum(v) / n
        var = sum((x - mean) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
        out[label], out[label + "_stderr"] = mean, math.sqrt(var / n)
    return out


def gold_answer(task: str, doc: dict) -> str:
    if task == "squad":
        return doc["answers"][0]
    if task == "gsm8k":
        return doc["answer"]
    raise ValueError(task)


def gold_pair(task: str, prompt: str, doc: dict) -> tuple[str, str]:
    """The (context, continuation) whose log-likelihood is a generation task's gold-answer score."""
    return prompt, " " + gold_answer(task, doc)


def gold_scores(lm, task: str, samples: list[dict]) -> dict[str, list[float]]:
    """Per document: gold_nll (mean per-token NLL of the gold answer after the scored prompt) and, for BoolQ,
    margin (log p(correct) - log p(wrong)). Token counts are lm-eval's own context/continuation split."""
    docs = _by_doc(samples)
    if not docs:
        return {}
    if task == "boolq":
        nll, margin = [], []
        for s in docs:
            gold = int(s["doc"]["label"])
            lls = [float(r[0][0]) for r in s["resps"]]
            context, continuation = s["arguments"][gold]
            nll.append(-lls[gold] / len(lm._encode_pair(context, continuation)[1]))
            margin.append(lls[gold] - lls[1 - gold])
        return {"gold_nll": nll, "margin": margin}
    from lm_eval.api.instance import Instance
    pairs = [gold_pair(task, s["arguments"][0][0], s["doc"]) for s in docs]
    requests = [Instance(request_type="loglikelihood", doc=s["doc"], arguments=pair, idx=0)
                for s, pair in zip(docs, pairs)]
    lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    return {"gold_nll": [-ll / len(lm._encode_pair(*pair)[1]) for ll, pair in zip(lls, pairs)]}


def _write_samples(samples: dict, configs: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for name, cfg in configs.items():
            for s in samples.get(cfg["task"], []):
                row = {"task": name, "doc_id": s.get("doc_id"), "prompt": s["arguments"][0][0] if s.get("arguments")
                       else None, "output": s.get("resps"), "extracted": s.get("filtered_resps"),
                       "target": s.get("target"), "scores": {k: s[k] for k in ("acc", "exact_match", "f1") if k in s},
                       "filter": s.get("filter")}
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def metric_rows(results: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) for the headline metrics, in a stable order."""
    rows = []
    for task, entry in results.items():
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not k.endswith("_stderr") and k not in ("n", "num_fewshot",
                                                                                         "fewshot_seed"):
                rows.append((task, k, float(v)))
    return rows


