"""Process memory: glibc's heap gives freed memory back to the OS only when told to, and oneDNN keeps what it
built for every matmul shape it has seen.

    cap_heap_growth()   once per process (every command, every experiment): large tensors get their own mappings,
                        oneDNN keeps its 32 most recent primitives
    trim_heap()         after work that freed many small tensors (a layer streamed, a training step)
    release()           between experiment stages: collect reference cycles, then trim
"""
from __future__ import annotations

import gc
import os

MMAP_THRESHOLD = 4 << 20
ONEDNN_PRIMITIVES = 32


def cap_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Allocations of `threshold` bytes and more get their own mapping from glibc, so memory a freed tensor held
    goes back to the OS at once. By default glibc raises that threshold (up to 32 MB) after each large free, and
    the activations of a training step, the KV cache regrowing at each generated token and the score tensors of
    pruning then pile up as heap fragments: RSS far above what is alive (a WikiText-2 LoRA step of the study held
    up to 3.1 GiB with 1.6 GiB alive). At 4 MB the stage peaks at 2.6 GiB instead of 2.9 for 2% more time; lower
    thresholds save more and cost more (1 MB: 2.0 GiB, ~20% slower). Returns False where malloc is not glibc's.

    It also caps oneDNN's primitive cache (which bf16 matmuls on the CPU go through) at 32 unless the user set
    ONEDNN_PRIMITIVE_CACHE_CAPACITY: every new shape (a fine-tuning batch of another length) builds primitives with
    their own buffers, and the default 1,024 of them raised a bf16-autocast SQuAD LoRA from 2,130 to 2,708 MiB in 15
    steps (60 steps: 3,513 MiB against 2,560; 32 is no slower, 0 is 3.4x slower). oneDNN reads the value once, so
    this must run before its first use."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc): without it, the score and statistics tensors of each layer
    (tens of MB, below malloc's mmap threshold) leave fragments, and RSS crept up ~70 MB a layer on a 26-layer
    model until it plateaued at about a third of the model's size."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def release() -> None:
    """Collect what a finished piece of work left (the Trainer's reference cycles wait for the cyclic collector)
    and give the freed heap back: the next stage's peak must not stand on the last one's fragments."""
    gc.collect()
    trim_heap()
