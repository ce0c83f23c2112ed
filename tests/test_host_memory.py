"""`sam_jax.host_memory`: XLA:CPU's per-call scratch memory is reused, not faulted in afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sam_jax.host_memory import _glibc

# Allocates, touches and frees a 48 MB buffer (more than glibc's largest mmap threshold, as
# XLA:CPU's per-step temporaries are) a few times, and prints the minor page faults of the
# last 4 rounds.
_SCRIPT = """
import resource, sys
import numpy as np
from sam_jax.host_memory import retain_on_cpu
if sys.argv[1] == "retain":
    assert retain_on_cpu()
def round_trip():
    a = np.empty(12 << 20, np.float32)
    a.fill(1.0)
for _ in range(2):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "SAM_JAX_RETAIN_HOST_MEMORY"}  # conftest's opt-out
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True, timeout=300, env=env
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt's parameters are glibc's (Linux)")
def test_retained_memory_is_not_faulted_in_again():
    default, retained = _faults("default"), _faults("retain")
    # By default each round maps its 48 MB afresh and faults every page in again (12k faults
    # a round, fewer with transparent huge pages); retained, the freed block is reused.
    assert default >= 100, default
    assert retained < default / 20, (retained, default)


def test_the_environment_can_opt_out():
    """conftest sets SAM_JAX_RETAIN_HOST_MEMORY=0 for this process: retain_on_cpu leaves malloc be."""
    from sam_jax.host_memory import retain_on_cpu

    assert os.environ["SAM_JAX_RETAIN_HOST_MEMORY"] == "0"
    assert retain_on_cpu() is False
