"""Shared output helpers for the bench scripts: one line per result, optional JSON file."""
import json


def report(row: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def write_json(rows: list, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
