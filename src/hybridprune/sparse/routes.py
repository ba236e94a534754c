"""Which path computes a packed matmul for a given number of rows of x: measured on this machine, not guessed.

A packed matrix (kernels.PackedLinear) can compute x @ W.T three ways:

    sparse kernel   reads the packed weights once for every 1-8 rows of x (1-4 on AVX2): the fastest when x has
                    few rows and the weights come from DRAM (decoding)
    packed GEMM     AVX-512 or AVX2: decodes 16 weight rows at a time into L2 and runs a register-tiled GEMM over x^T
    dense strips    decodes 512 weight rows at a time into one reused buffer and calls torch's matmul on it

Where one overtakes another depends on the CPU, its threads, the kernel path, the layout and the shape: the fixed
row counts of 0.2 were up to 25% slower than dense at 64-128 rows on an AVX2 EPYC and 6-16% slower from 256 rows
on Intel Xeons. So the first time a layout and shape gets two or more rows of x on a machine, `measure` times
every route at 2, 4, 8, ..., 512 rows (BUCKETS), and `choose` takes the fastest one measured at the largest
bucket at or below the row count. Once the sparse kernel is more than GIVE_UP times slower than the best route at
one bucket it is not timed at larger ones (it only falls further behind as rows grow) and counts as slower there.

The measurements are kept in routes.json beside the compiled kernels (a changed kernel source measures afresh),
one entry per CPU, thread count, kernel path, layout, dtype and shape, so a machine measures each once. One row of
x always takes the sparse kernel: that is what it is for, and a measurement in cache could not show it its DRAM
advantage at one row.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from hybridprune.core.files import write_text_atomic
from hybridprune.core.specs import cpu_flags

logger = logging.getLogger(__name__)

SPARSE, GEMM, STRIPS = "sparse kernel", "packed GEMM", "dense strips"
BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
GIVE_UP = 2.0   # the sparse kernel this many times slower than the best at one bucket is not timed at larger ones
REPS = 3        # timed calls per route and bucket (the median), after one warm-up


def machine() -> str:
    """What the measurements depend on besides the matrix: the CPU's name and flags, and torch's threads."""
    return f"{_cpu()}, {torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=1)
def _cpu() -> str:
    """The CPU's name and a hash of its flags, read once (a prefill asks on every matmul)."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} (flags {hashlib.sha256(' '.join(sorted(cpu_flags())).encode()).hexdigest()[:8]})"


def entry_key(kind: str, shape: Sequence[int], dtype: torch.dtype, implementation: int) -> str:
    return f"{machine()} | path {implementation} | {kind} {shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')}"


def measure(run: Callable[[str, torch.Tensor], object], routes: Sequence[str], in_features: int,
            reps: int = REPS) -> dict:
    """Time run(route, x) for each route at each bucket's rows of x. Returns {"buckets", "seconds": {route: [s or
    None per bucket]}, "choice": [the fastest route per bucket]}."""
    live = list(routes)
    seconds: dict[str, list] = {r: [] for r in routes}
    choice = []
    gen = torch.Generator().manual_seed(0)
    for rows in BUCKETS:
        x = torch.randn(rows, in_features, generator=gen)
        for route in routes:
            if route not in live:
                seconds[route].append(None)
                continue
            run(route, x)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                run(route, x)
                times.append(time.perf_counter() - start)
            seconds[route].append(statistics.median(times))
        timed = {r: seconds[r][-1] for r in live}
        best = min(timed, key=timed.get)
        choice.append(best)
        live = [r for r in live if r != SPARSE or timed[r] <= GIVE_UP * timed[best]]
    return {"buckets": list(BUCKETS), "seconds": seconds, "choice": choice}


def choose(entry: dict, rows: int) -> str:
    """The route for `rows` rows of x: the sparse kernel for one row, else the fastest measured at the largest
    bucket at or below `rows`."""
    if rows < entry["buckets"][0]:
        return SPARSE
    index = max(i for i, b in enumerate(entry["buckets"]) if b <= rows)
    return entry["choice"][index]


class RouteTable:
    """The measurements of one compiled kernel build, in `path` (JSON, read once, rewritten whole on each new entry:
    entries written meanwhile by another process are kept)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries: dict | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        entries = {**self._read(), **(self._entries or {}), key: entry}
        self._entries = entries
        try:
            write_text_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True))
        except Exception as e:  # a read-only or full cache: measure again next time, compute now
            logger.warning(f"could not keep the measured routes in {self.path} ({e}); they hold for this process")
