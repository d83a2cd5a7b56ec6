"""The analysis's page size: its arrays on ordinary 4 KiB pages, not transparent huge pages.

numpy asks the kernel for 2 MiB pages (madvise MADV_HUGEPAGE) for every array of 4 MiB or more.
The analysis makes thousands of such arrays and drops them soon after; each huge page is zeroed
whole at its first touch, however little of it is used, and after `analysis.pebble` forks its
side-by-side parts, the first write to a huge page the processes share copies all 2 MiB. At
1 M events, perf put 36 % of `analysis.pebble`'s CPU time in the kernel's zeroing of huge pages.
pyarrow's default memory pool (mimalloc) takes huge pages for its arenas too: the load of that
run spent 0.6-1.5 s in the kernel with it, 0.3 s with the system allocator. With both off, the
run took 4.76 s instead of 6.81 s, its system time 1.25 s instead of 3.5 s (README, "Analysis
speed").

The command-line tools (`analysis.pebble`, `.whatif`, `.compare`, `.figures`) call
`small_pages()` first; the library itself leaves numpy's and pyarrow's settings alone, so
importing `analysis` changes nothing in a notebook.
"""
from __future__ import annotations

import os


def small_pages() -> bool:
    """From now on (and in forked children), numpy asks for no huge pages for its arrays and
    pyarrow allocates through the system allocator; -> whether numpy had been asking. An
    explicit choice in the environment wins: NUMPY_MADVISE_HUGEPAGE=1 keeps numpy's huge pages,
    ARROW_DEFAULT_MEMORY_POOL pyarrow's pool."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow  # here: small_pages() runs before anything large is imported
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    if os.environ.get("NUMPY_MADVISE_HUGEPAGE", "") == "1":
        return True
    return bool(numpy_multiarray()._set_madvise_hugepage(False))


def numpy_multiarray():
    """numpy's C core module, which holds its huge-page switch (`_set_madvise_hugepage(on)` ->
    the previous setting)."""
    try:
        from numpy._core import multiarray            # numpy >= 2
    except ImportError:                                 # pragma: no cover (numpy 1.x)
        from numpy.core import multiarray  # numpy 1.x's name for it
    return multiarray
