"""`python -m bench.gpu`: every GPU figure in one run of a few minutes, on one GPU machine.

    python -m bench.gpu                 # on the GPU machine (JAX with CUDA, torch with CUDA for the official side)
    python -m bench.gpu --quick         # the same plumbing on tiny models, anywhere (a CPU check of the script)

Three steps, each in its own process (so each starts with the GPU's memory free), each writing
its JSON as it goes, so a step cut short keeps what it measured:

1. `bench.accelerator`: the image encoder's images/s at batch 8 in bf16, ours (each attention
   kernel) and the official one (`torch.autocast`), as fractions of each framework's measured
   bf16 matrix-product rate -> `bench/results_gpu.json`;
2. `bench.train_scale --run`: the paper's training recipe (1024 px, 64 masks, 1 + 8 + 2
   interactive passes, decoder remat, 8-mask chunks) for vit_b and vit_h in bf16 at one image
   per chip: images/s, MFU against the bf16 matrix-product rate, peak memory, and the encoder's
   and interactive loop's time -> `bench/results_gpu_train.json`;
3. `python -m bench --cases predict,amg --official-device cuda`: `predict` latency with 1 and 64
   prompts and the automatic mask generator (the official 32x32 grid), both packages on the GPU
   in float32, checked to agree -> `bench/results_gpu_predict_amg.json`.

Then it prints the README's GPU table from the three files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def steps(quick: bool, out: Path) -> list[tuple[str, list[str]]]:
    """(name, argv after `python -m`) of each step."""
    enc, train, pa = out / "results_gpu.json", out / "results_gpu_train.json", out / "results_gpu_predict_amg.json"
    if quick:
        return [
            ("encoder", ["bench.accelerator", "--models", "tiny", "--batch", "2", "--iters", "2",
                         "--attention", "xla", "--fp32-attention", "", "--matmul-n", "256", "--agreement", "0",
                         "--out", str(enc)]),
            ("train", ["bench.train_scale", "--run", "--models", "tiny", "--dtypes", "bfloat16", "--masks", "2",
                       "--remat-decoder", "1", "--steps", "1", "--out", str(train)]),
            ("predict_amg", ["bench", "--model", "tiny", "--cases", "predict,amg", "--repeats", "1",
                             "--amg-points-per-side", "4", "--out", str(pa)]),
        ]  # fmt: skip
    return [
        ("encoder", ["bench.accelerator", "--budget-s", "300", "--out", str(enc)]),
        ("train", ["bench.train_scale", "--run", "--models", "vit_b", "vit_h", "--dtypes", "bfloat16",
                   "--remat-decoder", "1", "--mask-chunk", "8", "--steps", "2", "--out", str(train)]),
        ("predict_amg", ["bench", "--model", "vit_b", "--cases", "predict,amg", "--repeats", "2",
                         "--official-device", "cuda", "--out", str(pa)]),
    ]  # fmt: skip


def table(out: Path) -> str:
    """The README's GPU table (markdown) from the three result files (rows of the steps that ran)."""
    lines = ["| case | sam-jax | official | official/ours |", "|---|---|---|---|"]
    enc = out / "results_gpu.json"
    if enc.exists():
        items = json.loads(enc.read_text())["items"]
        for name, r in items.items():
            if name.startswith("ours_") and "_bf16_" in name and "images_per_s" in r:
                model = name.split("_bf16_")[0][len("ours_") :]
                ref = items.get(f"official_{model}_bf16_autocast", {}).get("images_per_s")
                ratio = f"{r['images_per_s'] / ref:.1f}x" if ref else ""
                impl = name.split("_bf16_")[1]
                lines.append(
                    f"| {model} encoder, batch {json.loads(enc.read_text())['meta']['batch']}, bf16 ({impl}) "
                    f"| {r['images_per_s']:.1f} img/s | {f'{ref:.1f} img/s' if ref else ''} | {ratio} |"
                )
    train = out / "results_gpu_train.json"
    if train.exists():
        for r in json.loads(train.read_text()).get("runs", []):
            peak = (r.get("peak_memory_bytes") or 0) / 1e9
            lines.append(
                f"| {r['model']} training, paper's recipe, {r['dtype']}, 1 image/chip | {r['images_per_s']:.2f} img/s, "
                f"MFU {r['mfu']:.2f}, peak {peak:.1f} GB | (no training code) | |"
            )
    pa = out / "results_gpu_predict_amg.json"
    if pa.exists():
        for r in json.loads(pa.read_text())["rows"].values():
            if r.get("ours") and r.get("official"):
                ours, ref = r["ours"], r["official"]
                ok = "" if r["check"].get("ok", True) else " (outputs differ)"
                lines.append(f"| {r['label']}, float32 | {ours:.4g} s | {ref:.4g} s | {ref / ours:.2f}x{ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models: check the script itself, on any machine")
    p.add_argument("--only", default="", help="comma-separated steps to run (encoder,train,predict_amg)")
    p.add_argument("--out-dir", type=Path, default=ROOT, help="where the JSON files go (default bench/)")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {s for s in args.only.split(",") if s}
    failed = []
    for name, argv_ in steps(args.quick, args.out_dir):
        if wanted and name not in wanted:
            continue
        t = time.perf_counter()
        print(f"== {name}: python -m {' '.join(argv_)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", *argv_], cwd=ROOT.parent)
        print(f"== {name}: exit {rc} in {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print(table(args.out_dir))
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
