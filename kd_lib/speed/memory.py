"""Freed memory kept for reuse within an epoch and handed back after it: `keep_freed_memory` and `FreedMemory`, the
callback every fit adds (`kd_lib.recipes.fitting.fit`).

glibc's malloc maps a block of more than 128 KB (a threshold it raises as such blocks are freed, up to 32 MB) from
the system afresh and hands it back when it is freed, and it trims the top of its heap as soon as 128 KB or more is
free there. A training step allocates and frees the same large tensors every step (weight-sized gradients, Adam's
work, activations), so every step the kernel faults in and zero-fills their pages again. Kept instead, the freed
blocks fragment the heap over a long fit and its free pages add up (book/performance.md), so they are handed back
once an epoch. Neither changes a number a model computes, only where its tensors live.
"""
import ctypes
import sys
from functools import cache

from fastai.callback.core import Callback

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "hand_back_freed_memory", "FreedMemory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2 ** 20  # blocks up to this size come from the heap (glibc's largest on 64-bit systems)
TRIM_THRESHOLD = 2 ** 30  # the heap's free top is handed back only past this size


@cache
def _glibc():
    "The process's C library where it is glibc (Linux), else None."
    if not sys.platform.startswith("linux"): return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@cache
def keep_freed_memory() -> bool:
    """Have the process's malloc keep freed blocks for the next allocation instead of handing them back to the
    system (`MMAP_THRESHOLD`, `TRIM_THRESHOLD`): a training step stops paying page faults for its memory. Once per
    process; True where it took, False where malloc is not glibc's (macOS, Windows, musl), which leaves everything
    as it was."""
    if (libc := _glibc()) is None: return False
    took = [libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(took)


def hand_back_freed_memory() -> bool:
    """Hand the free pages of every malloc arena back to the system (glibc's `malloc_trim`), wherever in the heap
    they lie; True where malloc is glibc's. What is in use stays where it is."""
    if (libc := _glibc()) is None: return False
    libc.malloc_trim(0)
    return True


class FreedMemory(Callback):
    """Keep freed memory for the next training step (`keep_freed_memory`) and hand it back after every epoch
    (`hand_back_freed_memory`): a fit's memory stays that of an epoch, however many epochs it runs."""
    order = 0

    def before_fit(self): keep_freed_memory()
    def after_epoch(self): hand_back_freed_memory()
    def after_fit(self): hand_back_freed_memory()
