"""The C library's heap: freed memory handed back to the system.

glibc keeps freed blocks that are not at the top of its heap (and in per-thread arenas) for reuse, so a
process whose allocations vary in size under traffic keeps its high-water mark resident. `malloc_trim`
returns the free pages of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once (madvise for huge pages, malloc_trim here)."""
    library = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    library.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return library


def trim_heap() -> bool:
    """Returns the heap's free pages to the system; False where the C library has no malloc_trim (not glibc)."""
    if not hasattr(libc(), "malloc_trim"):
        return False
    libc().malloc_trim(0)
    return True
