"""Options are defined once, in core.config: every field reaches the CLI and a recipe with the same default, and the
configs import no torch and probe no device."""
import dataclasses
import subprocess
import sys

import pytest

from hybridprune.cli import _config_from_args, build_parser
from hybridprune.core.config import FinetuneConfig, PruneConfig, recipe_keys
from hybridprune.core.errors import HybridPruneError
from hybridprune.experiments.recipe import TOP_KEYS

# a command line per parser that builds each config; the required arguments only
COMMANDS = {
    PruneConfig: [(["prune", "--out", "o"], "", "prune_flags"), (["progressive", "--schedule", "s", "--out", "o"], "",
                                                                 "prune_flags")],
    FinetuneConfig: [(["finetune", "m", "--data", "squad", "--out", "o"], "ft_", "ft_flags"),
                     (["progressive", "--schedule", "s", "--out", "o"], "ft_", "ft_flags")],
}
NEEDS = {"channel_permutation": ["--pattern", "2:4"], "calib_pool": ["--calib-select", "diversity"]}  # flags a value needs beside it
SHARED = {"device", "data_dir", "bos", "seed", "data"}  # flags every command of a model shares, or its own


def _build(cls, argv, prefix, names_key, extra=()):
    args = build_parser().parse_args([*argv, *extra])
    given = {"data": "squad"} if cls is FinetuneConfig else {}
    if cls is PruneConfig and argv[0] == "progressive":
        given["pattern"] = "unstructured"  # progressive's own default is three-tier
    return _config_from_args(cls, args, prefix, names=getattr(args, names_key), device=args.device,
                             data_dir=args.data_dir, bos=args.bos, **({"seed": args.seed} | given))


@pytest.mark.parametrize("cls", [PruneConfig, FinetuneConfig])
def test_every_field_has_help_and_a_cli_flag_with_the_same_default(cls):
    for argv, prefix, names_key in COMMANDS[cls]:
        built = _build(cls, argv, prefix, names_key)
        flags = getattr(build_parser().parse_args(argv), names_key)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            assert f.name in flags or f.name in SHARED, f"{cls.__name__}.{f.name} has no flag in `{argv[0]}`"
            if f.name not in ("data", "pattern"):
                assert getattr(built, f.name) == getattr(cls(**({"data": "squad"} if cls is FinetuneConfig else {})),
                                                          f.name), f"{f.name}: CLI default differs"


@pytest.mark.parametrize("cls", [PruneConfig, FinetuneConfig])
def test_every_field_is_set_by_its_flag(cls):
    """Each flag reaches its field: a non-default value given on the command line arrives in the config."""
    argv, prefix, names_key = COMMANDS[cls][0]
    flags = getattr(build_parser().parse_args(argv), names_key)
    values = {"sparsity": "0.6", "nsamples": "7", "seqlen": "33", "batch_size": "2", "percdamp": "0.02",
              "sparsegpt_block": "64", "tiers": "0.3,0.5,0.2", "block_size": "32", "tier_nm": "4:8", "topk": "9",
              "tier_metric": "magnitude", "scope": "matrix", "retention": "0.5", "block_score": "row", "refit": "0",
              "layer_sparsity": "owl", "owl_m": "6", "owl_lambda": "0.05", "dsnot_cycles": "3",
              "dsnot_threshold": "0.2", "channel_permutation": "reallocation", "method": "magnitude", "pattern": "block",
              "group": "matrix", "calib": "c4", "squad_format": "context", "skip": "down_proj,layers.0",
              "dsnot_skip": "none", "template": "alpaca", "steps": "3", "lr": "0.001", "grad_accum": "2",
              "lora_r": "4", "lora_alpha": "8", "lora_dropout": "0.1", "max_examples": "5", "logging_steps": "2",
              "save_steps": "9", "autocast": "fp32", "dropout_rng": "hash", "seed": "5", "calib_select": "diversity",
              "calib_pool": "512", "self_filter": "0.3", "self_prefix": "8", "self_batch": "4",
              "self_dtype": "float32"}
    if cls is FinetuneConfig:
        values.update(method="full", batch_size="3", seqlen="64")
    for field, flag in flags.items():
        if field == "data":
            continue  # a required flag of its own (--data / --finetune-between)
        f = next(x for x in dataclasses.fields(cls) if x.name == field)
        extra = [flag] if isinstance(f.default, bool) else [flag, values[field]]
        extra += NEEDS.get(field, [])
        built = _build(cls, argv, prefix, names_key, extra)
        assert getattr(built, field) != f.default, f"{flag} did not reach {cls.__name__}.{field}"


@pytest.mark.parametrize("cls", [PruneConfig, FinetuneConfig])
def test_every_field_is_reachable_from_a_recipe(cls):
    keys = set(recipe_keys(cls))
    for f in dataclasses.fields(cls):
        where = f.metadata.get("recipe")
        if f.name in keys:
            continue
        assert isinstance(where, str), f"{cls.__name__}.{f.name} is neither a recipe key nor says where it is set"
        assert where.rstrip(":").split()[0] in TOP_KEYS or "hybridprune experiment" in where, where


def test_recipe_keys_take_the_config_defaults(tmp_path):
    from hybridprune.experiments.recipe import load_recipe
    path = tmp_path / "r.yaml"
    path.write_text("model: default\nprune: {method: wanda}\ncalibration: {wiki: wikitext2}\n"
                    "finetune: {sq: {data: squad}}\nruns: [{name: a, calibration: wiki, finetune: sq}]\n"
                    "tasks: {wikitext2: {windows: 1}}\n")
    recipe = load_recipe(path)
    assert PruneConfig(**recipe.patterns[next(iter(recipe.patterns))]) == PruneConfig(method="wanda")
    assert FinetuneConfig(**recipe.finetune["sq"]) == FinetuneConfig(data="squad")
    path.write_text(path.read_text().replace("{data: squad}", "{data: squad, lora_rank: 4}"))
    with pytest.raises(HybridPruneError, match="unknown option 'lora_rank'"):
        load_recipe(path)


def test_python_errors_name_the_parameter_and_cli_errors_the_flag(tmp_path, capsys):
    from hybridprune.cli import main
    with pytest.raises(HybridPruneError, match=r"^need nsamples >= 1"):
        PruneConfig(nsamples=0)
    with pytest.raises(HybridPruneError, match=r"^lora_dropout must be"):
        FinetuneConfig(lora_dropout=1.5)
    assert main(["prune", "--nsamples", "0", "--out", str(tmp_path / "o")]) == 2
    assert "need --nsamples >= 1" in capsys.readouterr().err
    assert main(["progressive", "--schedule", "s", "--ft-batch-size", "0", "--finetune-between", "squad",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--ft-batch-size must be" in capsys.readouterr().err


def test_configs_import_no_torch_and_probe_no_device():
    code = ("import sys, hybridprune as hp\n"
            "c = hp.PruneConfig(device='cuda:3', pattern='three-tier'); f = hp.FinetuneConfig(device='cuda')\n"
            "from hybridprune.experiments import recipe\n"
            "assert c.device == 'cuda:3' and f.device == 'cuda'\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    with pytest.raises(HybridPruneError, match="unknown --device"):
        PruneConfig(device="gpu")
