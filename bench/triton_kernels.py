"""The packed GPU kernels (Triton) against cuBLAS, one process, on a CUDA GPU.

    python bench/triton_kernels.py            # 11008 x 4096 and 4096 x 11008, bf16, batches 1 to 512

For each pattern (unstructured 50%, 2:4, three-tier with the default tiers) and batch: the time of
PackedLinear (sparse/triton_kernels.py) and of torch's F.linear on the dense bf16 matrix, their ratio (above 1:
the packed kernel is faster), the packed bytes against dense, and the largest relative error against a float64
reference. Prints the GPU, torch, Triton and CUDA versions; run alone on the GPU.
"""
import sys
import time

import torch
import torch.nn.functional as F

from kernels import pruned_matrix  # bench/kernels.py: the same pruned matrices as the CPU bench


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/triton_kernels.py needs a CUDA GPU (the kernels are tested on the CPU under "
              "TRITON_INTERPRET=1 by tests/test_triton_kernels.py)")
        return 1
    import triton
    from hybridprune.sparse import kernels, packing
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}")
    for N, K in ((11008, 4096), (4096, 11008)):
        for name in ("unstructured", "2:4", "three-tier"):
            Wp, layout, tiers = pruned_matrix(name, N, K, torch.bfloat16)
            layout = {**layout, "dtype": "bfloat16"}
            t = packing.pack_matrix(Wp, layout, "w", tiers)
            m = kernels.PackedLinear(layout, t).cuda()
            Wd = Wp.cuda()
            ratio = packing.packed_bytes(t) / (Wp.numel() * 2)
            for B in (1, 8, 64, 128, 512):
                x = torch.randn(B, K, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ Wd.double().t()
                err = ((m(x).double() - ref).abs().max() / ref.abs().max()).item()
                tp_ = timed(lambda: m(x))
                td = timed(lambda: F.linear(x, Wd))
                print(f"{N}x{K} {name:12s} batch {B:4d}: packed {tp_:8.1f} us, cuBLAS {td:8.1f} us, "
                      f"speedup {td / tp_:5.2f}x, bytes {ratio:.2f} of dense, max rel err {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
