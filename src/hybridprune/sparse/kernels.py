"""Sparse kernels: nn.Linear replaced by a module that computes x @ W.T from the packed weights (packing.py).

    sparsify_(model, ...)        one call swaps every packed matrix's module for a PackedLinear
    PackedLinear.forward(x)      csrc/packed.cpp: unstructured (bitmask), 2:4, tiered 16x16 blocks (dense / 2:4 /
                                 top-k); fp32 or bf16 weights, fp32 accumulation, threads over rows
The extension is compiled from csrc/packed.cpp with torch's C++ extension mechanism the first time it is used
(`make setup` does it once) into the hybridprune cache folder; nothing prebuilt is downloaded. `build(name)` does
the same for any csrc source (fine-tuning's hashed dropout, csrc/dropout.cpp).
The sparse kernel has three implementations with bit-identical results: AVX-512 (expand-loads for the bitmask,
two-source permutes for 2:4 positions) and AVX2+FMA where the CPU has them, and a portable one
(HYBRIDPRUNE_KERNELS=portable forces it; avx2 and avx512 name the others). For prefill, x with two or more rows
takes whichever route routes.py measured fastest on this machine: the sparse kernel, the packed GEMM (AVX-512 or
AVX2, the same bits), or dense strips (torch's matmul over decoded rows); their sums are ordered differently (within fp32 rounding of each
other, not bit-identical). Layouts
the kernels do not cover (blocks other than 16x16, an N:M other than 2:4) keep their packed form on disk and
compute with the unpacked matrix.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from pathlib import Path

import torch
from torch import nn

from hybridprune.io import models
from hybridprune.io.folder import load_permutations, load_tier_maps, read_record
from hybridprune.core.errors import HybridPruneError, require
from hybridprune.core.specs import (ACTIVATIONS, KERNEL_PATHS as IMPLS, cache_bytes, check_kernels_env,  # noqa: F401
                                   check_toolchain,
                                   toolchain_problem)
from hybridprune.sparse import routes
from hybridprune.sparse.packing import (kept_per_row, pack_matrix, pack_prunable, packed_bytes, quantize,
                                        unpack_matrix)

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_BUILT: dict = {}
STRIP = 512  # weight rows decoded at a time for the dense-strips route
MAX_COPIES = 64  # copies of a small matrix cycled through while measuring routes (its weights then come from DRAM)
# specs.ACTIVATIONS other than float: how many int8 terms of x the kernel sums
LEVELS = {"int8": 1, "int8x2": 2}
_TABLES: dict = {}  # routes.RouteTable per compiled build
_ENTRIES: dict = {}  # measured route entries by routes.entry_key, for this process
_IMPL: dict = {}  # kernel path by HYBRIDPRUNE_KERNELS value, checked


def extension():
    """The compiled sparse kernels, csrc/packed.cpp (built on first use, then loaded from the cache)."""
    return build("packed", "run without --kernels")




def build(name: str, fallback: str, source: Path | None = None):
    """csrc/<name>.cpp (or another `source`, e.g. an earlier version to benchmark against) compiled with torch's
    C++ extension mechanism into the cache (once per source text and torch); `fallback` tells the user how to do
    without it if the build fails. Asked on every forward: once built, it is one dictionary read."""
    key = name if source is None else str(source)
    if key not in _BUILT:
        source = Path(source) if source is not None else _CSRC / f"{name}.cpp"
        from torch.utils.cpp_extension import load
        check_toolchain()
        digest = hashlib.sha256(source.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
        folder = models.cache_dir() / "kernels" / digest
        folder.mkdir(parents=True, exist_ok=True)
        _TABLES[name] = routes.RouteTable(folder / "routes.json")
        scripts = sysconfig.get_path("scripts")  # ninja comes with the venv; a plain .venv/bin/python lacks PATH
        if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
        try:
            _BUILT[key] = load(name=f"hybridprune_{name}_{digest}", sources=[str(source)], build_directory=str(folder),
                                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:
            raise HybridPruneError(f"building the {name} kernels failed ({str(e).splitlines()[0]}); they need g++ "
                                   f"and ninja (`make setup` installs ninja); {fallback}") from None
    return _BUILT[key]


def impl(name: str | None = None) -> int:
    """The kernel path HYBRIDPRUNE_KERNELS (or `name`, its value) forces (0: the fastest this CPU has), checked
    against the CPU once per value."""
    name = os.environ.get("HYBRIDPRUNE_KERNELS", "auto") if name is None else name
    path = _IMPL.get(name)
    if path is None:
        path = _IMPL[name] = IMPLS[check_kernels_env(name)]
    return path


def covered(layout: dict) -> bool:
    """Whether a kernel computes this layout from its packed form."""
    if layout["kind"] == "unstructured":
        return True
    if layout["kind"] == "nm":
        return (layout["n"], layout["m"]) == (2, 4) and layout["shape"][1] % 16 == 0
    return layout["block"] == 16 and (layout["n"], layout["m"]) == (2, 4)


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held packed (its buffers are the packed tensors, in the kernels' layout)."""

    def __init__(self, layout: dict, tensors: dict, bias: torch.Tensor | None = None):
        super().__init__()
        self.layout = dict(layout)
        self.out_features, self.in_features = layout["shape"]
        self.kind = layout["kind"] if covered(layout) else "unpacked"
        # int8 values: the kernels compute sum(q * x), and each output is then multiplied by its row's scale
        self.scaled = layout.get("values") == "int8" and self.kind != "unpacked"
        if self.kind == "unpacked":
            self.register_buffer("weight", unpack_matrix(tensors, layout))
        else:
            for name, t in tensors.items():
                self.register_buffer(name, t.contiguous())
        # a channel-permuted N:M matrix: the kernel reads x's columns in the order `perm` (a buffer, above)
        self.permuted = bool(layout.get("permuted")) and self.kind != "unpacked"
        if self.kind == "unstructured":  # where each row's values start
            per_row = kept_per_row(tensors["mask"])
            self.register_buffer("rowptr", torch.cat([torch.zeros(1, dtype=torch.int64), per_row.cumsum(0)]))
        if self.kind == "tiered":
            counts = torch.stack([(tensors["tiers"] == i).sum(1) for i in range(3)], 1).to(torch.int64)
            self.register_buffer("offsets", torch.cat([torch.zeros(1, 3, dtype=torch.int64), counts.cumsum(0)]))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.activations = "float32"  # or "int8", "int8x2": see int8_activations_
        self.pad_cols = 0  # zero columns the kernels' x needs (whole mask bytes, whole 16-column blocks)
        if self.kind == "unstructured":
            self.pad_cols = tensors["mask"].shape[1] * 8 - self.in_features
        elif self.kind == "tiered":
            self.pad_cols = tensors["tiers"].shape[1] * 16 - self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.layout['kind']}"

    def backend(self, device: torch.device, env: str | None = None) -> str:
        """What computes this matrix for inputs on `device`: "dense" (a layout no kernel covers), "triton" (CUDA, or
        HYBRIDPRUNE_KERNELS=triton, which runs the GPU kernels on the CPU under TRITON_INTERPRET=1) or "cpu".
        env: HYBRIDPRUNE_KERNELS's value where the caller has read it."""
        if self.kind == "unpacked":
            return "dense"
        env = os.environ.get("HYBRIDPRUNE_KERNELS", "auto") if env is None else env
        if device.type == "cuda" or env == "triton":
            return "triton"
        if device.type != "cpu":
            raise HybridPruneError(f"the packed kernels run on the CPU and on CUDA GPUs, not on {device.type}; load "
                                   "the model without --kernels")
        return "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = os.environ.get("HYBRIDPRUNE_KERNELS", "auto")
        backend = self.backend(x.device, env)
        if backend == "dense":
            y = x @ self.weight.to(x.dtype).t()
        elif backend == "triton":
            if self.scaled:
                raise HybridPruneError("the GPU kernels take float values; int8 values (--values int8) run on the CPU "
                                       "kernels: pack with --values float for a GPU")
            require("triton", "gpu", "the packed GPU kernels")
            from hybridprune.sparse import triton_kernels
            xs = x.index_select(-1, self._buffers["perm"]) if self.permuted else x
            x2 = xs.reshape(-1, self.in_features)
            values = self._buffers["dense" if self.kind == "tiered" else "values"]
            if x2.dtype not in (torch.float32, values.dtype):
                x2 = x2.float()
            y = triton_kernels.matmul(self.kind, x2, self._buffers, self.layout)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            xf = x if x.dtype == torch.float32 else x.float()
            y = self.matmul(xf.index_select(-1, self._buffers["perm"]) if self.permuted else xf, impl(env))
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        bias = self._parameters.get("bias")
        return y if bias is None else y + bias.to(y.dtype)

    def matmul(self, x: torch.Tensor, implementation: int | None = None, route: str | None = None) -> torch.Tensor:
        """x [..., in] fp32 -> x @ W.T [..., out] fp32 by `route` (default: the one measured fastest for this many
        rows on this machine, see routes.py): the sparse kernel, the packed GEMM (AVX-512 or AVX2) or dense
        strips; with int8 values, times each row's scale."""
        y = self._matmul(x, implementation, route)
        return y.mul_(self._buffers["scale"]) if self.scaled else y

    def _matmul(self, x: torch.Tensor, implementation: int | None, route: str | None) -> torch.Tensor:
        ext, which = extension(), impl() if implementation is None else implementation
        rows = x.numel() // self.in_features
        route = route or self.route(rows, which)
        if route != routes.SPARSE:
            x2 = x.reshape(rows, self.in_features)
            y = self.gemm(x2, which) if route == routes.GEMM else self.dense_matmul(x2, which)
            return y.reshape(*x.shape[:-1], self.out_features)
        # decode: the Python around the kernel costs ~2 us (the default model's k_proj takes ~20 us): the kernels
        # take [..., in] as it comes, the buffers are read from the dict (nn.Module.__getattr__ costs ~0.5 us each)
        return self._sparse_kernel(ext, self._padded(x), which)

    def _sparse_kernel(self, ext, xp: torch.Tensor, which: int) -> torch.Tensor:
        """The sparse kernel on x already padded (_padded), nothing around it (bench/module_overhead.py times it)."""
        b = self._buffers
        levels = LEVELS.get(self.activations, 0)  # int8 terms of x the kernel sums (0: fp32 x)
        q8 = levels > 0
        if self.kind == "unstructured":
            if q8:
                return ext.unstructured_mm_q8(xp, b["mask"], b["values"], b["rowptr"], b["rowsum"], which, levels)
            return ext.unstructured_mm(xp, b["mask"], b["values"], b["rowptr"], which)
        if self.kind == "nm":
            if q8:
                return ext.nm24_mm_q8(xp, b["values"], b["positions"], b["rowsum"], which, levels)
            return ext.nm24_mm(xp, b["values"], b["positions"], which)
        blocks = (b["tiers"], b["dense"], b["nm_values"], b["nm_positions"], b["topk_values"], b["topk_positions"],
                  b["offsets"])
        y = ext.tiered_mm_q8(xp, *blocks, b["rowsum"], which, levels) if q8 else ext.tiered_mm(xp, *blocks, which)
        return y if y.shape[-1] == self.out_features else y[..., :self.out_features].contiguous()

    def use_int8_activations(self, activations: str = "int8") -> bool:
        """Round x to int8 (one scale per row of x) where the sparse kernel runs, so that it sums int8 products
        (AVX-512 VNNI where the CPU has it); "int8x2" also rounds each row's rounding error to int8 (a second
        scale) and sums both, one pass over the weights. Needs int8 values; returns whether this matrix now does
        so. Every row count then takes the sparse kernel (route): the packed GEMM and dense strips multiply fp32 x.
        The VNNI kernels need each row's int8 values summed: the float kernel's product with a row of ones (the
        portable path), exact in fp32 for widths below 132,000 (the int8 kernels refuse 66,000 and more)."""
        check_activations(activations)
        if not self.scaled or activations == "float":
            return False
        ext, b = extension(), self._buffers
        ones = torch.ones(1, self.in_features + self.pad_cols)
        self.activations = "float32"  # the row sums come from the fp32-x kernel
        if self.kind == "tiered":  # every block row's 16 rows, padding rows included
            sums = ext.tiered_mm(ones, b["tiers"], b["dense"], b["nm_values"], b["nm_positions"], b["topk_values"],
                                 b["topk_positions"], b["offsets"], 1)
        else:
            sums = self._sparse_kernel(ext, ones, 1)
        self.register_buffer("rowsum", sums[0].round().to(torch.int32).contiguous(), persistent=False)
        self.activations = activations
        return True

    def routes(self, implementation: int = 0) -> list[str]:
        """The routes this matrix can take on kernel path `implementation` (0: the fastest the CPU has): the packed
        GEMM needs AVX2 or AVX-512."""
        gemm = _path(implementation) in (2, 3)
        return [routes.SPARSE] + ([routes.GEMM] if gemm else []) + [routes.STRIPS]

    def route(self, rows: int, implementation: int = 0) -> str:
        """Which route `matmul` takes for `rows` rows of x: the fastest measured on this machine (routes.py); with
        int8 activations always the sparse kernel, so that the model computes the same at any number of rows."""
        if rows < routes.BUCKETS[0] or self.activations in LEVELS:
            return routes.SPARSE
        return routes.choose(self.route_table(implementation), rows)

    def route_table(self, implementation: int = 0) -> dict:
        """This layout and shape's measured routes on this machine: from this process, the cache, or measured now
        (once per machine, a second or so for a 7B model's largest matrix)."""
        path = _path(implementation)
        values = self._buffers["dense" if self.kind == "tiered" else "values"]
        key = routes.entry_key(self.kind, (self.out_features, self.in_features), values.dtype, path)
        entry = _ENTRIES.get(key)
        if entry is None:
            table = _TABLES["packed"]
            entry = table.get(key)
            if entry is None:
                logger.info(f"measuring the prefill routes of {key} (once on this machine; kept in {table.path})")
                entry = self._measure_routes(path)
                table.put(key, entry)
            _ENTRIES[key] = entry
        return entry

    def _measure_routes(self, implementation: int) -> dict:
        """Time every route at routes.BUCKETS rows, cycling through copies of this matrix (up to twice the L3 in
        all), so that as in a model's forward its weights come from DRAM rather than cache."""
        n = max(1, min(MAX_COPIES, -(-2 * cache_bytes() // max(1, packed_bytes(self._buffers)))))
        copies = [self] + [PackedLinear(self.layout, {k: v.clone() for k, v in self._packed_tensors().items()})
                           for _ in range(n - 1)]
        turn = {"i": 0}

        def run(route: str, x: torch.Tensor):
            module = copies[turn["i"] % n]
            turn["i"] += 1
            return module.matmul(x, implementation, route)
        with torch.no_grad():
            return routes.measure(run, self.routes(implementation), self.in_features)

    def _packed_tensors(self) -> dict:
        """The packed tensors this module was built from (its buffers less those it derived)."""
        return {k: v for k, v in self._buffers.items() if k not in ("rowptr", "offsets", "weight")}

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x, contiguous, with zero columns up to the packed width (whole mask bytes, whole 16-column blocks)."""
        return _pad(x, self.pad_cols)

    def gemm(self, x: torch.Tensor, implementation: int = 0) -> torch.Tensor:
        """x @ W.T by the packed GEMM (AVX-512, or AVX2 where the CPU lacks it or implementation is 2): each
        thread decodes 16 weight rows at a time into L2. Both give the same bits."""
        ext, xp = extension(), self._padded(x)
        if self.kind == "unstructured":
            return ext.unstructured_gemm(xp, self.mask, self.values, self.rowptr, implementation)
        if self.kind == "nm":
            return ext.nm24_gemm(xp, self.values, self.positions, implementation)
        return ext.tiered_gemm(xp, self.tiers, self.dense, self.nm_values, self.nm_positions, self.topk_values,
                               self.topk_positions, self.offsets, implementation)[:, :self.out_features]

    def dense_matmul(self, x: torch.Tensor, implementation: int = 0) -> torch.Tensor:
        """x @ W.T with W decoded STRIP rows at a time into one buffer (a strip stays in cache; the whole matrix
        never exists), each strip multiplied by torch's matmul. Tiered strips are decoded transposed (each block's
        columns whole), the others row-major; the decoding is exact on every path."""
        ext, N, xp = extension(), self.out_features, self._padded(x)
        Kp = xp.shape[1]
        y = torch.empty(x.shape[0], N, dtype=torch.float32)
        buf = torch.empty(min(STRIP, -(-N // 16) * 16) * Kp, dtype=torch.float32)
        if self.kind == "tiered":
            step = STRIP // 16
            for R0 in range(0, self.tiers.shape[0], step):
                R1 = min(R0 + step, self.tiers.shape[0])
                WT = ext.tiered_decode_t(self.tiers, self.dense, self.nm_values, self.nm_positions, self.topk_values,
                                         self.topk_positions, self.offsets, R0, R1,
                                         buf[:Kp * (R1 - R0) * 16].view(Kp, (R1 - R0) * 16), implementation)
                rows = min(R1 * 16, N) - R0 * 16
                torch.mm(xp, WT[:, :rows], out=y[:, R0 * 16:R0 * 16 + rows])
            return y
        for r0 in range(0, N, STRIP):
            r1 = min(r0 + STRIP, N)
            out = buf[:(r1 - r0) * Kp].view(r1 - r0, Kp)
            W = ext.unstructured_decode(self.mask, self.values, self.rowptr, r0, r1, out, implementation) \
                if self.kind == "unstructured" else ext.nm24_decode(self.values, self.positions, r0, r1, out,
                                                                    implementation)
            torch.mm(xp, W.t(), out=y[:, r0:r1])
        return y


def _path(implementation: int) -> int:
    """The kernel path an implementation number runs: 0 (the fastest) resolved to 3 (AVX-512), 2 (AVX2) or 1."""
    if implementation:
        return implementation
    ext = extension()
    return 3 if ext.has_avx512() else 2 if ext.has_avx2() else 1


def _pad(x: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, extra)).contiguous() if extra else x.contiguous()


def sparsify_(model: nn.Module, config=None, result=None, packed: dict | None = None, layouts: dict | None = None,
              record: dict | None = None, tier_maps: dict | None = None, perms: dict | None = None,
              values: str = "float") -> int:
    """Swap each pruned matrix's module for a PackedLinear, in place. Returns how many were swapped.

    config/result: the PruneConfig and PruneResult of `prune(model, config)` (the pattern and tier maps), or
    record/tier_maps/perms: a saved folder's hybridprune.json, tiers.safetensors and permutations.safetensors; each
    prunable matrix is then packed here from the model's own zeros, its kept values in the model's dtype or
    (values="int8") as int8 with a scale per output row. packed/layouts: the tensors and layouts of a packed folder
    (packing.read_packed), keyed by weight name.
    """
    if config is not None and result is not None:
        from hybridprune.pruning.engine import pruned_record
        record, tier_maps = pruned_record(config, result, "memory"), result.tier_maps
        perms = result.permutations
    if packed is None:
        packed, layouts = {}, {}
        if not record or "prune" not in record:
            return 0
        pattern = record["prune"].get("pattern_detail") or {}
        skipped = set(record.get("skipped") or [])
        for name, mod in models.prunable_matrices(model).items():
            done = pack_prunable(name, models.weight_matrix(mod).detach(), not isinstance(mod, nn.Linear), pattern,
                                 tier_maps or {}, skipped, perms, values)
            if done is not None:
                layouts[f"{name}.weight"], packed[f"{name}.weight"] = done
    for key, layout in layouts.items():
        name = key[:-len(".weight")]
        mod = model.get_submodule(name)
        new = PackedLinear(layout, packed[key], getattr(mod, "bias", None))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(layouts)


def pack_lm_head_(model: nn.Module) -> bool:
    """The output layer (the LM head, often tied to the input embedding) as a PackedLinear with int8 values and a
    scale per vocabulary row, in place; the embedding keeps its own weights. Its layout is the unstructured one (a
    bitmask of its non-zeros, all of them: an eighth of a byte a weight), so the unstructured int8 kernel computes it.
    Returns whether there was a head to pack. The tied fp32 head of the default model is 113 MB a token, more than
    its packed three-tier int8 decoder (bench/decode.py)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or isinstance(head, PackedLinear):
        return False
    if not isinstance(head, nn.Linear):
        raise HybridPruneError(f"the output layer is a {type(head).__name__}, not a Linear; run without the int8 LM "
                               "head")
    W = head.weight.detach().float()
    layout = {"kind": "unstructured", "shape": list(W.shape), "dtype": "float32"}
    tensors = pack_matrix(W, layout, "the output layer")
    layout, tensors = quantize(tensors, layout)
    model.set_output_embeddings(PackedLinear(layout, tensors, head.bias))
    return True


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise HybridPruneError(f"unknown activations {activations!r}; use one of {', '.join(ACTIVATIONS)}")


def int8_activations_(model: nn.Module, activations: str = "int8") -> int:
    """Every PackedLinear with int8 values (the int8 LM head included) rounds its input to int8 in the sparse kernel
    (PackedLinear.use_int8_activations; "int8x2": and its rounding error), in place. Returns how many do."""
    check_activations(activations)
    mods = [m for m in model.modules() if isinstance(m, PackedLinear) and m.kind != "unpacked"]
    if not mods or any(not m.scaled for m in mods):
        raise HybridPruneError(f"{activations} activations need the pruned matrices packed with int8 values; use "
                               "values=\"int8\" (--values int8) with the kernels")
    done = sum(m.use_int8_activations(activations) for m in mods)
    if done and activations != "float" and not vnni():
        # correct, but the portable integer sums: 11008 x 4096 at batch 1 took 6.5-125 ms against 1.5-2.6 ms
        # with fp32 x on the AVX2 path (the kernels results page)
        logger.warning("%s activations: the kernels here have no AVX-512 VNNI path (the CPU lacks VNNI, VBMI or "
                       "VBMI2, or HYBRIDPRUNE_KERNELS forces another path), so they sum int8 products one at a "
                       "time, several times slower than fp32 x; use activations=\"float\" (--activations float) "
                       "for speed", activations)
    return done


def vnni() -> bool:
    """Whether the int8-activation kernels run their AVX-512 VNNI path (else the portable integer sums)."""
    return impl() in (0, 3) and bool(extension().has_vnni())


def use_kernels(model: nn.Module, spec: str) -> int:
    """`--kernels` on a model loaded from `spec` (an unpacked pruned folder): pack in memory and swap.
    A model with no pruning record is left dense, with a warning."""
    folder = Path(spec).is_dir()
    n = sparsify_(model, record=read_record(spec) if folder else None,
                  tier_maps=load_tier_maps(spec) if folder else {}, perms=load_permutations(spec) if folder else {})
    if n == 0:
        logger.warning(f"--kernels: {spec} has nothing to pack (not pruned by hybridprune); running dense")
    return n


if __name__ == "__main__":  # `make setup`: compile the kernels now where a compiler exists; they stay optional
    problem = toolchain_problem()
    if problem:
        print(f"kernels not built: {problem}")
    else:
        extension()
        print("kernels built")
