"""Host memory: keep XLA:CPU's per-call scratch memory in the process.

XLA:CPU mallocs an executable's temporaries at every call and frees them after it. glibc serves
large blocks with a fresh `mmap`, unmaps them on free and trims a freed heap top, so every call
touches new pages that the kernel must fault in and zero: for a small training step that is a
quarter of its CPU time.

`retain_freed_memory` turns this off (`mallopt(M_MMAP_MAX, 0)`, `M_TRIM_THRESHOLD` 2 GiB - 1,
`M_TOP_PAD` 64 MB, without which a thread's arena still unmaps a whole empty heap): freed blocks
stay in the process and the next call reuses them. It is process-wide and cannot be undone (the
resident set stays near its peak between calls), so only the programs that own their process
apply it, on the CPU backend: `sam-jax train`, `sam-jax engine` (config `retain_host_memory`),
the `sam-jax` commands that load a model, and `python -m sam_jax.demo`. A library call
(`Trainer`, `evaluate`, the predictor) never does it behind the user's back: call
`retain_on_cpu()` first to get it.

One limit remains. XLA:CPU takes all of a call's temporaries as one block
(`compiled.memory_analysis().temp_size_in_bytes`), and a block over 64 MB malloc'd from a thread
with its own arena still gets its own `mmap`: glibc's per-thread heaps are 64 MB at most. glibc
sizes those heaps by its hugetlb tunable (`GLIBC_TUNABLES`, read at process start):
- `glibc.malloc.hugetlb=1073741824`, a huge page size the kernel offers (1 GiB, listed under
  /sys/kernel/mm/hugepages/), lets a thread's heap grow to 4 x that size, so such a block is kept
  and reused like the others. glibc only tries huge pages for a new heap and falls back to normal
  pages where none are reserved. `make demo` sets it where the kernel offers 1 GiB pages: its
  training step then takes ~0 page faults instead of ~1,170 a step.
- `glibc.malloc.hugetlb=1` (glibc 2.35+; `make demo`'s fallback) asks for transparent huge pages
  on such mappings: one fault maps 2 MB instead of 4 kB, but the block is still mapped afresh
  each call. Where transparent huge pages are off it does nothing.
Neither does anything where the C library is not glibc. A 2 MB page size makes a thread's heaps
8 MB at most, which is worse.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB - 1
# A per-thread arena frees a whole extra heap (munmap) once it is empty, whatever the trim
# threshold, unless the top pad asks to keep that much: one heap's worth, 64 MB.
_TOP_PAD = 64 << 20

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and its parameters are glibc's)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process instead of returning it to the kernel.

    Returns True once applied (idempotent), False where the C library is not glibc (macOS,
    musl): there it does nothing.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success, 0 on error.
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    if not all(libc.mallopt(param, value) for param, value in settings):
        return False
    _applied = True
    return True


def retain_on_cpu() -> bool:
    """`retain_freed_memory` when JAX runs on the CPU (where XLA's buffers are host memory)."""
    import jax

    return jax.default_backend() == "cpu" and retain_freed_memory()
