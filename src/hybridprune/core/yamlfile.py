"""YAML files hybridprune reads (recipes, progressive schedules): safe loading that refuses a key given twice in
one mapping, which plain YAML lets the last one win silently, and remembers each key's line for error messages."""
from __future__ import annotations

from pathlib import Path

import yaml

from hybridprune.core.errors import HybridPruneError


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"key {key!r} appears twice")
        self.key, self.first, self.second = key, first, second


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that raises DuplicateKey for a mapping holding a key twice."""

    def construct_mapping(self, node, deep=False):
        check_unique(self, node)
        return super().construct_mapping(node, deep=deep)


def check_unique(loader, node) -> None:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, where a repeat is the point
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKey(key, seen[key], line)
        seen[key] = line


def load(path: str | Path, what: str, loader=StrictLoader):
    """Parse a YAML file; every problem is one HybridPruneError naming the file (and the lines)."""
    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"{what} {path} not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except DuplicateKey as e:
        raise HybridPruneError(f"{path} line {e.second}: key {e.key!r} is given twice (lines {e.first} and "
                               f"{e.second}); keep one") from None
    except UnicodeDecodeError as e:
        raise HybridPruneError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise HybridPruneError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
