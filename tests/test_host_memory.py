"""`sam_jax.host_memory`: XLA:CPU's per-call scratch memory is reused, not faulted in afresh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam_jax.host_memory import _glibc

# Allocates, touches and frees a 48 MB buffer (more than glibc's largest mmap threshold, as
# XLA:CPU's per-step temporaries are) a few times, and prints the minor page faults of the
# last 4 rounds. The buffer is a numpy array, or a block from malloc itself: numpy asks for
# huge pages on its large arrays (madvise) on its own, glibc does not unless told to.
# "thread": an 80 MB malloc'd block in a new thread, which glibc serves from that thread's
# own arena, as it does XLA:CPU's worker threads (past the 64 MB of such an arena's heaps).
_SCRIPT = """
import ctypes, resource, sys, threading
import numpy as np
from sam_jax.host_memory import retain_on_cpu
if sys.argv[1] == "retain":
    assert retain_on_cpu()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def round_trip():
    if sys.argv[2] == "numpy":
        np.empty(12 << 20, np.float32).fill(1.0)
    else:
        size = (80 if sys.argv[2] == "thread" else 48) << 20
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
def measure(out):
    for _ in range(2):
        round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        round_trip()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
if sys.argv[2] == "thread":
    worker = threading.Thread(target=measure, args=(out,))
    worker.start()
    worker.join()
else:
    measure(out)
print(out[0])
"""


def _faults(mode: str, allocator: str = "numpy", **env_vars: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # conftest's opt-out
    env.update(env_vars)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, allocator],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt's parameters are glibc's (Linux)")
def test_retained_memory_is_not_faulted_in_again():
    default, retained = _faults("default"), _faults("retain")
    # By default each round maps its 48 MB afresh and faults every page in again (12k faults
    # a round, fewer with transparent huge pages); retained, the freed block is reused.
    assert default >= 100, default
    assert retained < default / 20, (retained, default)


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


@pytest.mark.skipif(
    _glibc() is None or _thp_mode() != "madvise",
    reason="glibc's hugetlb tunable asks for huge pages with madvise: it matters where THP is in madvise mode",
)
def test_hugetlb_tunable_maps_large_blocks_with_huge_pages():
    """What `make demo` sets for XLA:CPU's scratch blocks over 64 MB (which glibc always maps
    afresh): with `glibc.malloc.hugetlb=1` a mapped block faults in 2 MB at a time, not 4 kB."""
    default = _faults("default", "malloc")
    huge = _faults("default", "malloc", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert default >= 4 * 12_000 * 0.9, default  # 4 rounds of 48 MB in 4 kB pages
    assert huge < default / 10, (huge, default)  # ~23x fewer here (2026-11-27)


@pytest.mark.skipif(
    _glibc() is None or not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
    reason="glibc's hugetlb tunable takes a huge page size the kernel offers: 1 GiB here",
)
def test_hugetlb_page_size_keeps_a_threads_large_blocks():
    """What `make demo` sets where the kernel offers 1 GiB pages. A block over 64 MB that a
    thread mallocs and frees (XLA:CPU's worker threads and a step's scratch block) is mapped
    afresh every time, retained memory or not: it does not fit a thread's heap. With
    `glibc.malloc.hugetlb=1073741824` a thread's heaps may grow to 4 GiB, so the block stays
    in the process and is reused (the huge pages themselves are only tried: none are reserved)."""
    default = _faults("retain", "thread")
    sized = _faults("retain", "thread", GLIBC_TUNABLES="glibc.malloc.hugetlb=1073741824")
    assert default >= 4 * 20_000 * 0.9, default  # 4 rounds of 80 MB in 4 kB pages: 81,924 here
    assert sized < 100, (sized, default)
