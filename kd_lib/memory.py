"""Freed memory kept for reuse: `keep_freed_memory`, which every fit calls (`kd_lib.fitting.fit`).

glibc's malloc maps a block of more than 128 KB (a threshold it raises as such blocks are freed, up to 32 MB) from
the system afresh and hands it back when it is freed, and it trims the top of its heap as soon as 128 KB or more is
free there. A training step allocates and frees the same large tensors every step (weight-sized gradients, Adam's
work, activations), so every step the kernel faults in and zero-fills their pages again: resnet10 at 16 px took
about 4,700 page faults a training step (none with the memory kept), a fifth to a third of the step on one core.
Keeping the memory changes no number a model computes, only where its tensors live.
"""
import ctypes
import sys
from functools import cache

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2 ** 20  # blocks up to this size come from the heap (glibc's largest on 64-bit systems)
TRIM_THRESHOLD = 2 ** 30  # the heap's free top is handed back only past this size


@cache
def keep_freed_memory() -> bool:
    """Have the process's malloc keep freed blocks for the next allocation instead of handing them back to the
    system (`MMAP_THRESHOLD`, `TRIM_THRESHOLD`): the process keeps its peak memory, and a training step stops
    paying page faults for it. Once per process; True where it took, False where malloc is not glibc's (macOS,
    Windows, musl), which leaves everything as it was."""
    if not sys.platform.startswith("linux"): return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"): return False
    took = [libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(took)
