"""Returning freed memory to the operating system."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Collect garbage and hand the heap's free pages back to the OS (glibc ``malloc_trim``); returns whether it could.

    PyTorch's CPU tensors live on the C heap. After a burst of short-lived large tensors (calibration keeps samples
    of every activation and searches ranges over them) glibc keeps the freed pages mapped, and whatever runs next
    (training) would stack its own peak on top of them in the resident set.
    """
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
