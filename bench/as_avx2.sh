#!/usr/bin/env bash
# Run a bench as if on a CPU without AVX-512: our kernels take their AVX2 path, and torch's own products are held
# to AVX2 as well (ATen's kernels, fbgemm's int8 quantize_dynamic, oneDNN, MKL), so that neither side keeps
# AVX-512 or VNNI. HYBRIDPRUNE_KERNELS=avx2 alone forces only our side. The core stays the one under test (its
# caches, clocks and memory), so this stands in for, but is not, an AVX2-only CPU. Each bench prints the limits in
# its machine line (`isa_limits`).
#
#   bash bench/as_avx2.sh .venv/bin/python bench/int8.py --no-quality
#
# Measured on an AMD EPYC (Zen 4), 1024 x 2048 in cache: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 slows quantize_dynamic
# from 40 to 50 us at batch 1 and 74 to 118 us at batch 8; MKL_ENABLE_INSTRUCTIONS=AVX2 leaves fp32 F.linear as
# it was (MKL already runs its AVX2 code on this AMD CPU).
set -euo pipefail
export HYBRIDPRUNE_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
       MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
