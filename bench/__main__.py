"""`python -m bench`: run the cases, print the table, write the JSON (see bench/NOTES.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from sam_jax.config import CONFIGS

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def _case_list(text: str) -> list[str]:
    from bench.cases import CASES

    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {unknown or text!r}; expected a comma-separated subset of {','.join(CASES)}"
        )
    return list(dict.fromkeys(names))


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from bench.cases import CASES

    p = argparse.ArgumentParser(prog="python -m bench", description="sam-jax against the official SAM, side by side.")
    p.add_argument(
        "--model", default="vit_b", choices=sorted(CONFIGS), help="model variant (random weights); default vit_b"
    )
    p.add_argument(
        "--cases",
        type=_case_list,
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all)",
    )
    p.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=3,
        help="timed runs of each side per case (median reported); default 3",
    )
    p.add_argument(
        "--warmup", type=_int_at_least(1), default=1, help="untimed runs of each side before timing; default 1"
    )
    p.add_argument(
        "--encoder-batches", type=_positive_ints, default=(1, 4), help="image encoder batch sizes; default 1,4"
    )
    p.add_argument(
        "--amg-points-per-side",
        type=_int_at_least(1),
        default=32,
        help="point grid of the mask generator in the amg and memory cases; default 32 (the official default)",
    )
    p.add_argument(
        "--official-device",
        default="cpu",
        help="torch device of the official model (cuda: on a GPU machine, beside ours on the GPU); default cpu",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT})")
    return p


def _meta(args: argparse.Namespace, threads: int) -> dict:
    import jax
    import torch

    from bench import models
    from bench.harness import cpu_description

    return {
        "model": args.model,
        "cases": args.cases,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "encoder_batches": list(args.encoder_batches),
        "amg_points_per_side": args.amg_points_per_side,
        "cpus": threads,
        "official_device": args.official_device,
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_description(),
        "loadavg_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "weights": f"random (bench.official.randomize_, seed 0), bench.official.sharpen_(**{models.SHARPEN})",
        "photo": "skimage.data.astronaut() 512x512",
    }


def run(args: argparse.Namespace) -> dict:
    from bench import models
    from bench.cases import CASES, Context
    from bench.harness import format_table, matmul_rates, write_json_atomic

    threads = models.set_torch_threads()
    matmul = matmul_rates()
    print(
        f"matrix products (float32): XLA {matmul['jax_gflops']:.0f} GFLOP/s, "
        f"PyTorch {matmul['torch_gflops']:.0f} GFLOP/s on {threads} CPUs",
        flush=True,
    )
    result = {"meta": _meta(args, threads), "matmul": matmul, "rows": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sam_jax_bench_") as tmp:
        pair = models.build_pair(args.model)
        pair.official.to(args.official_device)
        ctx = Context(
            args.model,
            pair,
            models.photo(),
            matmul,
            Path(tmp),
            args.repeats,
            args.warmup,
            args.encoder_batches,
            args.amg_points_per_side,
        )
        for name in args.cases:
            t = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            new = CASES[name](ctx)
            rows += new
            result["rows"].update({r.name: r.to_json() for r in new})
            result["meta"][f"{name}_wall_s"] = time.perf_counter() - t
            write_json_atomic(args.out, result)  # what has run so far survives a later failure
            print(format_table(new).split("\n", 2)[-1], flush=True)
    result["meta"]["loadavg_end"] = os.getloadavg()
    write_json_atomic(args.out, result)
    print()
    print(format_table(rows))
    print(f"\nwrote {args.out}")
    return result


def _check_out(parser: argparse.ArgumentParser, path: Path) -> None:
    """Refuse an --out that cannot be written before any case runs (not after an hour of them)."""
    if path.is_dir():
        parser.error(f"--out {path} is a directory; give a JSON file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {path}: cannot create its directory ({e.strerror})")
    if not os.access(path.parent, os.W_OK):
        parser.error(f"--out {path}: directory {path.parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    from bench.cases import BenchError

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_out(parser, args.out)
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    bad = [name for name, row in result["rows"].items() if not row["check"].get("ok", True)]
    if bad:
        print(f"MISMATCH between ours and the official outputs in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
