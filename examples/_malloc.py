"""glibc's malloc, set to keep the memory a training run frees for its next step.

XLA on CPU gives each step of the compiled training program one temporary buffer
(about 56 MiB for the example's defaults) and frees it when the step ends. glibc
serves an allocation that large with a fresh `mmap` and gives it back with `munmap`
when freed, so the next step faults every page of it in again: 14,000 page faults a
step, a third of the run's CPU time spent in the kernel. With one arena, no `mmap`
for large blocks and no trimming, the freed buffer stays in the heap and the next
step reuses it as it is.
"""

import ctypes
import ctypes.util
import platform

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed blocks instead of returning them to the
    kernel (one arena, no `mmap` for large blocks, no trimming). Takes effect for
    every thread started after it is called, so call it before JAX's first
    computation. Returns whether it did: `False` where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    settings = (
        # One arena: the main heap, which can hold blocks of any size (each other
        # arena's heap holds at most 64 MiB, and frees back to the kernel).
        (M_ARENA_MAX, 1),
        # Large blocks from the heap, not from mmap (where the heap cannot grow,
        # glibc still falls back to mmap).
        (M_MMAP_MAX, 0),
        # Never give the top of the heap back (the largest int).
        (M_TRIM_THRESHOLD, 2**31 - 1),
    )
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
