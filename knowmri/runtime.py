"""Process settings for fast CPU runs: reuse freed memory instead of mapping fresh pages.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc serves large requests (over
128 KiB to 32 MiB, adaptively) with a fresh `mmap` and unmaps them on free, so a method that
allocates the same big activations thousands of times (causal tracing's batches, logits of a
50k-word vocabulary) page-faults and zeroes every one of them again: ~800k page faults and ~7%
of causal tracing's time on SmolLM2. While methods run, `reuse_freed_memory` has glibc keep
freed memory in the heap instead (the effect PyTorch's tuning guide gets from jemalloc or
tcmalloc); afterwards it restores glibc's defaults and gives the free memory back.

Only glibc (Linux) is touched; elsewhere, or with KNOWMRI_MALLOC_TUNING=0, it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
#: glibc's documented defaults, restored afterwards.
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024}
_DURING = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 * 2**20}

_lock = threading.Lock()
_depth = 0


@cache
def _glibc() -> Any | None:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def malloc_tuning_enabled() -> bool:
    """Whether `reuse_freed_memory` changes anything here (glibc, and not turned off by KNOWMRI_MALLOC_TUNING=0)."""
    return os.environ.get("KNOWMRI_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off") \
        and _glibc() is not None


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside, freed memory stays in the process heap for the next allocation (no mmap per big tensor).

    Re-entrant and thread-safe: the settings are process-wide, set by the first context to enter
    and restored (with the free memory returned to the system) when the last one leaves."""
    global _depth
    libc = _glibc() if malloc_tuning_enabled() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            for param, value in _DURING.items():
                libc.mallopt(param, value)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
