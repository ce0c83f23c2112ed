"""Shared fixtures: the tiny config, a randomized official model, its converted params, a photo.

In CI (CI=true) a skipped test fails the run: the parity tests must run there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

# Unoptimized XLA:CPU code (LLVM at -O0): most tests compile far more than they compute, and this
# halves their compile times (the suite takes ~0.8x the time). Every side of a comparison runs the
# same way; `make demo` and `bench/` keep the default. Set before JAX initialises its backend; flags
# in the caller's XLA_FLAGS still apply. A test marked `optimized` trains for hundreds of steps,
# where -O0 code runs ~2.3x slower: it runs in a child pytest process that keeps XLA's default.
FAST_COMPILE = "--xla_backend_optimization_level=0"
OPTIMIZED_CHILD = "SAM_JAX_TEST_OPTIMIZED_CHILD"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", "") and not os.environ.get(OPTIMIZED_CHILD):
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """An `optimized` test's body runs in a child pytest process (its fixtures are made there); its
    failure, with the child's output, is this test's failure."""
    if pyfuncitem.get_closest_marker("optimized") is None or os.environ.get(OPTIMIZED_CHILD):
        return None
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != FAST_COMPILE)
    # PYTEST_ADDOPTS is the parent's (it may name xdist options the child, without xdist, rejects).
    env = {**os.environ, OPTIMIZED_CHILD: "1", "XLA_FLAGS": flags, "PYTEST_ADDOPTS": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    done = subprocess.run(cmd, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not re.search(r"^1 passed( in|, \d+ warnings? in)", done.stdout, re.M):
        pytest.fail(f"in a child process (rc {done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}")
    return True


@pytest.fixture(scope="session", autouse=True)
def _give_freed_memory_back():
    """The suite's processes run many models: the CLI and demo commands called in-process keep glibc's
    default of giving freed memory back (sam_jax/host_memory.py; tests/test_host_memory.py checks the
    retaining in subprocesses)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sam_jax.host_memory.retain_freed_memory", lambda: False)
        yield


@pytest.fixture(scope="session")
def tiny_config():
    from sam_jax.config import tiny

    return tiny()


@pytest.fixture(scope="session")
def official_tiny(tiny_config):
    from bench.official import build_official, randomize_

    return randomize_(build_official(tiny_config), seed=0)


@pytest.fixture(scope="session")
def tiny_params(official_tiny, tiny_config):
    from bench.official import state_dict_numpy
    from sam_jax.convert.state_dict import to_flax

    return to_flax(state_dict_numpy(official_tiny), tiny_config)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real, non-square photo: scikit-image's cat (300 x 451 x 3 uint8)."""
    from skimage import data

    return data.chelsea()


def pytest_sessionfinish(session, exitstatus):
    """Under CI a skipped test is a failure: the reference (parity) tests must run there."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        print(f"\nFAILED: {len(skipped)} test(s) skipped under CI=true; the reference tests must run there.")
        session.exitstatus = 1
