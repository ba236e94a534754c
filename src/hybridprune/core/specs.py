"""What each option may hold, checked without torch: pattern specs, calibration sources, methods, BOS policies,
dtype and device names, OWL's and DSnoT's settings.

The configs (core.config) validate through these at construction, so a recipe or a command line is checked in
the calling process, before torch or a model is loaded. The mask-making classes subclass the pattern specs in
pruning.patterns; every rule about what a valid option is lives here once.
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hybridprune.core.errors import HybridPruneError

METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
CHANNEL_PERMUTATIONS = ("none", "reallocation", "lsa")
CALIB_SOURCES = ("wikitext2", "c4", "squad", "gsm8k", "boolq")  # text read from files (io.data)
SELF = "self"        # text the model generates from a bare start token (Williams et al., NAACL 2025)
SELF_PREFIX = "self:"  # "self:SOURCE": the model continues prefixes of SOURCE (Ji et al., ICLR 2025)
CALIB_SELECT = ("random", "diversity")
SELECT_POOL = 4      # --calib-select diversity: the pool is this many times nsamples windows (unless given)
# Self-generated calibration text. Williams et al.: start from the BOS token alone, sample from the whole
# vocabulary, the temperature moving linearly from START to END over the first STEPS tokens, then END.
SELF_TEMPERATURE = (1.5, 1.0, 32)
# Ji et al.: continue prefixes drawn from the source's fitting split, sampled at temperature 1, then drop the
# generations whose perplexity is in the top share.
SELF_FILTER = 0.2
# self, self:SOURCE: the dtype the generating model's linear layers multiply in (auto: bfloat16 where the hardware
# multiplies it natively, else float32; see pruning/calibration.py)
SELF_DTYPES = ("auto", "float32", "bfloat16")
SELF_PREFIX_TOKENS = 16
BOS_POLICIES = ("auto", "always", "papers")
SQUAD_FORMATS = {
    "context": "{context}",
    "context_question": "{context} {question}",
    "labeled": "Context: {context}\nQuestion: {question}",
}
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "auto")
OWL_M = 5.0          # OWL (Yin et al. 2024): an outlier scores above M x its layer's mean
OWL_LAMBDA = 0.08    # OWL: the largest change of a layer's sparsity
DSNOT_CYCLES = 50    # DSnoT's reference code (zyxxmu/DSnoT): max_cycle_time
DSNOT_THRESHOLD = 0.1  # update_threshold
DSNOT_SKIP = ("mlp",)  # skip_layer


def needs_calibration(method: str) -> bool:
    return method in ("wanda", "ria", "sparsegpt")


def check_bos(policy: str) -> None:
    if policy not in BOS_POLICIES:
        raise HybridPruneError(f"unknown --bos {policy!r}; use one of: {', '.join(BOS_POLICIES)}")


def check_dtype(dtype) -> None:
    if dtype is not None and not isinstance(dtype, str):
        return  # a torch.dtype, checked by whoever holds torch
    if dtype is not None and dtype not in DTYPES:
        raise HybridPruneError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def check_device_name(device: str | None) -> None:
    """The device's spelling; whether a CUDA device exists is asked when it is used (pruning.engine.default_device)."""
    if device and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise HybridPruneError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")


def check_calib_source(name: str) -> None:
    """A single calibration source: a file source, self, or self:SOURCE."""
    if name in CALIB_SOURCES or name == SELF:
        return
    if name.startswith(SELF_PREFIX):
        if name[len(SELF_PREFIX):] in CALIB_SOURCES:
            return
        raise HybridPruneError(f"unknown source in {name!r}; self:SOURCE continues text of one of: "
                               f"{', '.join(CALIB_SOURCES)} (e.g. self:wikitext2)")
    raise HybridPruneError(f"unknown calibration source {name!r}; use one of: {', '.join(CALIB_SOURCES)}, self, "
                           "self:SOURCE or mixed:a=0.5,b=0.5")


def is_generated(name: str) -> bool:
    """Whether a single source is text the model writes itself (self, self:SOURCE)."""
    return name == SELF or name.startswith(SELF_PREFIX)


def parse_calib(spec: str) -> list[tuple[str, float]]:
    """'wikitext2' -> [(wikitext2, 1.0)]; 'mixed:wikitext2=0.5,self=0.5' -> both with their weights."""
    if not spec.startswith("mixed:"):
        check_calib_source(spec)
        return [(spec, 1.0)]
    parts = []
    for item in spec[len("mixed:"):].split(","):
        name, _, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            raise HybridPruneError(f"bad mixture item {item!r}; write mixed:wikitext2=0.5,squad=0.5") from None
        if not math.isfinite(weight) or weight < 0:
            raise HybridPruneError(f"bad mixture item {item!r}; weights are numbers >= 0")
        check_calib_source(name)
        parts.append((name, weight))
    if abs(sum(w for _, w in parts) - 1) > 1e-6:
        raise HybridPruneError(f"mixture weights in {spec!r} add up to {sum(w for _, w in parts):g}, not 1")
    return parts


def generates(spec: str) -> bool:
    """Whether a calibration spec (single or mixed) has a part the model generates."""
    return any(is_generated(name) for name, _ in parse_calib(spec))


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory in use, or None for the hub."""
    d = explicit or os.environ.get("HYBRIDPRUNE_DATA")
    if not d:
        return None
    d = Path(d).expanduser()
    if not d.is_dir():
        raise HybridPruneError(f"data directory {d} does not exist; fix --data-dir / HYBRIDPRUNE_DATA")
    return d


def check_model_spec(spec: str) -> str:
    """What kind of model spec this is (default | gguf | folder | hub), refusing what cannot be one; reads no
    weights and converts nothing (io.models.resolve_model does, on the same rules)."""
    if spec == "default":
        return "default"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise HybridPruneError(f"model file not found: {spec}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HybridPruneError(f"{spec} is a folder without config.json; pass a save_pretrained folder")
        return "folder"
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise HybridPruneError(f"model not found: {spec} (give a folder, a .gguf file, a hub id or 'default')")
    return "hub"


# ----------------------------------------------------------------------------- the sparse kernels

# what the int8-valued kernels multiply (--activations): fp32 x, x rounded to int8 per row, or x and its rounding
# error each rounded to int8 (two int8 terms, about 16 bits of x)
ACTIVATIONS = ("float", "int8", "int8x2")
KERNEL_PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3,  # HYBRIDPRUNE_KERNELS
                "triton": 0}  # the GPU kernels for CPU inputs too (under TRITON_INTERPRET=1: tests)
# what each forced path needs from the CPU (the C++ side checks the same with __builtin_cpu_supports)
NEEDS = {"avx2": ("avx2", "fma", "popcnt"), "avx512": ("avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512vl",
                                                        "avx512_vbmi2")}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo, read once (kernels.impl() asks on every forward); empty where
    there is none: the C++ check still holds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cache_bytes() -> int:
    """The CPU's last-level cache in bytes (sysfs), 32 MiB where it does not say."""
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
            return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        except (OSError, ValueError):
            continue
    return 32 << 20


def check_kernels_env(name: str | None = None) -> str:
    """HYBRIDPRUNE_KERNELS (or `name`, its value), checked: a known path, and one this CPU has. Returns its name."""
    name = os.environ.get("HYBRIDPRUNE_KERNELS", "auto") if name is None else name
    if name not in KERNEL_PATHS:
        raise HybridPruneError(f"HYBRIDPRUNE_KERNELS={name!r} is not a kernel path; use one of {', '.join(KERNEL_PATHS)}")
    flags = cpu_flags()
    lacking = [f for f in NEEDS.get(name, ()) if f not in flags]
    if flags and lacking:
        raise HybridPruneError(f"HYBRIDPRUNE_KERNELS={name} needs {', '.join(lacking)}, which this CPU lacks; use "
                               f"auto (the fastest path it has){', avx2' if name == 'avx512' and 'avx2' in flags else ''}"
                               " or portable")
    return name


def toolchain_problem() -> str | None:
    """Why the kernels cannot be compiled here (no C++ compiler, no ninja), in one line naming the fix; None if
    they can. Asked before a model loads, so that --kernels is refused up front."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"the sparse kernels are compiled from C++ on first use, and no C++ compiler ({compiler}) is installed: "
                "install g++ (Debian/Ubuntu: apt-get install g++), or run without --kernels")
    if shutil.which("ninja") is None and not _venv_ninja():
        return "the sparse kernels are built with ninja, which is not installed: pip install 'hybridprune[kernels]'"
    return None


def _venv_ninja() -> bool:
    """ninja installed beside this Python (a venv's bin/, which a plain .venv/bin/python lacks on its PATH)."""
    import sysconfig
    scripts = sysconfig.get_path("scripts")
    return bool(scripts) and (Path(scripts) / "ninja").is_file()


def check_toolchain() -> None:
    """Everything --kernels needs, asked before a model loads: HYBRIDPRUNE_KERNELS and the C++ toolchain."""
    check_kernels_env()
    problem = toolchain_problem()
    if problem:
        raise HybridPruneError(problem)


# ----------------------------------------------------------------------------- patterns

@dataclass
class Unstructured:
    sparsity: float = 0.5
    group: str = "row"

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise HybridPruneError(f"sparsity {self.sparsity} is outside [0, 1); pass e.g. --sparsity 0.5")
        if self.group not in ("row", "matrix"):
            raise HybridPruneError(f"unknown comparison group {self.group!r}; use row or matrix")

    @property
    def expected_sparsity(self) -> float:
        return self.sparsity

    def describe(self) -> dict:
        return {"pattern": "unstructured", "sparsity": self.sparsity, "group": self.group}



@dataclass
class NM:
    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (0 < self.n < self.m):
            raise HybridPruneError(f"N:M needs 0 < N < M, got {self.n}:{self.m}; use e.g. 2:4")

    @property
    def expected_sparsity(self) -> float:
        return 1 - self.n / self.m

    def describe(self) -> dict:
        return {"pattern": f"{self.n}:{self.m}", "n": self.n, "m": self.m, "sparsity": self.expected_sparsity}



@dataclass
class TieredBlocks:
    """Three-tier hybrid: blocks ranked by mean score -> dense / N:M / top-k.

    `block` and `block-topk` are the same machine with an empty N:M tier (k = 0 zeroes whole blocks).
    """
    tiers: tuple[float, float, float] = (0.35, 0.45, 0.20)
    block_size: int = 16
    n: int = 2
    m: int = 4
    topk: int = 15
    tier_metric: str = "wanda"       # what picks weights inside tiers 1 and 2: wanda | ria | sparsegpt | magnitude
    scope: str = "matrix"            # where blocks are ranked: matrix | layer | model
    retention: float | None = None   # adaptive: an N:M candidate stays dense if N:M keeps < retention of its score
    block_score: str = "mean"        # mean | row: mean of the score, or of the score relative to its row's mean
    name: str = "three-tier"

    def __post_init__(self):
        self.tiers = tuple(float(t) for t in self.tiers)
        if len(self.tiers) != 3 or not all(math.isfinite(t) and t >= 0 for t in self.tiers) \
                or abs(sum(self.tiers) - 1) > 1e-6:
            raise HybridPruneError(f"tier ratios {','.join(map(str, self.tiers))} must be three non-negative numbers "
                                   "that add up to 1, e.g. --tiers 0.35,0.45,0.20")
        if self.block_size < 1:
            raise HybridPruneError(f"block size must be positive, got {self.block_size}")
        if not (0 < self.n < self.m):
            raise HybridPruneError(f"N:M tier needs 0 < N < M, got {self.n}:{self.m}; use e.g. --tier-nm 2:4")
        if self.block_size % self.m:
            raise HybridPruneError(f"block size {self.block_size} is not a multiple of M={self.m}; "
                                   f"choose --block-size as a multiple of {self.m}")
        if not 0 <= self.topk <= self.block_size ** 2:
            raise HybridPruneError(f"--topk {self.topk} must be within [0, {self.block_size ** 2}] "
                                   f"for {self.block_size}x{self.block_size} blocks")
        if self.tier_metric not in ("wanda", "ria", "sparsegpt", "magnitude"):
            raise HybridPruneError(f"unknown tier metric {self.tier_metric!r}; use wanda, ria, sparsegpt or "
                                   "magnitude")
        if self.scope not in ("matrix", "layer", "model"):
            raise HybridPruneError(f"unknown tier scope {self.scope!r}; use matrix, layer or model")
        if self.block_score not in ("mean", "row"):
            raise HybridPruneError(f"unknown block score {self.block_score!r}; use mean or row")
        if self.retention is not None and not 0 <= self.retention <= 1:
            raise HybridPruneError(f"--retention {self.retention} must be within [0, 1]")

    @property
    def expected_sparsity(self) -> float:
        """Sparsity on shapes divisible by the block size (edge blocks shift it slightly)."""
        b2 = self.block_size ** 2
        return self.tiers[1] * (1 - self.n / self.m) + self.tiers[2] * (1 - self.topk / b2)

    def describe(self) -> dict:
        return {"pattern": self.name, "tiers": list(self.tiers), "block_size": self.block_size,
                "tier_nm": f"{self.n}:{self.m}", "topk": self.topk, "tier_metric": self.tier_metric,
                "scope": self.scope, "retention": self.retention, "block_score": self.block_score,
                "sparsity": self.expected_sparsity}



def block_pattern(sparsity: float, block_size: int = 16, kind: type | None = None, **kw) -> TieredBlocks:
    """Zero whole lowest-scoring blocks until `sparsity` of the blocks are gone."""
    _check_sparsity(sparsity)
    return (kind or TieredBlocks)(tiers=(1 - sparsity, 0.0, sparsity), block_size=block_size, topk=0, name="block", **kw)


def block_topk_pattern(sparsity: float, block_size: int = 16, topk: int = 15, kind: type | None = None,
                       **kw) -> TieredBlocks:
    """The lowest `sparsity` fraction of blocks keep only their top-k weights."""
    _check_sparsity(sparsity)
    return (kind or TieredBlocks)(tiers=(1 - sparsity, 0.0, sparsity), block_size=block_size, topk=topk, name="block-topk", **kw)


def _check_sparsity(s):
    if not 0 <= s < 1:
        raise HybridPruneError(f"sparsity {s} is outside [0, 1); pass e.g. --sparsity 0.5")


PATTERNS = ("unstructured", "N:M (e.g. 2:4)", "three-tier", "block", "block-topk")


def make_pattern(name: str, sparsity: float = 0.5, kinds: tuple[type, type, type] | None = None, **opts):
    """Build a pattern from its CLI name. kinds: the (Unstructured, NM, TieredBlocks) classes to build, the
    specs here by default, pruning.patterns' mask-making subclasses there.

    opts: group, tiers, block_size, nm, topk, tier_metric, scope, retention, block_score.
    """
    unstructured, nm, tiered = kinds or (Unstructured, NM, TieredBlocks)
    if re.fullmatch(r"\d+:\d+", name or ""):
        n, m = map(int, name.split(":"))
        return nm(n, m)
    tier_opts = {k: opts[k] for k in ("block_size", "tier_metric", "scope", "retention", "block_score")
                 if opts.get(k) is not None}
    if opts.get("nm"):
        tier_opts["n"], tier_opts["m"] = parse_nm(opts["nm"])
    if name == "unstructured":
        return unstructured(sparsity, opts.get("group") or "row")
    if name == "three-tier":
        tiers = opts.get("tiers") or (0.35, 0.45, 0.20)
        return tiered(tiers=parse_tiers(tiers), topk=opts.get("topk", 15) if opts.get("topk") is not None
                            else 15, **tier_opts)
    if name == "block":
        return block_pattern(sparsity, kind=tiered, **tier_opts)
    if name == "block-topk":
        return block_topk_pattern(sparsity, topk=opts["topk"] if opts.get("topk") is not None else 15,
                                  kind=tiered, **tier_opts)
    raise HybridPruneError(f"unknown pattern {name!r}; use one of: {', '.join(PATTERNS)}")


def parse_nm(text: str) -> tuple[int, int]:
    if not re.fullmatch(r"\d+:\d+", str(text)):
        raise HybridPruneError(f"bad N:M {text!r}; write it like 2:4")
    n, m = map(int, str(text).split(":"))
    if not 0 < n < m:
        raise HybridPruneError(f"N:M needs 0 < N < M, got {text}; use e.g. 2:4")
    return n, m


def parse_tiers(tiers) -> tuple[float, float, float]:
    """'0.35,0.45,0.20' or a sequence of three numbers -> three finite floats (their sum is checked later)."""
    text = tiers if isinstance(tiers, str) else ",".join(map(str, tiers))
    try:
        values = tuple(float(x) for x in (tiers.split(",") if isinstance(tiers, str) else tiers))
    except (TypeError, ValueError):
        raise HybridPruneError(f"bad tier ratios {text!r}; write three numbers like 0.35,0.45,0.20") from None
    if len(values) != 3:
        raise HybridPruneError(f"tier ratios need three numbers (dense, N:M, top-k), got {len(values)} in {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise HybridPruneError(f"tier ratios {text!r} must be finite numbers, e.g. 0.35,0.45,0.20")
    return values


# ----------------------------------------------------------------------------- OWL


def check_owl(pattern, m: float, lam: float) -> None:
    """OWL's options against the pattern, before any model is read."""
    if not (m > 0):
        raise HybridPruneError(f"--owl-m must be > 0 (the paper uses {OWL_M}), got {m}")
    if isinstance(pattern, NM):
        raise HybridPruneError("--layer-sparsity owl needs a pattern whose sparsity can vary (unstructured or the "
                               f"block tiers); N:M fixes every layer at {pattern.expected_sparsity:g}")
    s = pattern.expected_sparsity
    if not (0 <= lam <= s):
        raise HybridPruneError(f"--owl-lambda must be within [0, {s:g}] (the sparsity), got {lam}")
    if s + lam >= 1:
        raise HybridPruneError(f"--owl-lambda {lam} leaves no weights in the sparsest layers (sparsity {s:g} + "
                               f"{lam} >= 1); use a smaller --owl-lambda")
    if isinstance(pattern, TieredBlocks):
        if pattern.scope == "model":
            raise HybridPruneError("--layer-sparsity owl sets each layer's tiers; --tier-scope model ranks blocks "
                                   "across layers instead. Use --tier-scope layer or matrix")
        j, gain = tier_move(pattern)
        shift = lam / gain
        if pattern.tiers[0] < shift - 1e-12 or pattern.tiers[j] < shift - 1e-12:
            raise HybridPruneError(f"--owl-lambda {lam} moves up to {shift:.3f} of the blocks between the dense and "
                                   f"{'N:M' if j == 1 else 'top-k'} tiers, more than tiers {list(pattern.tiers)} hold; use a smaller "
                                   "--owl-lambda")


def tier_move(pattern: TieredBlocks) -> tuple[int, float]:
    """Which tier trades blocks with the dense tier, and the sparsity one block gains by the move."""
    if pattern.tiers[1] > 0:
        return 1, 1 - pattern.n / pattern.m
    return 2, 1 - pattern.topk / pattern.block_size ** 2
