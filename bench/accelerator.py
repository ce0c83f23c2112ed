"""`python -m bench.accelerator`: image-encoder throughput on an accelerator.

    python -m bench.accelerator --out bench/results_gpu.json        # on a GPU machine
    python -m bench.accelerator --models tiny --batch 2 --iters 2   # a quick run anywhere

Each item is timed in this one process, on random weights, after a warm-up: our encoder
at batch `--batch` for each compute dtype and attention kernel (`ImageEncoderConfig.attention`),
the official encoder (PyTorch, `torch.autocast` bfloat16 and float32) on the same device
where torch sees one, and the bf16 matrix-product rate of both frameworks (8192^3), so
each encoder's TFLOP/s is also a fraction of what the chip's matrix units give that
framework. A last item compares our bfloat16 masks with our float32 masks on the photo
(`--agreement`). Items run in order of importance until `--budget-s` is spent; what ran
is written to `--out` after each item (atomically), so a cut-off run keeps its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.config import get_config
from sam_jax.model import SamModel, init_params


def _median_time(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def jax_matmul_tflops(n: int, dtype: str, iters: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / _median_time(lambda: f(a, b).block_until_ready(), iters) / 1e12


def torch_matmul_tflops(n: int, iters: int) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def run():
        a @ b
        torch.cuda.synchronize()

    return 2 * n**3 / _median_time(run, iters) / 1e12


def encoder_gflop(model: str) -> float:
    """GFLOP of one image through the encoder (`bench.cases.encoder_flops`: the official count)."""
    from bench.cases import encoder_flops

    return encoder_flops(get_config(model), 1) / 1e9


def ours_encoder(model: str, dtype: str, attention: str, batch: int, iters: int, params=None) -> dict[str, Any]:
    cfg = get_config(model)
    cfg = dataclasses.replace(
        cfg, dtype=dtype, image_encoder=dataclasses.replace(cfg.image_encoder, attention=attention)
    )
    if params is None:
        params = init_params(cfg, jax.random.key(0))
    sam = SamModel(cfg, params)
    x = jax.random.normal(jax.random.key(1), (batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
    t = time.perf_counter()
    jax.block_until_ready(sam.encode(x))
    first = time.perf_counter() - t
    s = _median_time(lambda: jax.block_until_ready(sam.encode(x)), iters)
    return {"seconds_per_batch": s, "images_per_s": batch / s, "first_call_s": first}


def official_encoder(model: str, batch: int, iters: int, autocast: bool) -> dict[str, Any]:
    import torch

    from bench.official import build_official

    net = build_official(get_config(model)).image_encoder.to("cuda").eval()
    x = torch.randn(batch, 3, 1024, 1024, device="cuda")

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            net(x)
        torch.cuda.synchronize()

    s = _median_time(run, iters)
    net = None  # free the module's GPU memory before emptying the cache
    torch.cuda.empty_cache()
    return {"seconds_per_batch": s, "images_per_s": batch / s}


def mask_agreement(model: str, impl: str, points: int) -> dict[str, Any]:
    """Our bfloat16 masks (attention `impl`) against our float32 masks on the photo: the IoU of
    each of the 3 multimask outputs of `points` single-point prompts (random weights made
    confident as in the CPU benchmark, `bench.models.build_pair`)."""
    from bench.models import build_pair, photo
    from sam_jax.predictor import SamPredictor

    pair = build_pair(model)
    image = photo()
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, image.shape[0], (points, 1, 2))
    labels = np.ones((points, 1), np.int32)
    out = {}
    for name, sam in (("float32", pair.ours), ("bfloat16", pair.ours.with_dtype("bfloat16").with_attention(impl))):
        pred = SamPredictor(sam)
        pred.set_image(image)
        out[name] = pred.predict(coords, labels)[0]  # (points, 3, H, W) bool
    ious = []
    for a, b in zip(out["float32"], out["bfloat16"]):
        for m32, m16 in zip(a, b):
            union = np.logical_or(m32, m16).sum()
            ious.append(1.0 if union == 0 else np.logical_and(m32, m16).sum() / union)
    return {
        "masks": len(ious),
        "mean_iou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "fraction_iou_ge_0.98": float(np.mean(np.array(ious) >= 0.98)),
    }


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accelerator", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_b,vit_h")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--attention", default="cudnn,chunked,xla", help="kernels timed for the first model (bf16)")
    p.add_argument("--fp32-attention", default="chunked", help="kernels timed for the first model in float32")
    p.add_argument("--no-official", action="store_true", help="skip the official model's timings")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--agreement", type=int, default=32, help="point prompts of the bf16/f32 mask check (0: skip)")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--out", type=Path, default=Path("bench/results_gpu.json"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    impls = [a for a in args.attention.split(",") if a]
    try:
        import torch

        has_torch_gpu = torch.cuda.is_available() and not args.no_official
    except ImportError:
        has_torch_gpu = False
    device = jax.devices()[0]
    results: dict[str, Any] = {
        "meta": {
            "jax": jax.__version__,
            "device": getattr(device, "device_kind", str(device)),
            "platform": device.platform,
            "batch": args.batch,
            "iters": args.iters,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "items": {},
    }
    if has_torch_gpu:
        results["meta"]["torch"] = torch.__version__

    def item(name: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() - start > args.budget_s:
            print(f"{name}: skipped (budget of {args.budget_s:.0f} s spent)", flush=True)
            results["items"][name] = {"skipped": "budget"}
        else:
            t = time.perf_counter()
            try:
                results["items"][name] = fn()
            except Exception as e:  # one broken item must not lose the others
                traceback.print_exc()
                results["items"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            results["items"][name]["wall_s"] = round(time.perf_counter() - t, 1)
            print(f"{name}: {json.dumps(results['items'][name])}", flush=True)
        _write(args.out, results)
        return results["items"][name]

    mm = (
        {}
        if not args.matmul_n
        else item("matmul_bf16_jax", lambda: {"tflops": jax_matmul_tflops(args.matmul_n, "bfloat16", args.iters)})
    )
    mm_torch = (
        item("matmul_bf16_torch", lambda: {"tflops": torch_matmul_tflops(args.matmul_n, args.iters)})
        if has_torch_gpu and args.matmul_n
        else {}
    )
    gflop = {
        m: item(f"gflop_{m}", lambda m=m: {"gflop_per_image": encoder_gflop(m)}).get("gflop_per_image") for m in models
    }

    def with_rate(r: dict, model: str, mm_rate: dict) -> dict:
        if "images_per_s" in r and gflop.get(model) and mm_rate.get("tflops"):
            r["tflops"] = r["images_per_s"] * gflop[model] / 1e3
            r["fraction_of_matmul"] = r["tflops"] / mm_rate["tflops"]
        return r

    best = {}
    for i, model in enumerate(models):
        params = init_params(get_config(model), jax.random.key(0))
        for impl in impls if i == 0 else [best.get("impl", impls[0])]:
            r = item(
                f"ours_{model}_bf16_{impl}",
                lambda model=model, impl=impl, params=params: with_rate(
                    ours_encoder(model, "bfloat16", impl, args.batch, args.iters, params), model, mm
                ),
            )
            if "images_per_s" in r and r["images_per_s"] > best.get("images_per_s", 0):
                best = {"impl": impl, "images_per_s": r["images_per_s"]}
        if has_torch_gpu:
            item(
                f"official_{model}_bf16_autocast",
                lambda model=model: with_rate(official_encoder(model, args.batch, args.iters, True), model, mm_torch),
            )
        params = None  # free this model's params before the next model's
    if has_torch_gpu:
        item(f"official_{models[0]}_fp32", lambda: official_encoder(models[0], args.batch, args.iters, False))
    for impl in [a for a in args.fp32_attention.split(",") if a]:
        item(
            f"ours_{models[0]}_fp32_{impl}",
            lambda impl=impl: ours_encoder(models[0], "float32", impl, args.batch, args.iters),
        )
    if args.agreement:
        item(
            f"agreement_{models[0]}_bf16_vs_fp32",
            lambda: mask_agreement(models[0], best.get("impl", "chunked"), args.agreement),
        )
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
