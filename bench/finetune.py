"""`sam-jax finetune` per mode: steps/s, examples/s and peak memory, each mode in its own process.

    python -m bench.finetune                                  # vit_b, float32, 1024 px, 64 masks per image
    python -m bench.finetune --models vit_b vit_h --dtype bfloat16 --steps 30    # on an accelerator
    python -m bench.finetune --models tiny --images 8 --steps 4 --masks 4        # a quick check

Each (model, mode) runs `train.finetune.finetune` in a child process on random weights (a sam-jax
checkpoint of the model, written once) and synthetic shapes at 768 x 1024 written as COCO (so the
model input is 1024 px for the official models), with the paper's masks per image and interactive
iterations. Rows:

* steps/s and examples/s of training, from metrics.jsonl (the Trainer's rates leave out compilation);
* decoder mode, twice: the first epoch, whose images are encoded first (the cache fill, timed with the
  encoder's compilation), and the later epochs, which read the cache only;
* peak memory: the process's peak RSS (VmHWM) and, on an accelerator, the device's peak bytes in use.

Results go to bench/results_finetune.json (one row per model, dtype and mode, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import device_peak_bytes, process_memory_mb

RESULTS = Path(__file__).with_name("results_finetune.json")
MODES = ("decoder", "lora", "full")


def prepare(root: Path, model: str, images: int) -> tuple[Path, Path]:
    """A sam-jax checkpoint of `model` with random weights and `images` shapes written as COCO -> (checkpoint, json)."""
    import jax

    from sam_jax.checkpoint import save_params
    from sam_jax.config import get_config
    from sam_jax.model import init_params
    from sam_jax.train.coco import write_coco
    from sam_jax.train.shapes import make_shapes

    config = get_config(model)
    checkpoint = root / f"{model}_random"
    if not checkpoint.exists():
        save_params(checkpoint, jax.device_get(init_params(config, jax.random.key(0))), config)
    data = root / "data" / "instances.json"
    if not data.exists():
        make_shapes(root / "data" / "images", images, seed=0, image_size=(768, 1024), min_shapes=6, max_shapes=64)
        write_coco(root / "data" / "images", data)
    return checkpoint, data


def child(args: argparse.Namespace) -> dict:
    """One fine-tune in this process -> its row."""
    from sam_jax.train import finetune as ft

    scan = ft.scan_training_data
    timed: dict[str, float] = {}

    def timed_scan(*a, **k):
        t = time.perf_counter()
        out = scan(*a, **k)
        timed["scan_s"] = time.perf_counter() - t
        return out

    ft.scan_training_data = timed_scan
    workdir = Path(args.workdir)
    overrides = [
        f"batch_size={args.batch}",
        f"data.masks_per_image={args.masks}",
        f"dtype={args.dtype}",
        f"remat={args.remat}",
        "eval_images=1",
        "eval_every=0",
        "log_every=1",
        f"checkpoint.every={10 * args.steps}",
    ]
    report = ft.finetune(args.checkpoint, args.data, workdir, mode=args.mode, steps=args.steps, overrides=overrides)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]  # the first step's rate holds no compile
    steps_per_s = sorted(rates)[len(rates) // 2] if rates else float("nan")
    row = {
        "model": args.model,
        "dtype": args.dtype,
        "mode": args.mode,
        "batch": args.batch,
        "masks_per_image": args.masks,
        "steps_per_s": steps_per_s,
        "examples_per_s": steps_per_s * args.batch,
        "peak_rss_mb": process_memory_mb(),
        "device_peak_mb": None if (peak := device_peak_bytes()) is None else peak / 2**20,
        "images": report["data"]["images"],
    }
    if args.mode == "decoder":  # the first epoch encodes its images (scan_s), later epochs read the cache
        epoch_train_s = report["data"]["images"] / row["examples_per_s"]
        row["first_epoch_examples_per_s"] = report["data"]["images"] / (timed["scan_s"] + epoch_train_s)
        row["later_epochs_examples_per_s"] = row["examples_per_s"]
        row["encode_s_per_image"] = timed["scan_s"] / report["data"]["images"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_b"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true", help="rematerialise the encoder's blocks (full and lora modes)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--masks", type=int, default=64, help="masks per image (the paper's 64)")
    p.add_argument(
        "--root", default=None, help="where the checkpoints, data and work directories go (default: a temp dir)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_finetune_"))
    rows = []
    for model in args.models:
        checkpoint, data = prepare(root, model, args.images)
        for mode in args.modes:
            cmd = [sys.executable, "-m", "bench.finetune", "--child", "--model", model, "--mode", mode]
            cmd += ["--checkpoint", str(checkpoint), "--data", str(data), "--workdir", str(root / f"{model}_{mode}")]
            cmd += ["--dtype", args.dtype, "--steps", str(args.steps), "--batch", str(args.batch)]
            cmd += ["--masks", str(args.masks)] + (["--remat"] if args.remat else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
            if out.returncode or not found:
                print(f"{model} {mode}: failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(found[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    key = lambda r: (r["model"], r["dtype"], r["mode"])  # noqa: E731
    merged = {key(r): r for r in old} | {key(r): r for r in rows}
    from sam_jax.files import write_json

    write_json(RESULTS, list(merged.values()), indent=1)


if __name__ == "__main__":
    main()
