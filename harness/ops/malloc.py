"""The C allocator's policy for freed memory: `malloc=keep` (the default) or `malloc=system`.

glibc's malloc hands a freed block back to the kernel when it is large (at least the mmap
threshold: 128 KiB at first, then adjusted up to the largest block freed so far, at most
32 MiB) or when more than the trim threshold (twice that) lies free at the top of the heap.
The next tensor of that size then costs one page fault per 4 KiB page it touches. On the
virtual machine this project is developed on a fault costs up to ~14 µs (one `analysis.pebble`
run: 248,000 faults, 3.5 s of system time), so re-faulting a 2.6 MiB activation (665 pages)
costs up to ~9 ms. PyTorch's CPU tensors come from this allocator (posix_memalign), ours
and the peer's alike.

`keep` sets the mmap threshold to glibc's maximum (32 MiB) and the trim threshold to 2 GiB
(mallopt), so freed blocks below 32 MiB stay in the process for the next tensor, as PyTorch's
CUDA caching allocator keeps device memory. What it costs: the resident size does not shrink
after a peak (up to 2 GiB of free heap is kept). `system` leaves glibc's own policy.

Measured (README "The allocator"): naive ours/PyTorch's 1.03-1.07 under glibc's policy,
0.96-1.00 under keep, both sides under the same policy. Where glibc is not the C library
(macOS, musl), `apply` does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

POLICIES = ("keep", "system")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 2**20                        # glibc's maximum (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1                         # mallopt takes an int


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()   # glibc only (musl has no such function)
        return libc
    except (OSError, AttributeError):
        return None


def apply(policy: str) -> str:
    """Set the allocator's policy for this process (before the memory it should govern is
    freed); -> what holds now, for meta.json: "keep", "system", or "system (why)" where keep
    could not be set."""
    if policy not in POLICIES:
        raise ValueError(f"malloc={policy}: must be one of {', '.join(POLICIES)}")
    if policy == "system":
        return "system"
    libc = _glibc()
    if libc is None:
        return "system (keep needs glibc; this C library is not)"
    # mallopt -> 1 on success; either one alone would leave the other at a value that makes
    # things worse (setting one turns off glibc's adjustment of both)
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "system (glibc refused mallopt)"
    return "keep"


def trim() -> bool:
    """Hand the heap's free memory back to the kernel now (glibc's malloc_trim): for a
    process that frees much and lives on, such as the analysis between chunks of steps; ->
    whether anything was released (False without glibc)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
