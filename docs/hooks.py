"""MkDocs hooks: pages generated from the code when the site is built, so they cannot drift from it.

    <!-- generated: cli -->           every command's --help, from hybridprune.cli.build_parser()
    <!-- generated: recipe-keys -->   the recipe's sections and the config fields it takes
    <!-- generated: changelog -->     CHANGELOG.md
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> str:
    from hybridprune.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = ["## hybridprune\n", "```", parser.format_help().rstrip(), "```\n"]
    for name, p in sub.choices.items():
        parts += [f"## hybridprune {name}\n", "```", p.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


def _recipe_keys() -> str:
    from hybridprune.core.config import FinetuneConfig, PruneConfig, recipe_keys
    from hybridprune.experiments import recipe
    out = ["## Sections\n", "| key | what it holds |", "|---|---|"]
    rows: list[list[str]] = []
    for line in recipe.__doc__.split("\n\n")[1].splitlines():  # "    key[, key]   text" and continuation lines
        m = re.match(r"^    (\S.*?)\s{2,}(.*)$", line)
        if m:
            rows.append([m.group(1), m.group(2)])
        elif rows:
            rows[-1][1] += " " + line.strip()
    for keys, text in rows:
        out.append(f"| {', '.join(f'`{k.strip()}`' for k in keys.split(','))} | {text} |")
    for title, cls in (("prune: (and each pattern or method entry)", PruneConfig),
                       ("finetune: NAME: (each fine-tuning setup)", FinetuneConfig)):
        keys = set(recipe_keys(cls))
        out += ["", f"## {title}\n", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            where = "" if f.name in keys else f" (not a key here: set by {f.metadata.get('recipe')})"
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            out.append(f"| `{f.name}` | `{default}` | {f.metadata.get('help', '')}{where} |")
    out += ["", "## tasks: TASK:\n", "| task | keys |", "|---|---|"]
    out += [f"| `{task}` | {', '.join(f'`{k}`' for k in sorted(keys))} |" for task, keys in recipe.TASK_KEYS.items()]
    out += ["", f"`eval:` takes {', '.join(f'`{k}`' for k in recipe.EVAL_KEYS)}. A claim reads "
            "`A > B on task.metric` (also `>=`, `<`, `<=`), with metrics:", ""]
    out += [f"- `{task}`: {', '.join(f'`{m}`' for m in sorted(ms))}" for task, ms in recipe.METRICS.items()]
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- generated: cli -->" in markdown:
        markdown = markdown.replace("<!-- generated: cli -->", _cli())
    if "<!-- generated: recipe-keys -->" in markdown:
        markdown = markdown.replace("<!-- generated: recipe-keys -->", _recipe_keys())
    if "<!-- generated: changelog -->" in markdown:
        text = (ROOT / "CHANGELOG.md").read_text().split("\n", 1)[1]  # the page has its own title
        markdown = markdown.replace("<!-- generated: changelog -->", text.replace("](docs/", "]("))
    return markdown
