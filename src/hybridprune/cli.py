"""The `hybridprune` command: prune, ppl, inspect, progressive.

Bad input ends with one line on stderr and exit code 2; output folders appear only when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from hybridprune.core.config import PRUNE_GROUPS, FinetuneConfig, PruneConfig, naming
from hybridprune.core.config import fields as config_fields
from hybridprune.core.errors import HybridPruneError, interrupt_on_sigterm
from hybridprune.core.specs import ACTIVATIONS


def _add_model_args(p):
    p.add_argument("--device", help="where layers are computed: cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    p.add_argument("--data-dir", help="data directory in the layout of shared/data (default: $HYBRIDPRUNE_DATA, "
                                      "else the Hugging Face hub)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--bos", default="auto", help="BOS token at the start of every calibration / perplexity window, "
                   "prompt and training sequence: auto (if the tokenizer adds one itself, e.g. Gemma) | always | "
                   "papers (text tokenized once, then cut: the Wanda/SparseGPT convention) (default auto)")


def _add_kernel_args(p):
    p.add_argument("--kernels", action="store_true", help="compute the pruned matrices from their packed form with "
                   "hybridprune's sparse CPU kernels (a packed folder, or an unpruned-format pruned folder packed in "
                   "memory); a model with nothing pruned runs dense")
    p.add_argument("--lm-head", default="float", choices=["float", "int8"], help="with --kernels: int8 also packs "
                   "the output layer (int8 values, a scale per vocabulary row; the tied embedding keeps its weights)")
    p.add_argument("--activations", default="float", choices=list(ACTIVATIONS), help="with --kernels and "
                   "int8 values (a folder packed with --values int8): int8 also rounds each input row to int8 in the "
                   "sparse kernels, which then sum int8 products (AVX-512 VNNI); int8x2 rounds each row and its "
                   "rounding error (two int8 terms, about 16 bits of x), one pass over the weights")


# ----------------------------------------------------------------------------- options from the configs

PRUNE_SHARED = ("device", "data_dir", "bos")  # given by the model options every command shares
FT_SHARED = ("device", "data_dir", "bos")


def _add_config_args(p, cls, title: str, dest_prefix: str = "", flags: dict | None = None, exclude=(),
                     groups: dict | None = None) -> dict:
    """A flag for every field of the config dataclass `cls` (core.config), with its help text and default; returns
    {field: flag} for naming errors. dest is dest_prefix + field; flags overrides a field's flag; groups: help
    sections {title: fields} (the rest under `title`)."""
    sections = {name: p.add_argument_group(name) for name in (groups or {})}
    home = {field: sections[name] for name, fields in (groups or {}).items() for field in fields}
    rest = None
    names = {}
    for f in config_fields(cls):
        meta = f.metadata
        if f.name in exclude or not meta.get("cli", True):
            continue
        if f.name in home:
            g = home[f.name]
        else:
            g = rest = rest or p.add_argument_group(title)
        flag = (flags or {}).get(f.name) or meta.get("negate") or meta.get("flag") or "--" + f.name.replace("_", "-")
        names[f.name] = flag
        dest = dest_prefix + f.name
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        help_text = meta["help"] + ("" if f.default is None or isinstance(f.default, bool) else f" (default {shown})")
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            g.add_argument(flag, dest=dest, action=action, help=meta["help"])
        elif meta.get("repeat"):
            g.add_argument(flag, dest=dest, action="append", default=None, metavar=meta.get("metavar") or
                           f.name.upper(), help=help_text)
        else:
            kind = meta.get("parse") or meta.get("type") or type(f.default)
            g.add_argument(flag, dest=dest, type=str if meta.get("parse") else kind, default=f.default,
                           metavar=meta.get("metavar") or f.name.upper(), help=help_text)
    return names


def _config_from_args(cls, args, dest_prefix: str = "", names: dict | None = None, **given):
    """Build `cls` from the flags _add_config_args made (plus `given` values), errors naming the flags."""
    kwargs = {}
    for f in config_fields(cls):
        dest = dest_prefix + f.name
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif hasattr(args, dest):
            value = getattr(args, dest)
            if f.metadata.get("repeat"):
                value = f.default if value is None else tuple(s for item in value for s in item.split(",")
                                                              if s and s != "none")
            elif f.metadata.get("parse") and isinstance(value, str):
                with naming(names or {}):
                    value = f.metadata["parse"](value)
            kwargs[f.name] = value
    with naming(names or {}):
        return cls(**kwargs)


def _config(args):
    return _config_from_args(PruneConfig, args, names=args.prune_flags, device=args.device, data_dir=args.data_dir,
                             bos=args.bos)


def _check_out(out, overwrite):
    from hybridprune.core.files import check_out_path
    check_out_path(out)
    if Path(out).exists() and not overwrite:
        raise HybridPruneError(f"output folder {out} exists; pass --overwrite or choose another --out")


def _load(args, spec, to_device: bool = True):
    """Load for a command. to_device: move the model to --device (not for pruning, whose engine brings one layer
    at a time); with --device-map, accelerate places (and offloads) the layers instead."""
    from hybridprune.sparse.load import load_model
    device_map = getattr(args, "device_map", None)
    max_memory = _max_memory(getattr(args, "max_memory", None))
    if device_map is None and (max_memory or getattr(args, "offload_folder", None)):
        raise HybridPruneError("--max-memory and --offload-folder need --device-map auto")
    if device_map and args.device:
        raise HybridPruneError("--device-map places the layers itself; drop --device")
    kernels, lm_head = getattr(args, "kernels", False), getattr(args, "lm_head", "float")
    activations = getattr(args, "activations", "float")
    if lm_head != "float" and not kernels:
        raise HybridPruneError(f"--lm-head {lm_head} runs the output layer on the kernels; add --kernels")
    if activations != "float" and not kernels:
        raise HybridPruneError(f"--activations {activations} runs on the kernels; add --kernels")
    if kernels and (device_map or (args.device and args.device != "cpu")):
        raise HybridPruneError("--kernels computes on the CPU; drop --device/--device-map, or drop --kernels")
    if kernels:
        from hybridprune.sparse.kernels import check_toolchain
        check_toolchain()  # before the model loads
    model, tok = load_model(spec, dtype=args.dtype, trust_remote_code=args.trust_remote_code, device_map=device_map,
                            max_memory=max_memory, offload_folder=getattr(args, "offload_folder", None),
                            kernels=kernels, lm_head=lm_head, activations=activations)
    if args.device and to_device and not device_map:
        model.to(args.device)
    return model, tok


def _max_memory(text):
    """'cpu=4GiB,0=70GiB' -> {'cpu': '4GiB', 0: '70GiB'} (accelerate's max_memory)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        where, _, size = part.partition("=")
        where, size = where.strip(), size.strip()
        if not where or not size:
            raise HybridPruneError(f"--max-memory {text!r}: write it as cpu=4GiB,0=70GiB")
        out[int(where) if where.isdigit() else where] = size
    return out


def _add_offload_args(p):
    g = p.add_argument_group("offloading (models larger than memory)")
    g.add_argument("--device-map", default=None, help="auto | balanced | sequential: accelerate places the layers "
                   "on the GPUs, the CPU and, past --max-memory, the disk (--offload-folder)")
    g.add_argument("--max-memory", default=None, help="with --device-map: memory per device, e.g. cpu=4GiB,0=70GiB")
    g.add_argument("--offload-folder", default=None, help="with --device-map: where layers past --max-memory go")


def _check_context(args, spec, **seqlens):
    """Refuse a window longer than the model's context, reading only its config (before any weight is loaded);
    returns that config."""
    from hybridprune.io.models import context_length, model_config
    model_cfg = model_config(spec, trust_remote_code=args.trust_remote_code)
    ctx = context_length(model_cfg)
    for flag, value in seqlens.items():
        if ctx and value is not None and value > ctx:
            raise HybridPruneError(f"--{flag.replace('_', '-')} {value} exceeds the model's context of {ctx} tokens; "
                                   f"use --{flag.replace('_', '-')} {min(2048, ctx)} or less")
    return model_cfg


def _check_calibration_memory(args, config, model_cfg):
    """The engine keeps every calibration sample's hidden states at the current layer's input and output
    (nsamples x seqlen x hidden, twice); refuse, before loading, what cannot fit in the memory available."""
    from hybridprune.io.models import available_memory
    from hybridprune.pruning.scoring import needs_calibration
    hidden = getattr(model_cfg, "hidden_size", None)
    free = available_memory()
    if not needs_calibration(config.method) or not isinstance(hidden, int) or not free:
        return
    elem = 2 if args.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    need = 2 * config.nsamples * config.seqlen * hidden * elem
    if need > 0.8 * free:
        raise HybridPruneError(f"--nsamples {config.nsamples} x --seqlen {config.seqlen} holds about "
                               f"{need / 2**30:.1f} GiB of layer activations (hidden size {hidden}), more than the "
                               f"{free / 2**30:.1f} GiB this machine has available; use fewer --nsamples or a shorter "
                               f"--seqlen (the papers use 128 x 2048)")


def _check_device(args):
    from hybridprune.io.models import default_device
    if args.device:
        default_device(args.device)


def _out_file(path):
    """Make the parent folder of an output file before the run, so results are never lost at the end."""
    if path:
        from hybridprune.core.files import check_out_path
        check_out_path(path)
        parent = Path(path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HybridPruneError(f"cannot create the folder {parent} for {path}: {e.strerror}") from None
        if Path(path).is_dir():
            raise HybridPruneError(f"{path} is a folder; --out takes a file name such as results.json")


def cmd_prune(args):
    from hybridprune import api
    from hybridprune.evaluation.ppl import perplexity
    from hybridprune.io.data import data_dir

    config = _config(args)
    _check_device(args)
    if args.values != "float" and args.save != "packed":
        raise HybridPruneError(f"--values {args.values} stores packed weights; add --save packed")
    if args.save == "packed":
        from hybridprune.sparse.packing import check_packable
        check_packable(config.build_pattern().describe())
    if args.compare_ppl:
        from hybridprune.evaluation.ppl import check_ppl_args
        check_ppl_args(args.ppl_seqlen, args.max_windows)
    _check_out(args.out, args.overwrite)
    data_dir(args.data_dir)
    model_cfg = _check_context(args, args.model, seqlen=args.seqlen,
                               ppl_seqlen=args.ppl_seqlen if args.compare_ppl else None)
    _check_calibration_memory(args, config, model_cfg)
    if _streams(args):
        from hybridprune.pruning.streaming import prune_streamed
        with _saving(args) as (target, overwrite):
            result, _ = prune_streamed(args.model, config, target, overwrite=overwrite, dtype=args.dtype,
                                         trust_remote_code=args.trust_remote_code)
        print(f"pruned in {result.seconds:.1f}s ({config.method}, {result.pattern['pattern']}, layer-streamed)",
              flush=True)
        _say_pruned(None, Path(args.out))
        return
    model, tok = _load(args, args.model, to_device=False)
    pm, extra = api.PrunedModel(model, tok, source=args.model), {}
    if args.compare_ppl:
        dense = perplexity(model, tok, seqlen=args.ppl_seqlen, max_windows=args.max_windows,
                           data_dir_path=args.data_dir, bos=args.bos)
        print(f"dense  perplexity {dense['ppl']:.2f}  ({dense['windows']} windows x {dense['seqlen']})", flush=True)
        extra["dense_ppl"] = dense
    pm = api.prune(pm, config)  # logs the time it took
    if args.compare_ppl:
        pruned = perplexity(model, tok, seqlen=args.ppl_seqlen, max_windows=args.max_windows,
                            data_dir_path=args.data_dir, bos=args.bos)
        print(f"pruned perplexity {pruned['ppl']:.2f}  ({pruned['windows']} windows x {pruned['seqlen']})")
        extra["pruned_ppl"] = pruned
    pm.record.update(extra)
    api.save(pm, args.out, packed=args.save == "packed", overwrite=args.overwrite, values=args.values)
    _say_pruned(pm.record, Path(args.out))


@contextlib.contextmanager
def _saving(args):
    """(folder, overwrite) for `prune` to write: --out itself (--save dense), or a temporary sibling that is packed
    into --out and removed (--save packed)."""
    if args.save == "dense":
        yield args.out, args.overwrite
        return
    from hybridprune.sparse.packing import packed_output
    with packed_output(args.out, overwrite=args.overwrite, values=args.values) as tmp:
        yield tmp, True


def _streams(args) -> bool:
    """Whether `prune` reads the model one layer at a time (--stream; see its help)."""
    from hybridprune.pruning.streaming import streamable
    if args.stream not in ("auto", "on", "off"):
        raise HybridPruneError(f"unknown --stream {args.stream!r}; use auto, on or off")
    if args.stream == "off":
        return False
    if args.compare_ppl:
        if args.stream == "on":
            raise HybridPruneError("--compare-ppl needs the whole model in memory; drop it, or use --stream off")
        return False
    if streamable(args.model):
        return True
    if args.stream == "on":
        raise HybridPruneError(f"--stream on needs a local folder of safetensors weights; {args.model} is not one "
                               "(download it first, or use --stream off)")
    return False


def _say_pruned(record: dict | None, out: Path):
    """The saved sparsity against the pattern's; record: what was pruned (None: the saved folder's own)."""
    from hybridprune.io.folder import read_record
    saved = read_record(out)
    record = record or saved
    print(f"sparsity {saved['sparsity']:.4f} (expected {record['prune']['pattern_detail']['sparsity']:.4f}); "
          f"saved to {out}")
    if record.get("uncalibrated"):
        print(f"note: {len(record['uncalibrated'])} matrices received no calibration tokens and were pruned by "
              f"magnitude (listed under 'uncalibrated' in hybridprune.json)")


def cmd_ppl(args):
    from hybridprune.core.files import write_text_atomic
    from hybridprune.io.data import data_dir
    from hybridprune.evaluation.ppl import perplexity
    from hybridprune.io.models import read_record

    from hybridprune.evaluation.ppl import check_ppl_args
    check_ppl_args(args.seqlen, args.max_windows, args.batch_size)
    data_dir(args.data_dir)
    _check_device(args)
    _check_context(args, args.model, seqlen=args.seqlen)  # a missing model is refused before --out's folder is made
    _out_file(args.out)
    record = read_record(args.model) if Path(args.model).is_dir() else None  # a corrupt record fails now, not after
    model, tok = _load(args, args.model)
    res = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                     data_dir_path=args.data_dir, bos=args.bos)
    res = {"model": args.model, "task": "wikitext2", "split": "test", **res}
    if record is not None:
        res["hybridprune"] = record
    print(f"wikitext2 test perplexity {res['ppl']:.3f} over {res['windows']} windows of {res['seqlen']} tokens")
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=2, default=str))


def _eval_one(args, spec):
    from hybridprune.io.models import read_record
    from hybridprune.evaluation.tasks import evaluate_model, parse_tasks
    tasks = parse_tasks(args.tasks)
    record = read_record(spec) if Path(spec).is_dir() else None  # read before the work: a corrupt one fails now
    model, tok = _load(args, spec)
    results = evaluate_model(model, tok, tasks, limit=args.limit, sample=args.sample, sample_seed=args.sample_seed,
                             seed=args.seed, batch_size=args.batch_size,
                             num_fewshot=args.num_fewshot, gsm8k_mode=args.gsm8k_mode,
                             chat_template=args.chat_template, data_dir_path=args.data_dir,
                             ppl_seqlen=args.ppl_seqlen, ppl_windows=args.ppl_windows,
                             samples_path=getattr(args, "samples_file", None), fewshot_seed=args.fewshot_seed,
                             bos=args.bos, generate_batch_size=args.generate_batch_size)
    return {"model": spec, "hybridprune": record, "limit": args.limit, "sample": args.sample,
            "sample_seed": args.sample_seed if args.sample else None, "seed": args.seed,
            "fewshot_seed": args.fewshot_seed, "tasks": results}


def _check_eval_args(args):
    from hybridprune.io.data import check_bos, data_dir
    from hybridprune.evaluation.tasks import check_eval_args, parse_tasks, require_eval
    require_eval(parse_tasks(args.tasks))
    if hasattr(args, "models") and len(args.models) < 2:
        raise HybridPruneError("compare needs two or more models or results files; to see one model's numbers "
                               "use `hybridprune eval`")
    check_eval_args(limit=args.limit, sample=args.sample, batch_size=args.batch_size,
                    generate_batch_size=args.generate_batch_size, windows=args.ppl_windows)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise HybridPruneError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    check_bos(args.bos)
    if args.gsm8k_mode not in ("fewshot", "instruct"):
        raise HybridPruneError(f"unknown --gsm8k-mode {args.gsm8k_mode!r}; use fewshot or instruct")
    data_dir(args.data_dir)
    _check_device(args)
    for spec in args.models if hasattr(args, "models") else [args.model]:
        if not spec.endswith(".json"):
            _check_context(args, spec, ppl_seqlen=args.ppl_seqlen if "wikitext2" in args.tasks else None)


def cmd_eval(args):
    from hybridprune.core.files import write_text_atomic
    from hybridprune.evaluation.tasks import metric_rows
    _check_eval_args(args)
    _out_file(args.out)
    if args.log_samples:
        args.samples_file = str(Path(args.out or "results.json").with_suffix(".samples.jsonl"))
    res = _eval_one(args, args.model)
    for task, metric, value in metric_rows(res["tasks"]):
        print(f"{task:<10} {metric:<32} {value:10.4f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=2, default=str))


def cmd_compare(args):
    from hybridprune.core.files import check_out_path
    from hybridprune.core.plots import plot_compare
    from hybridprune.evaluation.tasks import metric_rows
    _check_eval_args(args)
    check_out_path(args.out or "compare")
    runs = [_saved_or_eval(args, spec) for spec in args.models]
    _check_same_settings(runs, args.models)
    table = [dict(((t, m), v) for t, m, v in metric_rows(r["tasks"])) for r in runs]
    keys = list(table[0])
    head = "| task | metric | " + " | ".join(runs_name(r["model"]) for r in runs) + " |"
    lines = [head, "|" + "---|" * (2 + len(runs))]
    for key in keys:
        cells = []
        for i, row in enumerate(table):
            v = row.get(key)
            cell = "n/a" if v is None else f"{v:.4g}"
            if i and v is not None and key in table[0]:
                cell += f" ({v - table[0][key]:+.3g})"
            cells.append(cell)
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    from hybridprune.core.files import atomic_dir
    out = Path(args.out or "compare")
    with atomic_dir(out, overwrite=True) as tmp:  # the three files appear together or not at all
        (tmp / "compare.md").write_text(text + "\n")
        (tmp / "compare.json").write_text(json.dumps(runs, indent=2, default=str))
        plot_compare([runs_name(r["model"]) for r in runs], keys, table, tmp / "compare.png")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


SETTINGS = ("n", "num_fewshot", "fewshot_seed", "mode", "split", "bos", "prompt", "doc_ids")


def _check_same_settings(runs, specs):
    """Rows of one table must come from the same examples and prompts: refuse runs whose task settings differ."""
    first = runs[0]
    for run, spec in zip(runs[1:], specs[1:]):
        if run.get("limit") != first.get("limit"):
            raise HybridPruneError(f"{spec} was evaluated with --limit {run.get('limit')}, {specs[0]} with "
                                   f"{first.get('limit')}; re-run one of them with the same --limit")
        for task in set(first["tasks"]) & set(run["tasks"]):
            for key in SETTINGS:
                a, b = first["tasks"][task].get(key), run["tasks"][task].get(key)
                if a != b:
                    raise HybridPruneError(f"{task} {key} differs: {a!r} in {specs[0]} vs {b!r} in {spec}; "
                                           "evaluate both with the same settings")


def _saved_or_eval(args, spec):
    """A `hybridprune eval --out` JSON file is tabulated as saved (runs made apart, e.g. in parallel); any other
    spec is a model to evaluate now."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        try:
            run = json.loads(path.read_text())
        except ValueError:
            run = None
        if not isinstance(run, dict) or not isinstance(run.get("tasks"), dict):
            raise HybridPruneError(f"{spec} is not a results file written by `hybridprune eval --out`")
        if args.limit is not None and run.get("limit") != args.limit:
            raise HybridPruneError(f"{spec} was evaluated with --limit {run.get('limit')}, not {args.limit}; "
                                   f"pass the same --limit or re-run the evaluation")
        return run
    return _eval_one(args, spec)


def runs_name(spec: str) -> str:
    return Path(spec).name or spec


def _add_out_args(p, resume_help):
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help=resume_help)


def _add_eval_args(p):
    p.add_argument("--tasks", default="wikitext2,squad,gsm8k,boolq", help="comma-separated: wikitext2,squad,gsm8k,boolq")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (deterministic)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="instead of --limit: a seeded subset of N examples of each task spread over its articles / "
                        "passages (SQuAD: at most 2 questions of a paragraph, articles in turn)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of --sample (default 0; the same examples for "
                                                                 "every model)")
    p.add_argument("--seed", type=int, default=0, help="seed of random sampling in lm-eval (default 0)")
    p.add_argument("--fewshot-seed", type=int, default=1234,
                   help="seed of the few-shot exemplar sampler (default 1234, lm-eval's: the stock tasks' prompts)")
    p.add_argument("--batch-size", type=int, default=8, help="log-likelihood batch (default 8)")
    p.add_argument("--generate-batch-size", type=int, default=None,
                   help="greedy-generation batch (default: --batch-size); decoding is bound by reading the weights, "
                        "so wider is faster per token (64 on a CPU) as long as the KV cache fits")
    p.add_argument("--num-fewshot", type=int, default=None, help="override each task's shot count (exemplars come "
                   "from the training split only; refused where there is none)")
    p.add_argument("--gsm8k-mode", default="fewshot", help="fewshot (lm-eval's 5-shot) | instruct (zero-shot)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="wikitext2 window length")
    p.add_argument("--ppl-windows", type=int, default=None, help="wikitext2: evaluate only the first N windows")


def _add_values_arg(p) -> None:
    p.add_argument("--values", default="float", choices=["float", "int8"], help="packed weights: the kept values "
                   "in the model's dtype (float, default) or as int8 with one scale per output row (about a quarter "
                   "of fp32's bytes; --kernels computes with them)")


def cmd_pack(args):
    from hybridprune.sparse.packing import is_packed, pack_folder, unpack_folder
    _check_out(args.out, args.overwrite)
    if not Path(args.model).is_dir():
        raise HybridPruneError(f"{args.model} is not a folder; pack takes a folder saved by `hybridprune prune`")
    if args.unpack:
        if args.values != "float":
            raise HybridPruneError(f"--values {args.values} applies to packing; --unpack writes the weights as they "
                                   "were packed (int8 ones dequantized): drop --values")
        if not is_packed(args.model):
            raise HybridPruneError(f"{args.model} is not packed (no packed.safetensors); nothing to unpack")
        unpack_folder(args.model, args.out, overwrite=args.overwrite)
        print(f"unpacked to {args.out}")
        return
    stats = pack_folder(args.model, args.out, overwrite=args.overwrite, values=args.values)
    print(f"saved to {args.out}: prunable matrices {stats['dense_bytes'] / 1e6:.1f} MB -> "
          f"{stats['packed_bytes'] / 1e6:.1f} MB ({stats['packed_bytes'] / stats['dense_bytes']:.3f} of dense)")


def cmd_inspect(args):
    from hybridprune.sparse.inspect import inspect_folder
    report = inspect_folder(args.model, plot_dir=args.plot, matrices=args.matrix)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["text"])
    if report["violations"]:
        raise HybridPruneError(f"{len(report['violations'])} rule violations in {args.model}: "
                               + "; ".join(report["violations"][:5]) + (" ..." if len(report["violations"]) > 5 else ""))


def cmd_progressive(args):
    from hybridprune.pruning.progressive import load_schedule, run_progressive
    config = _config(args)
    ft = _ft_config(args, args.finetune_between) if args.finetune_between else None
    _check_device(args)
    _check_out(args.out, args.overwrite)
    schedule = load_schedule(args.schedule)
    recover = None
    if not args.ft_merge:
        # The next round would prune the LoRA modules and save their keys into the base model.
        raise HybridPruneError("--no-merge cannot be used in progressive pruning: every round must prune merged "
                               "weights; drop --no-merge (the adapter is merged through the mask after each round)")
    if ft is not None:
        from hybridprune.finetuning.finetune import finetune
        work = Path(args.out).with_name(Path(args.out).name + ".checkpoints")

        def recover_round(model, tok, r):
            finetune(model, tok, ft, work / f"round{r + 1}")
        recover_round.settings = dataclasses.asdict(ft)  # compared by --resume
        recover = recover_round
    from hybridprune.io.data import data_dir
    data_dir(args.data_dir)
    _check_context(args, args.model, seqlen=args.seqlen)
    model, tok = _load(args, args.model, to_device=False)
    run_progressive(model, tok, config, schedule, args.out, source=args.model, overwrite=args.overwrite,
                    resume=args.resume, recover=recover)


def _ft_config(args, data):
    config = _config_from_args(FinetuneConfig, args, "ft_", names=args.ft_flags, data=data, seed=args.seed,
                               device=args.device, data_dir=args.data_dir, bos=args.bos)
    if config.dropout_rng == "hash":  # compiled from C++: refused now, not after the model loads
        from hybridprune.core.specs import toolchain_problem
        problem = toolchain_problem()
        if problem:
            raise HybridPruneError(f"--dropout-rng hash needs the C++ kernels: {problem}"
                                   .replace("or run without --kernels", "or use --dropout-rng torch"))
    return config


def cmd_finetune(args):
    from hybridprune.io.data import data_dir
    from hybridprune.finetuning.finetune import finetune_and_save, launch_state
    config = _ft_config(args, args.data)
    data_dir(args.data_dir)
    _check_device(args)
    _check_out(args.out, args.overwrite)
    res = finetune_and_save(args.model, config, args.out, overwrite=args.overwrite, resume=args.resume,
                            dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    rec = res["record"]
    if not launch_state().is_main:  # one of several processes (accelerate launch): the main one reports
        return
    print(f"fine-tuned {rec['examples']} examples for {config.steps} steps: loss {rec['first_loss']} -> "
          f"{rec['final_loss']:.4f}; {rec['zeros_preserved']:,} pruned weights still zero; saved to {args.out}")


def cmd_experiment(args):
    from hybridprune.experiments.experiment import run_experiment  # imports no torch: with stages in processes of their own, this one waits
    if args.data_dir is not None:  # every stage reads its data from there (checked with the recipe)
        os.environ["HYBRIDPRUNE_DATA"] = str(Path(args.data_dir).expanduser())
    run_experiment(args.recipe, args.out, quick=args.quick, only=args.only, device=args.device, dtype=args.dtype,
                   kernels=args.kernels, isolate=False if args.in_process else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybridprune", allow_abbrev=False, description=(
        "Prune Hugging Face causal LMs (magnitude, Wanda, SparseGPT; unstructured, N:M, three-tier hybrid) "
        "and measure what was lost. MODEL is 'default' (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub id."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model and save it", description="Prune a model layer by layer and save "
                       "it as a from_pretrained folder with hybridprune.json and sparsity.json.")
    p.add_argument("--model", default="default", help="default | folder | file.gguf | hub id")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--save", default="dense", choices=["dense", "packed"], help="dense: a from_pretrained folder, "
                   "pruned weights as zeros (default); packed: only what is kept (see `hybridprune pack`)")
    _add_values_arg(p)
    p.add_argument("--compare-ppl", action="store_true", help="measure WikiText-2 perplexity before and after")
    p.add_argument("--max-windows", type=int, default=None, help="with --compare-ppl: windows to evaluate")
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="with --compare-ppl: window length")
    p.add_argument("--stream", default="auto", help="auto | on | off. on: read one decoder layer at a time from the "
                   "safetensors shards, prune it, write it, free it (models larger than memory); auto (default): "
                   "on for a folder of safetensors (and the default model), off for a hub id or with --compare-ppl")
    names = _add_config_args(p, PruneConfig, "pruning", exclude=PRUNE_SHARED, groups=PRUNE_GROUPS)
    _add_model_args(p)
    p.set_defaults(func=cmd_prune, prune_flags=names)

    p = sub.add_parser("ppl", help="WikiText-2 test perplexity", description="WikiText-2 test perplexity in the "
                       "papers' convention: rows joined with blank lines, non-overlapping windows of --seqlen.")
    p.add_argument("model", help="default | folder | file.gguf | hub id")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", help="write the result as JSON here")
    _add_model_args(p)
    _add_offload_args(p)
    _add_kernel_args(p)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("eval", help="task metrics of one model", description="WikiText-2 perplexity and "
                       "SQuAD / GSM8K / BoolQ through lm-evaluation-harness on the in-memory model.")
    p.add_argument("model", help="default | folder | file.gguf | hub id")
    p.add_argument("--out", help="results JSON file")
    p.add_argument("--log-samples", action="store_true", help="also write prompts, outputs and scores as JSONL")
    _add_eval_args(p)
    _add_model_args(p)
    _add_offload_args(p)
    _add_kernel_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="task metrics of several models side by side",
                       description="Evaluate each model on the same examples; write a Markdown table (with the "
                                   "difference to the first model), the JSON results and a bar chart PNG.")
    p.add_argument("models", nargs="+", help="two or more model specs, or results files from `eval --out` "
                                             "(tabulated as saved)")
    p.add_argument("--out", help="output folder (default ./compare)")
    _add_eval_args(p)
    _add_model_args(p)
    _add_offload_args(p)
    _add_kernel_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("pack", help="store a pruned model packed (only what is kept)", description="Write a pruned "
                       "model folder in hybridprune's packed format: per pruned matrix a bitmask and values "
                       "(unstructured), values and 2-bit positions (N:M), or a tier map and per-tier blocks "
                       "(three-tier, block, block-topk), all in packed.safetensors; other tensors as they are. "
                       "Every command takes the packed folder; --unpack writes the dense folder back, bit for bit.")
    p.add_argument("model", help="a folder saved by `hybridprune prune` (or `finetune`); with --unpack a packed one")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--unpack", action="store_true", help="packed folder -> ordinary from_pretrained folder")
    _add_values_arg(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("inspect", help="sparsity report of a saved model", description="Per-layer and per-matrix "
                       "sparsity, N:M validity and tier statistics of a saved model folder.")
    p.add_argument("model", help="a saved model folder")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG pictures (tier maps, sparsity by layer) into DIR")
    p.add_argument("--matrix", action="append", default=None,
                   help="matrices to draw tier maps for (name patterns, default: a few of layer 0)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("progressive", help="progressive three-tier schedule",
                       description="Rounds of three-tier pruning from a YAML schedule; blocks only move down the "
                                   "tiers, each round re-scores the current model, tier maps are saved per round.")
    p.add_argument("--model", default="default")
    p.add_argument("--schedule", required=True, help="YAML file with `rounds: [[dense, nm, topk], ...]`")
    _add_out_args(p, "continue from the last finished round in <out>.partial")
    p.add_argument("--finetune-between", metavar="DATA", help="recovery fine-tuning on DATA after every round "
                   "(squad | gsm8k | boolq | wikitext2 | c4), with the --ft-* options")
    names = _add_config_args(p, PruneConfig, "pruning", exclude=PRUNE_SHARED, groups=PRUNE_GROUPS)
    ft_names = _add_config_args(p, FinetuneConfig, "fine-tuning between rounds", "ft_", exclude=(*FT_SHARED, "data", "seed"),
                                flags={"method": "--ft-method", "batch_size": "--ft-batch-size", "seqlen": "--ft-seqlen"})
    _add_model_args(p)
    p.set_defaults(func=cmd_progressive, pattern="three-tier", prune_flags=names, ft_flags=ft_names)

    p = sub.add_parser("finetune", help="sparsity-preserving fine-tuning",
                       description="LoRA (merged through the sparsity mask) or full fine-tuning with masked "
                                   "gradients; pruned weights stay exactly zero, checked before saving.")
    p.add_argument("model", help="a pruned model folder (or any model spec)")
    p.add_argument("--data", required=True, help="squad | gsm8k | boolq | wikitext2 | c4")
    _add_out_args(p, "continue from the last checkpoint in <out>.checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the data order")
    ft_names = _add_config_args(p, FinetuneConfig, "fine-tuning", "ft_", exclude=(*FT_SHARED, "data", "seed"))
    _add_model_args(p)
    p.set_defaults(func=cmd_finetune, ft_flags={**ft_names, "seed": "--seed", "data": "--data"})

    p = sub.add_parser("experiment", help="calibration data x fine-tuning data x tasks, one resumable command",
                       description="Run a recipe (YAML: model, prune setup, calibration sources, fine-tuning setups, "
                                   "runs, tasks, claims) as a graph of cached stages and write report.md, "
                                   "results.json, results.csv and plots/ into --out. Rerunning does only the work "
                                   "that is missing or whose settings changed.")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/calibration-study.yaml")
    p.add_argument("--out", required=True, help="run folder (stages are cached under <out>/stages)")
    p.add_argument("--quick", action="store_true", help="apply the recipe's quick: overrides (a smoke run)")
    p.add_argument("--only", choices=["prune", "finetune", "eval", "report"],
                   help="run only stages of this kind (report: tabulate what exists)")
    p.add_argument("--device", help="where models are computed (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16: load and compute in this dtype "
                   "(default: the recipe's dtype:, else as saved); part of every stage's key")
    p.add_argument("--data-dir", help="data directory in the layout of shared/data")
    p.add_argument("--kernels", action="store_true", help="evaluation stages compute pruned matrices with the "
                   "packed sparse kernels (as the recipe's eval: {kernels: true}; part of their stage keys)")
    p.add_argument("--in-process", action="store_true", help="run every stage in this process (default on Linux: "
                   "each stage, or a model's evaluations, in a process of its own, so that each starts on a fresh "
                   "heap and the run's peak memory is its largest stage's)")
    p.set_defaults(func=cmd_experiment)
    for sp in sub.choices.values():  # no prefix matching: --block would otherwise pass for --block-size
        sp.allow_abbrev = False
    return ap


class _PrintHandler(logging.Handler):
    """The library's log lines as the command's output: INFO on stdout, warnings on stderr, message only."""

    def emit(self, record):
        warn = record.levelno >= logging.WARNING
        print(("warning: " if warn else "") + record.getMessage(), file=sys.stderr if warn else sys.stdout,
              flush=True)


def _log_to_terminal() -> None:
    log = logging.getLogger("hybridprune")
    if not any(isinstance(h, _PrintHandler) for h in log.handlers):
        log.addHandler(_PrintHandler())
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_terminal()
    from hybridprune.core.heap import cap_heap_growth
    cap_heap_growth()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt_on_sigterm) if main_thread else None  # as Ctrl-C: temporaries go
    try:
        args.func(args)
    except HybridPruneError as e:
        print(f"hybridprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybridprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`hybridprune inspect out | head`): stop quietly
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
