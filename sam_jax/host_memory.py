"""Host memory: keep XLA:CPU's per-call scratch memory in the process.

XLA:CPU mallocs an executable's temporaries at every call and frees them after it. glibc serves
large blocks with a fresh `mmap` and unmaps them on free, and gives a freed heap top back with
`trim`; so every call touches new pages, which the kernel must fault in and zero. The `make demo`
training step touched ~130 MB of fresh pages a step: ~32,500 minor page faults, and a quarter
of its CPU time in the kernel (0.065 of 0.25 CPU-s).

`retain_freed_memory` turns both off (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD,
2 GiB - 1)`, and `M_TOP_PAD` 64 MB: without it a thread's arena still unmaps a whole extra heap
once it is empty, and after ~1300 steps of one run the faults came back, ~110k a second, until
the pad was set in the running process): freed blocks stay in the process and the next call
reuses them. The same step then costs 0.103 s instead of 0.14 s on 2 CPU devices, best of
4 x 13 steps, with the same peak resident set (~2.1 GB; 2026-11-27). Its limit: a block over 64 MB malloc'd from a thread
with its own arena still gets its own `mmap` (glibc's per-thread heaps are 64 MB at most). The
same recipe with a 64-wide decoder allocates 84 MB a call that way and still faults (~5 steps/s
against ~9; forcing one arena, `M_ARENA_MAX` 1, removed those faults but cost the 32-wide step
0.161 s against 0.103 s). It is process-wide and cannot be undone: the resident
set stays near its peak between calls instead of shrinking. So only the programs that own their
process apply it, on the CPU backend: `sam-jax train` and `sam-jax engine` (config
`retain_host_memory`), the `sam-jax` commands that load a model, and `python -m sam_jax.demo`
(`make demo`). A library call (`Trainer`, `evaluate`, the predictor) never does it behind the
user's back: call `retain_on_cpu()` first to get it.

Past that limit: XLA:CPU takes all of a call's temporaries as one block (the
`preallocated-temp` allocation of its buffer assignment; `compiled.memory_analysis()
.temp_size_in_bytes`): 63.5 MiB for the `make demo` step without click maps, 68 MiB with them
(`tiny_p8`), 75 MB with a 48-wide decoder, 84 MB at 64 wide. glibc sizes a thread's heaps by
its hugetlb tunable (`GLIBC_TUNABLES`, read at process start, so set in the environment):
- `glibc.malloc.hugetlb=1073741824`, a huge page size the kernel offers (1 GiB:
  /sys/kernel/mm/hugepages/hugepages-1048576kB), lets a thread's heap grow to 4 x that size
  (glibc's `heap_max_size`), so such a block is kept and reused like the others. glibc only
  tries the huge pages themselves for a new heap and falls back to normal pages where none
  are reserved (HugePages_Total 0 here). `make demo` sets it where the kernel offers 1 GiB
  pages: the `tiny_p8` step then takes ~0 page faults instead of ~1,170 a step and ~9 ms of
  system time instead of 31-41, and costs ~4% more than the same step without click maps
  instead of ~17% (2 CPU devices, interleaved rounds of 20 steps); `make demo` trained in
  531 s instead of 662, bit for bit the same run (2026-11-28).
- `glibc.malloc.hugetlb=1` (glibc 2.35+; `make demo`'s fallback) asks for transparent huge
  pages on such mappings, so one fault maps 2 MB instead of 4 kB, but the block is still mapped
  and zeroed afresh each call: the 64-wide step then costs 0.154 s instead of 0.196 s (800
  faults a step instead of 43,000; the 32-wide step 0.098 s against 0.101 s; 2026-11-27).
  Where THP is off (`never` in /sys/kernel/mm/transparent_hugepage/enabled) it does nothing.
Neither does anything where the C library is not glibc. A 2 MB size makes a thread's heaps 8 MB
at most, which is worse: an 80 MB block then faults as without a tunable.
"""

from __future__ import annotations

import ctypes
import os
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
    """`retain_freed_memory` when JAX runs on the CPU (where XLA's buffers are host memory),
    unless the environment sets SAM_JAX_RETAIN_HOST_MEMORY=0 (the test suite does: its one
    long process runs many models, and should not keep every one's memory)."""
    import jax

    if os.environ.get("SAM_JAX_RETAIN_HOST_MEMORY", "1") == "0":
        return False
    return jax.default_backend() == "cpu" and retain_freed_memory()
