"""Peak memory of a command and every process it starts, sampled from /proc (Linux).

    python bench/tree_memory.py [--every 0.2] [--json out.json] -- hybridprune experiment recipe.yaml --out runs/x

`/usr/bin/time` reports one process's peak. A command whose work runs in child processes (the experiment: a child
of multiprocessing's fork server per stage) needs the sum over its tree at each moment. Printed, as maxima over the
samples:
  tree Pss   the tree's proportional set size: shared pages (libraries) split among the processes that map them,
             so the sum is what the tree holds (the figure to hold against a memory budget)
  tree Rss   the plain sum of resident sizes (counts shared pages once per process: an upper bound)
  per process: its largest Rss and Private (Private_Clean + Private_Dirty), with its command line
Sampling can miss a peak shorter than the interval; each process's own peak (ru_maxrss, which the experiment logs)
is exact.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _rollup(pid: int) -> dict[str, int] | None:
    """KiB fields of /proc/PID/smaps_rollup, or None if the process has gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    fields = {}
    for line in lines:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--json", help="write the maxima here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    proc = subprocess.Popen(command)
    best = {"pss_kib": 0, "rss_kib": 0, "processes_at_pss_peak": 0}
    per: dict[int, dict] = {}
    t0 = time.time()
    while proc.poll() is None:
        pss = rss = 0
        pids = _tree(proc.pid)
        for pid in pids:
            r = _rollup(pid)
            if not r:
                continue
            pss, rss = pss + r.get("Pss", 0), rss + r.get("Rss", 0)
            private = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
            p = per.setdefault(pid, {"rss_kib": 0, "private_kib": 0, "name": _name(pid)})
            p["rss_kib"], p["private_kib"] = max(p["rss_kib"], r.get("Rss", 0)), max(p["private_kib"], private)
        if pss > best["pss_kib"]:
            best.update(pss_kib=pss, processes_at_pss_peak=len(pids), pss_peak_at_s=round(time.time() - t0, 1))
        best["rss_kib"] = max(best["rss_kib"], rss)
        time.sleep(args.every)
    best["seconds"] = round(time.time() - t0, 1)
    best["returncode"] = proc.returncode
    best["processes"] = sorted(per.values(), key=lambda p: -p["rss_kib"])
    print(f"tree peak: Pss {best['pss_kib'] / 1024:,.0f} MiB = {best['pss_kib'] * 1024 / 1e9:.3f}e9 B "
          f"({best['processes_at_pss_peak']} processes, at {best.get('pss_peak_at_s', 0)} s); "
          f"Rss sum {best['rss_kib'] / 1024:,.0f} MiB = {best['rss_kib'] * 1024 / 1e9:.3f}e9 B; "
          f"{best['seconds']} s, exit {proc.returncode}", file=sys.stderr)
    for p in best["processes"][:8]:
        print(f"  {p['rss_kib'] / 1024:8,.0f} MiB rss {p['private_kib'] / 1024:8,.0f} MiB private  {p['name']}",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(best, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
