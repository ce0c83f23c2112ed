"""Timing, FLOP counting and reporting shared by the cases.

A case returns `Row`s: one measured quantity (seconds or MB) for ours and for the
official package, their ratio official/ours (> 1: ours is faster or smaller), the single
runs, a `check` that both produced the same thing, and case-specific `extra` numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Row:
    """One line of the table (and one entry of the JSON's `rows`)."""

    name: str  # unique key, e.g. "encoder_b1"
    case: str  # the --cases group it belongs to
    label: str  # what the line measures, for the table
    unit: str  # "s" or "MB"
    ours: float | None  # None only where a run measured the official side alone
    official: float | None  # None where the official package has no counterpart (training)
    ours_runs: list[float] = dataclasses.field(default_factory=list)
    official_runs: list[float] = dataclasses.field(default_factory=list)
    check: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"ok": bool, ...}
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """official / ours: how many times faster (or smaller) ours is."""
        return None if self.official is None or self.ours is None else self.official / self.ours

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


# ----------------------------------------------------------------------------- timing


# An idle pause before each timed call, so that no call starts while the other side's worker
# threads still spin (OpenMP keeps them busy for a while after a parallel region) and each
# starts from the same scheduler state. On a busy 2-core machine this matters a lot: the
# official encoder of the tiny model took 1.07 s called back to back and 0.03-0.09 s after
# a 50 ms pause (PyTorch's OpenMP barriers wait for every thread, and a thread that another
# process has preempted stalls them all).
PAUSE_S = 0.2


def time_call(fn: Callable[[], Any], pause: float = 0.0) -> float:
    """Wall seconds of one call (after `pause` idle seconds, not counted); `fn` must return
    only once its result is computed."""
    if pause:
        time.sleep(pause)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_pair(
    ours: Callable[[], Any], official: Callable[[], Any], repeats: int, warmup: int = 1
) -> tuple[list[float], list[float]]:
    """Alternate the two implementations: `warmup` untimed calls each, then `repeats` timed
    rounds of ours, official, each call after `PAUSE_S`. Returns the run times (ours, official)."""
    for _ in range(warmup):
        ours()
        official()
    a, b = [], []
    for _ in range(repeats):
        a.append(time_call(ours, PAUSE_S))
        b.append(time_call(official, PAUSE_S))
    return a, b


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed_row(name: str, case: str, label: str, ours: list[float], official: list[float], **kw) -> Row:
    """A row of times from `time_pair`: the medians, with the runs kept."""
    return Row(name, case, label, "s", median(ours), median(official), ours, official, **kw)


# ----------------------------------------------------------------------------- machine rates


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured float32 matrix-product rates (GFLOP/s, median of `repeats`) of an (n, n) @ (n, n)
    product in XLA (jax) and in PyTorch: the yardstick for the models' achieved rates."""
    import jax
    import jax.numpy as jnp
    import torch

    flop = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    jax_t = median([time_call(lambda: mm(a).block_until_ready(), PAUSE_S) for _ in range(repeats)])
    t = torch.from_numpy(np.array(a))  # a writable copy
    t @ t
    torch_t = median([time_call(lambda: t @ t, PAUSE_S) for _ in range(repeats)])
    return {"n": n, "jax_gflops": flop / jax_t / 1e9, "torch_gflops": flop / torch_t / 1e9}


def cpu_description() -> dict[str, Any]:
    """The CPU a run measured: its model name and vector extensions, which set the float32 matrix-product
    rates of both packages (from Linux's /proc/cpuinfo; elsewhere `platform.processor()` alone)."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"processor": platform.processor() or platform.machine()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            break  # the first processor's block ends at an empty line
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name", platform.processor() or platform.machine()),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
    }


def xla_flops(jitted, *args, **kwargs) -> float:
    """FLOPs of one call of a jitted function, from XLA's cost analysis of its lowered HLO.

    The lowered (not compiled) module is analysed, so no second compilation is paid; the
    count agrees with the compiled module's within a fraction of a percent. A loop body
    (`lax.scan`) may be counted once, whatever its trip count. It is lowered for the CPU
    whatever the default backend (a GPU's lowered module has no cost analysis).
    """
    lowered = jitted.trace(*args, **kwargs).lower(lowering_platforms=("cpu",))
    cost = lowered.cost_analysis()
    if cost is None:  # some jax versions analyse only compiled modules when the default backend is a GPU
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def rate_extra(flop: float, ours_s: float, official_s: float | None, matmul: dict[str, float]) -> dict[str, float]:
    """GFLOP of one call and the rates both sides achieve, also as fractions of the measured
    matrix-product rate (XLA's for ours, PyTorch's for the official)."""
    out = {"gflop": flop / 1e9, "ours_gflops": flop / ours_s / 1e9}
    out["ours_fraction_of_matmul"] = out["ours_gflops"] / matmul["jax_gflops"]
    if official_s is not None:
        out["official_gflops"] = flop / official_s / 1e9
        out["official_fraction_of_matmul"] = out["official_gflops"] / matmul["torch_gflops"]
    return out


# ----------------------------------------------------------------------------- memory


def process_memory_mb(field: str = "VmHWM") -> float | None:
    """A memory field of /proc/self/status, MB: "VmHWM" (this process's peak resident set, the
    default) or "VmRSS" (its resident set now); None where the system has no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    raise RuntimeError(f"no {field} in /proc/self/status")


def device_peak_bytes() -> int | None:
    """The first local device's peak bytes in use (an accelerator's allocator); None on a device that
    keeps no such count (the CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def peak_memory_bytes() -> int | None:
    """The peak memory of this run, bytes: the first local device's peak (an accelerator's
    allocator), else this process's peak resident set (the CPU, where arrays live in host memory);
    None where neither is known."""
    device = device_peak_bytes()
    if device is not None:
        return device
    host = process_memory_mb()
    return None if host is None else int(host * 2**20)


# ----------------------------------------------------------------------------- output


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} MB" if unit == "MB" else f"{value:.3g} s"


def _check_text(check: dict[str, Any]) -> str:
    if not check:
        return ""
    details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items() if k != "ok")
    return ("ok" if check.get("ok") else "MISMATCH") + (f" ({details})" if details else "")


def format_table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table: label, ours, official, official/ours, check."""
    lines = [("case", "ours", "official", "official/ours", "check")]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append((r.label, _fmt(r.ours, r.unit), _fmt(r.official, r.unit), ratio, _check_text(r.check)))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4] for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(s.rstrip() for s in out)
