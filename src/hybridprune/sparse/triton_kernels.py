"""GPU kernels: x @ W.T from the packed layouts (packing.py), written in Triton.

Each program decodes a tile of W from its packed form into registers and multiplies it with a tile of x by
`tl.dot`, accumulating in fp32; W never exists whole in GPU memory. One kernel per layout:

    unstructured   a [BLOCK_N, BLOCK_K] tile: the mask's bits, each kept weight's index = the row's start
                   (rowptr) + the kept bits before it in the row (a running count and a cumsum)
    nm             a [BLOCK_N, G * M] tile from G groups: each of the N kept values lands on its group's column
                   at its stored position
    tiered         one 16-row strip of blocks per program, block by block: dense blocks are read as they are
                   (column-major), N:M and top-k blocks are expanded into a 16 x 16 tile; a block's slot in its
                   kind's array is the strip's offset for that kind (PackedLinear.offsets) plus a running count

Products are formed in fp32 and summed in fp32: IEEE fp32 (no TF32) where x is fp32, as the CPU kernels do; TF32
where x and the values are both bf16 (or fp16), which TF32 represents exactly, so the products are exact.
Tested under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against the dense matmul of the unpacked
matrix; PackedLinear routes CUDA inputs here. Importing this module imports Triton (the `gpu` extra): callers
import it where a GPU path runs, after core.errors.require has named the extra if it is missing. Timing against cuBLAS is bench/gpu_check.sh's, on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    # acc [BM, BN] += x [BM, BK] @ w.T, w [BN, BK], both as fp32: in IEEE fp32 where x is fp32, in TF32 where x
    # and the values are 16-bit (TF32 holds every bf16 and fp16 number exactly, so the products are exact)
    x32, w32 = x.to(tl.float32), w.to(tl.float32)
    if IEEE:
        return acc + tl.dot(x32, tl.trans(w32), input_precision="ieee")
    return acc + tl.dot(x32, tl.trans(w32), input_precision="tf32")


@triton.jit
def unstructured(x_ptr, mask_ptr, vals_ptr, rowptr_ptr, y_ptr, M, N, K, MB,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    start = tl.load(rowptr_ptr + rn, mask=rn < N, other=0)
    seen = tl.zeros([BN], dtype=tl.int64)  # kept weights of each row before this tile
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        byte = tl.load(mask_ptr + rn[:, None] * MB + rk[None, :] // 8,
                       mask=(rn[:, None] < N) & (rk[None, :] < K), other=0).to(tl.int32)
        bit = (byte >> (rk[None, :] % 8)) & 1
        before = tl.cumsum(bit, axis=1) - bit
        idx = start[:, None] + seen[:, None] + before
        w = tl.load(vals_ptr + idx, mask=bit == 1, other=0.0)
        seen += tl.sum(bit, axis=1)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        acc = _dot(acc, x, w, IEEE)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def nm(x_ptr, vals_ptr, pos_ptr, y_ptr, M, N, K, T, PB,
       NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
       BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    # values [N, T = K / MM * NN]; positions [N, PB] bytes, value i at bits (i % per) * BITS of byte i / per
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    g = tl.arange(0, G)
    q = tl.arange(0, MM)
    PER: tl.constexpr = 8 // BITS
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for g0 in range(0, K // MM, G):
        groups = g0 + g
        live = (rn[:, None] < N) & (groups[None, :] < K // MM)
        w3 = tl.zeros([BN, G, MM], dtype=tl.float32)
        for j in tl.static_range(NN):
            i = groups[None, :] * NN + j                                  # value index in the row
            v = tl.load(vals_ptr + rn[:, None] * T + i, mask=live, other=0.0)
            byte = tl.load(pos_ptr + rn[:, None] * PB + i // PER, mask=live, other=0).to(tl.int32)
            p = (byte >> ((i % PER) * BITS)) & ((1 << BITS) - 1)
            w3 += tl.where(p[:, :, None] == q[None, None, :], v.to(tl.float32)[:, :, None], 0.0)
        w = tl.reshape(w3, [BN, G * MM])
        rk = g0 * MM + tl.arange(0, G * MM)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        acc = _dot(acc, x, w, IEEE)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def tiered(x_ptr, tiers_ptr, dense_ptr, nmv_ptr, nmp_ptr, topv_ptr, topp_ptr, off_ptr, y_ptr, M, N, K, C, KTOP,
           NN: tl.constexpr, MM: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr):
    # one strip of 16-row blocks (program 1) x BM rows of x (program 0); B = 16
    pm, r = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rr = tl.arange(0, 16)
    cc = tl.arange(0, 16)
    TB: tl.constexpr = 16 // MM * NN                  # kept values per row of an N:M block
    slot_d = tl.load(off_ptr + r * 3 + 0)
    slot_s = tl.load(off_ptr + r * 3 + 1)
    slot_t = tl.load(off_ptr + r * 3 + 2)
    jt = tl.arange(0, KP)
    acc = tl.zeros([BM, 16], dtype=tl.float32)
    for c in range(0, C):
        tier = tl.load(tiers_ptr + r * C + c)
        if tier == 0:
            w = tl.load(dense_ptr + slot_d * 256 + cc[None, :] * 16 + rr[:, None]).to(tl.float32)
            slot_d += 1
        elif tier == 1:
            w = tl.zeros([16, 16], dtype=tl.float32)
            for t in tl.static_range(TB):
                v = tl.load(nmv_ptr + (slot_s * TB + t) * 16 + rr).to(tl.float32)
                word = tl.load(nmp_ptr + slot_s * TB + t)
                col = (t // NN) * MM + ((word >> (2 * rr)) & 3)
                w += tl.where(col[:, None] == cc[None, :], v[:, None], 0.0)
            slot_s += 1
        else:
            v = tl.load(topv_ptr + slot_t * KTOP + jt, mask=jt < KTOP, other=0.0).to(tl.float32)
            at = tl.load(topp_ptr + slot_t * KTOP + jt, mask=jt < KTOP, other=0).to(tl.int32)
            flat = tl.sum(tl.where(at[:, None] == tl.arange(0, 256)[None, :], v[:, None], 0.0), axis=0)
            w = tl.reshape(flat, [16, 16])
            slot_t += 1
        rk = c * 16 + cc
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        acc = _dot(acc, x, w, IEEE)
    rn = r * 16 + rr
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def matmul(kind: str, x: torch.Tensor, buffers: dict, layout: dict) -> torch.Tensor:
    """x [rows, K] (fp32, or the values' 16-bit dtype) -> x @ W.T [rows, N] in fp32, W given by the PackedLinear
    buffers of `kind` (its layout)."""
    kernels = {"unstructured": unstructured, "nm": nm, "tiered": tiered}
    N, K = layout["shape"]
    rows = x.shape[0]
    x = x.contiguous()
    y = torch.empty(rows, N, dtype=torch.float32, device=x.device)
    values = buffers["values"] if kind != "tiered" else buffers["dense"]
    # 16-bit x with 16-bit values multiply exactly in TF32; anything else in IEEE fp32
    ieee = not (x.dtype == values.dtype and x.dtype in (torch.float16, torch.bfloat16))
    bm = _block_m(rows)
    if kind == "unstructured":
        bn, bk = 32, 32
        grid = ((rows + bm - 1) // bm, (N + bn - 1) // bn)
        kernels["unstructured"][grid](x, buffers["mask"], buffers["values"], buffers["rowptr"], y, rows, N, K,
                                      buffers["mask"].shape[1], BM=bm, BN=bn, BK=bk, IEEE=ieee)
    elif kind == "nm":
        n, m = layout["n"], layout["m"]
        bits = 2 if m <= 4 else 4 if m <= 16 else 8
        groups = max(16 // m, 1) * 2  # a tile of 32 (or M x 2) columns
        bn = 32
        grid = ((rows + bm - 1) // bm, (N + bn - 1) // bn)
        kernels["nm"][grid](x, buffers["values"], buffers["positions"], y, rows, N, K, buffers["values"].shape[1],
                            buffers["positions"].shape[1], NN=n, MM=m, BITS=bits, G=groups, BM=bm, BN=bn, IEEE=ieee)
    else:
        k = layout["k"]
        kp = max(16, 1 << (max(k, 1) - 1).bit_length())
        strips = buffers["tiers"].shape[0]
        grid = ((rows + bm - 1) // bm, strips)
        kernels["tiered"][grid](x, buffers["tiers"], buffers["dense"], buffers["nm_values"], buffers["nm_positions"],
                                buffers["topk_values"], buffers["topk_positions"], buffers["offsets"], y, rows, N, K,
                                buffers["tiers"].shape[1], k, NN=layout["n"], MM=layout["m"], KP=kp, BM=bm, IEEE=ieee)
    return y
