"""Every command the README and the getting-started page show runs, in order, with tiny budgets on a tiny model
(the documented model `default` becomes a tiny random Llama with the real tokenizer; sample counts, windows and
steps shrink; every flag stays as written). So the docs cannot show a command that fails."""
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from hybridprune.cli import main
from hybridprune.core.specs import toolchain_problem

# per command: flags set to tiny values (replacing the documented ones, or added)
TINY = {
    "prune": {"--nsamples": "2", "--seqlen": "32", "--max-windows": "1", "--ppl-seqlen": "64"},
    "ppl": {"--max-windows": "1", "--seqlen": "64"},
    "eval": {"--limit": "2", "--ppl-windows": "1", "--ppl-seqlen": "64", "--batch-size": "2"},
    "finetune": {"--steps": "1", "--max-examples": "4", "--batch-size": "2", "--seqlen": "512"},
    "pack": {}, "inspect": {}, "experiment": {},
}


def commands(text: str) -> list[str]:
    """The `hybridprune ...` lines of a text's code blocks, continuation lines joined, comments dropped."""
    out, fenced, block = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if fenced and line.strip() == "```":
                for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                    cmd = cmd.split("#", 1)[0].strip()
                    if cmd.startswith("hybridprune "):
                        out.append(cmd)
            fenced, block = not fenced, []
        elif fenced:
            block.append(line)
    return out


def tiny(argv: list[str], model: str, root: Path) -> list[str]:
    argv = [model if a == "default" else a for a in argv]
    command, want = argv[0], dict(TINY[argv[0]])
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in want:
            out += [a, want.pop(a)]
            i += 2
            continue
        if command == "experiment" and a.endswith(".yaml"):  # the shipped recipe, its model made tiny
            recipe = yaml.safe_load((ROOT / a).read_text())
            recipe["model"] = model
            a = str(root / Path(a).name)
            Path(a).write_text(yaml.safe_dump(recipe))
        out.append(a)
        i += 1
    if command == "prune" and "--model" not in out:  # the documented default model, made tiny
        out += ["--model", model]
    for flag, value in want.items():
        if not (flag in ("--max-windows", "--ppl-seqlen") and command == "prune" and "--compare-ppl" not in out):
            out += [flag, value]
    return out


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_every_documented_command_runs(page, tmp_path, tiny_llama_dir, data_dir, monkeypatch):
    lines = commands((ROOT / page).read_text())
    assert len(lines) >= 5, f"{page} shows fewer commands than expected: {lines}"
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in lines:
        argv = tiny(shlex.split(line)[1:], str(tiny_llama_dir), tmp_path)
        if "--kernels" in argv and toolchain_problem():
            continue  # no C++ toolchain here: the kernel tests say so
        assert main(argv) == 0, f"{page}: `{line}` failed (ran as {argv})"
        ran.append(argv[0])
    assert ran


def test_getting_started_python_runs(tmp_path, tiny_llama_dir, data_dir, monkeypatch):
    text = (ROOT / "docs/getting-started.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"default"', repr(str(tiny_llama_dir)))
    code = re.sub(r"nsamples=\d+", "nsamples=2", re.sub(r"seqlen=\d+", "seqlen=32", code))
    code = re.sub(r"ppl_windows=\d+", "ppl_windows=1, ppl_seqlen=64", code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "getting-started.md", "exec"), {})
    assert (tmp_path / "out").is_dir()
