"""What the packed format's per-tensor CRC-32 adds to loading a packed folder.

Packs the default model pruned three-tier (magnitude: no calibration needed), then times, alone, in one process:
reading packed.safetensors, computing every tensor's checksum, and the whole load of the packed model (which
verifies them). Prints the machine, the sizes, and the checksum's share of the load.

    python bench/pack_checksum.py [--repeat 3]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from headline import commit, machine
from safetensors.torch import load_file

import hybridprune as hp
from hybridprune.sparse import packing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine()})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tt"
        hp.prune(hp.load("default"), method="magnitude", pattern="three-tier").save(out, packed=True)
        f = out / packing.PACKED_FILE
        read, sums, loads = [], [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            tensors = load_file(str(f))
            read.append(time.perf_counter() - t)
            t = time.perf_counter()
            for v in tensors.values():
                packing.checksum(v)
            sums.append(time.perf_counter() - t)
            t = time.perf_counter()
            hp.load(str(out))
            loads.append(time.perf_counter() - t)
        size = f.stat().st_size
        s, r, load = (statistics.median(x) for x in (sums, read, loads))
        print(f"packed.safetensors {size / 1e6:.1f} MB, {len(tensors)} tensors")
        print(f"read {r:.3f} s; checksums {s:.3f} s ({size / s / 1e9:.2f} GB/s); whole load {load:.3f} s; "
              f"checksums are {s / load:.1%} of the load (medians of {args.repeat})")


if __name__ == "__main__":
    main()
