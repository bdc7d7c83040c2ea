"""Keeping freed memory for the next unit instead of handing it back to the kernel.

Every unit of a merge allocates the same few slice-sized tensors (inputs in the work dtype,
temporaries, the result cast to the output dtype) and frees them. glibc returns large freed
blocks to the kernel (``munmap``, or trimming the heap's top), so the next unit's tensors fault
every page in afresh: about half a weighted sum's system time. While a merge runs, blocks up to
``MMAP_THRESHOLD`` come from the heap and the heap keeps up to the memory budget of free memory;
afterwards the heap keeps what glibc's own adaptive thresholds reach at most (blocks under
32 MiB from the heap, 64 MiB of free top kept; setting them stops the adaptation) and the free
memory is released (``malloc_trim``). Measured on a weighted sum of two 520 MB fp16 files: minor page faults
92,000-146,000 -> 29,000-40,000, system time -40 to -50%, the same peak private memory.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Iterator

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks below this come from the heap (glibc's largest adaptive threshold on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: the free top of the heap kept after a merge (glibc's adaptive value for that threshold)
_AFTER_TRIM = 2 * MMAP_THRESHOLD


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (musl and others lack it)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory(keep_bytes: int) -> Iterator[None]:
    """While the block runs, keep up to ``keep_bytes`` of freed memory for reuse."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, max(int(keep_bytes), _AFTER_TRIM))
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
        libc.malloc_trim(0)
