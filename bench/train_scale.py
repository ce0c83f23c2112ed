"""The training step's memory and FLOPs at the paper's scale, from XLA's compiled analysis, and the
step run on a device with its time, MFU and profile.

    python -m bench.train_scale                        # vit_b and vit_h, float32 and bf16, batch 1, fsdp 1 and 8
    python -m bench.train_scale --models vit_b --batches 1 2 4 --fsdp 1 --dtypes bfloat16
    python -m bench.train_scale --run --models vit_b --dtypes float32 --remat-decoder 1 --mask-chunk 8   # run it

The recipe is `train/configs/base.py` (1024 px, 64 masks per image, 1 + 8 + 2 interactive
iterations, drop path and layer decay of the model); the state and the batch are
`jax.ShapeDtypeStruct`s placed as the Trainer places them on a (data=1, fsdp=N) mesh of
simulated CPU devices, and the step is jitted as the Trainer jits it (state donated). For
each variant: `compiled.memory_analysis()` per device (arguments, outputs, aliased, temp; peak
= arguments + outputs - aliased + temp) and the largest per-chip batch that fits 80 and 16 GB
(from the peaks at the batches measured: measured when two or more, else peak(1) x batch).

FLOPs (`--flops`, one device, batch 1): XLA's cost analysis counts a loop body once, so the
step is split into pieces compiled alone: the encoder's forward + backward (a VJP of `encode`),
and the interactive loop's forward + backward (`train.step.interactive_loss` given the
embeddings), the latter as D(0) + n x (D(1) - D(0)) with D(i) the pieces with i later
iterations and n = 10, all masks at once (`loss.mask_chunk` changes the memory, not the FLOPs).
XLA:CPU's buffer assignment stands in for the accelerator's: the numbers are an estimate of the
device's, not a measurement on it.

`--run` runs the step instead, at batch 1 on one device of the default backend (the CPU, or the
accelerator where there is one): step seconds, images/s, the step's FLOPs (the split above) per
second as a fraction of the device's measured matrix-product rate in the compute dtype (the MFU;
float32 on a CPU), peak memory, and the pieces of the split run alone: where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.harness import peak_memory_bytes

RESULTS = Path(__file__).with_name("results_train_scale.json")
GB = 1e9
# The paper's per-model recipe values (appendix A): drop path, layer decay, peak lr.
PAPER = {
    "vit_b": dict(drop_path_rate=0.6, layer_decay=0.6, lr=8e-4),
    "vit_l": dict(drop_path_rate=0.4, layer_decay=0.8, lr=4e-4),
    "vit_h": dict(drop_path_rate=0.4, layer_decay=0.8, lr=8e-4),
}


def recipe(
    model: str = "vit_b",
    dtype: str = "float32",
    *,
    remat_encoder: bool = False,
    remat_decoder: bool = True,
    mask_chunk: int = 0,
    masks: int = 64,
    point_iters: int | None = None,
    no_point_iters: int | None = None,
):
    """`train/configs/base.py` for `model` with the paper's per-model values and the memory options."""
    from train.configs import base

    c = base.get_config()
    c.model = model
    c.dtype = dtype
    c.remat = remat_encoder
    p = PAPER.get(model, {})
    c.drop_path_rate = p.get("drop_path_rate", c.drop_path_rate)
    c.optim.layer_decay = p.get("layer_decay", c.optim.layer_decay)
    c.optim.lr = p.get("lr", c.optim.lr)
    c.data.masks_per_image = masks
    c.loss.remat_decoder = remat_decoder
    c.loss.mask_chunk = mask_chunk
    if point_iters is not None:
        c.loss.num_point_iters = point_iters
    if no_point_iters is not None:
        c.loss.num_no_point_iters = no_point_iters
    return c


def abstract_step(cfg, per_chip_batch: int, fsdp: int):
    """The jitted step of `cfg` on a (1, fsdp) mesh of the first `fsdp` devices, with its state and a
    batch of `per_chip_batch` x fsdp images as ShapeDtypeStructs placed as the Trainer places them,
    and the optimizer -> (step, state, batch, tx)."""
    import functools

    import jax
    import jax.numpy as jnp

    from sam_jax.model import abstract_params
    from sam_jax.train import sharding as shd
    from sam_jax.train.optim import make_optimizer
    from sam_jax.train.step import TrainBatch, init_state, train_step
    from sam_jax.train.trainer import loss_mask_size, model_config, state_shardings

    mc = model_config(cfg)
    mesh = shd.make_mesh(1, fsdp, devices=jax.devices()[:fsdp])
    boxed = abstract_params(mc, boxed=True)
    abstract = abstract_params(mc)
    tx, schedule, labels = make_optimizer(abstract, mc, cfg.optim)
    state_sh = state_shardings(tx, abstract, shd.logical_shardings(boxed, mesh), mesh)
    shapes = jax.eval_shape(functools.partial(init_state, tx=tx, seed=cfg.seed), abstract)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    bsh = shd.batch_sharding(mesh)
    b, k, s, m = per_chip_batch * fsdp, cfg.data.masks_per_image, mc.image_size, loss_mask_size(cfg, mc)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bsh)  # noqa: E731
    batch = TrainBatch(
        images=sds((b, s, s, 3), jnp.float32),
        masks=sds((b, k, m, m), jnp.bool_),
        valid=sds((b, k), jnp.bool_),
        ids=sds((b,), jnp.int32),
    )
    step = jax.jit(
        functools.partial(
            train_step,
            model_config=mc,
            cfg=cfg.loss,
            tx=tx,
            schedule=schedule,
            train_image_encoder=not cfg.optim.freeze_image_encoder,
            labels=labels,
        ),
        in_shardings=(state_sh, bsh),
        out_shardings=(state_sh, shd.replicated(mesh)),
        donate_argnums=0,
    )
    return step, state, batch, tx


def memory(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()` in bytes per device, with the peak estimate."""
    ma = compiled.memory_analysis()
    out = {
        name: int(getattr(ma, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0))


def analyze_step(cfg, per_chip_batch: int = 1, fsdp: int = 1) -> dict:
    """Compile the step of `cfg` (no run) -> memory per device (bytes), the step's raw FLOPs, compile seconds."""
    t = time.perf_counter()
    step, state, batch, _ = abstract_step(cfg, per_chip_batch, fsdp)
    compiled = step.lower(state, batch).compile()
    return {**memory(compiled), "step_flops_raw": flops(compiled), "compile_s": time.perf_counter() - t}


def step_pieces(cfg, counting: bool = True) -> dict[str, tuple]:
    """The step of one image (one device) in pieces compiled alone, as (jitted fn, abstract args):
    "encoder" (forward + backward: a VJP of `encode`, drop path on) and "loop_0" / "loop_1" (the
    interactive loss's forward + backward given the embeddings, with 0 and 1 later iterations).
    `counting`: all masks at once, for XLA's FLOP count (a `lax.map` over mask chunks would be
    counted once; the memory may not fit); else in `cfg`'s mask chunks, to run."""
    import functools

    import jax
    import jax.numpy as jnp

    from sam_jax.model import abstract_params, encode
    from sam_jax.train.step import TrainBatch, interactive_loss
    from sam_jax.train.trainer import loss_mask_size, model_config

    mc = model_config(cfg)
    params = abstract_params(mc)
    s, k, m = mc.image_size, cfg.data.masks_per_image, loss_mask_size(cfg, mc)
    sds = jax.ShapeDtypeStruct
    images, key = sds((1, s, s, 3), jnp.float32), sds((2,), jnp.uint32)
    emb = jax.eval_shape(functools.partial(encode, config=mc), params, images)  # ImageEmbeddings of shapes

    def enc(p, x, ct, kd):
        out, vjp = jax.vjp(lambda p: encode(p, x, config=mc, drop_path_rng=jax.random.wrap_key_data(kd)), p)
        return out, vjp(ct)

    batch = TrainBatch(
        images=images, masks=sds((1, k, m, m), jnp.bool_), valid=sds((1, k), jnp.bool_), ids=sds((1,), jnp.int32)
    )

    def dec(iters):
        c2 = recipe_copy(cfg, iters)
        if counting:
            c2.loss.mask_chunk = 0
        f = functools.partial(interactive_loss, model_config=mc, cfg=c2.loss)
        return jax.jit(jax.grad(lambda p, e, b, r: f(p, e, b, jax.random.wrap_key_data(r))[0], argnums=(0, 1)))

    return {
        "encoder": (jax.jit(enc), (params, images, emb, key)),
        "loop_0": (dec(0), (params, emb, batch, key)),
        "loop_1": (dec(1), (params, emb, batch, key)),
    }


def _split(per_piece: dict[str, float], cfg, unit: str) -> dict[str, float]:
    """Per-piece counts (FLOPs or seconds) -> the step's: encoder, first decode, one later
    iteration and the loop (first decode + n later iterations, n of the recipe)."""
    d0, d1 = per_piece["loop_0"], per_piece["loop_1"]
    n = cfg.loss.num_point_iters + cfg.loss.num_no_point_iters
    return {
        f"encoder_fwd_bwd{unit}": per_piece["encoder"],
        f"first_decode_fwd_bwd{unit}": d0,
        f"iteration_fwd_bwd{unit}": d1 - d0,
        f"loop_fwd_bwd{unit}": d0 + n * (d1 - d0),
    }


def compiled_pieces(cfg, counting: bool = True) -> dict[str, tuple]:
    """`step_pieces` compiled: {name: (compiled, abstract args)}."""
    return {name: (fn.lower(*args).compile(), args) for name, (fn, args) in step_pieces(cfg, counting).items()}


def flop_split(cfg, pieces: dict | None = None) -> dict[str, float]:
    """FLOPs of one image's step (one device): encoder forward + backward, interactive loop forward + backward
    (from `pieces`, `compiled_pieces(cfg)`, if given)."""
    pieces = compiled_pieces(cfg) if pieces is None else pieces
    return _split({name: flops(c) for name, (c, _) in pieces.items()}, cfg, "")


def random_like(tree, seed: int = 0):
    """Concrete arrays for a tree of ShapeDtypeStructs: floats normal, keys random bits, masks
    rectangles (a bool (B, K, m, m): each slot a box of 1/16 to 1/4 of the side), ints 0."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(x):
        if x.dtype == np.bool_ and len(x.shape) == 4:
            out = np.zeros(x.shape, bool)
            m = x.shape[-1]
            for i in np.ndindex(*x.shape[:2]):
                h, w = rng.integers(m // 16, m // 4, 2)
                y, z = rng.integers(0, m - h), rng.integers(0, m - w)
                out[i][y : y + h, z : z + w] = True
            return out
        if x.dtype == np.bool_:
            return np.ones(x.shape, bool)
        if x.dtype == np.uint32:
            return rng.integers(0, 2**32, x.shape, dtype=np.uint32)
        if np.issubdtype(x.dtype, np.floating):
            return rng.normal(size=x.shape).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)

    return jax.tree.map(draw, tree)


def run_step(cfg, steps: int = 2, profile: bool = True, report=None) -> dict:
    """Run the recipe's step at batch 1 on the default device (`cfg` on a 1-device mesh, params
    from the model's init, a random image and rectangle masks) -> compile seconds, the compiled
    memory analysis (as `analyze_step`'s), every step's seconds and their median, images/s, FLOP/s
    from the step's FLOP split (`flop_split`) and its fraction of the device's measured
    matrix-product rate in the compute dtype (the MFU; float32 on a CPU), the peak memory. With
    `profile`, each piece of `step_pieces` (in `cfg`'s mask chunks) then runs alone (a warm-up, then
    one timed call): where the step's time goes, and each part's MFU. `report(result)`, if given, gets
    the result before the profile runs."""
    import statistics

    import jax

    from bench.accelerator import jax_matmul_tflops
    from sam_jax.model import init_params
    from sam_jax.train.step import init_state
    from sam_jax.train.trainer import model_config

    mc = model_config(cfg)
    step, state, batch, tx = abstract_step(cfg, 1, 1)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    out = {"compile_s": time.perf_counter() - t, "compiled_memory": memory(compiled)}
    placed = jax.tree.map(lambda x: x.sharding, state)
    live = jax.jit(lambda key: init_state(init_params(mc, key), tx, cfg.seed), out_shardings=placed)(
        jax.random.key(cfg.seed)
    )
    data = jax.device_put(random_like(batch, cfg.seed))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        live, metrics = compiled(live, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    out["peak_memory_bytes"] = peak_memory_bytes()
    del compiled, data

    counted = compiled_pieces(cfg)
    split = flop_split(cfg, counted)
    total = split["encoder_fwd_bwd"] + split["loop_fwd_bwd"]
    on_cpu = jax.default_backend() == "cpu"
    mm_dtype = "float32" if on_cpu else cfg.dtype
    rate = jax_matmul_tflops(2048 if on_cpu else 8192, mm_dtype, 3 if on_cpu else 10) * 1e12
    median = statistics.median(times)
    out.update(
        step_s=times,
        median_step_s=median,
        images_per_s=1 / median,
        step_flops=total,
        flops_per_s=total / median,
        matmul_flops_per_s=rate,
        matmul_dtype=mm_dtype,
        mfu=total / median / rate,
        loss=float(metrics["loss"]),
        device=str(jax.devices()[0].device_kind),
        flop_split=split,
    )
    if report is not None:
        report(out)
    if profile:
        seconds = {}
        chunked = 0 < cfg.loss.mask_chunk < cfg.data.masks_per_image
        for name, (c, args) in (compiled_pieces(cfg, counting=False) if chunked else counted).items():
            concrete = (live.params, *jax.device_put(random_like(args[1:], cfg.seed)))
            jax.block_until_ready(c(*concrete))  # warm-up
            t = time.perf_counter()
            jax.block_until_ready(c(*concrete))
            seconds[name] = time.perf_counter() - t
        timed = _split(seconds, cfg, "_s")
        mfu = {f"{p}_mfu": split[f"{p}_fwd_bwd"] / timed[f"{p}_fwd_bwd_s"] / rate for p in ("encoder", "loop")}
        out["profile"] = {**timed, **mfu}
    return out


def recipe_copy(cfg, later_iters: int):
    """`cfg` with `later_iters` point iterations and none without a point."""
    c = cfg.copy_and_resolve_references()
    c.loss.num_point_iters = later_iters
    c.loss.num_no_point_iters = 0
    return c


# Dense bf16 peaks (FLOP/s) of the chips projected to, and the paper's vit_h schedule.
CHIPS = {"H100": 989e12, "TPU v5p": 459e12}
PAPER_SCHEDULE = {"steps": 90_000, "images_per_step": 256, "chips": 256, "hours": 68, "chip": "A100"}


def projection(results: dict, mfus: dict[str, float]) -> str:
    """A markdown table projecting images/s (= steps/s at one image per chip) per chip and the chip-hours
    of the paper's vit_h schedule from the bf16 FLOP split in `results` ("flops"), at each MFU of
    `mfus` (label -> fraction): a projection from FLOPs, not a measurement."""
    per_image = {
        r["model"]: r["encoder_fwd_bwd"] + r["loop_fwd_bwd"] for r in results["flops"] if r["dtype"] == "bfloat16"
    }
    sched = PAPER_SCHEDULE
    images = sched["steps"] * sched["images_per_step"]
    lines = [
        "| chip, MFU | " + " | ".join(f"{m} images/s per chip" for m in per_image) + " | vit_h schedule, chip-hours |",
        "|---" * (len(per_image) + 2) + "|",
    ]
    for chip, peak in CHIPS.items():
        for label, mfu in mfus.items():
            rates = [mfu * peak / f for f in per_image.values()]
            hours = images * per_image["vit_h"] / (mfu * peak) / 3600 if "vit_h" in per_image else float("nan")
            lines.append(f"| {chip}, {label} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {hours:,.0f} |")
    paper = sched["chips"] * sched["hours"]
    lines.append(f"| the paper: {sched['chips']} {sched['chip']} x {sched['hours']} h | | | {paper:,} |")
    return "\n".join(lines)


def fits(peaks: dict[int, int], capacity: float) -> int:
    """The largest per-chip batch whose peak fits `capacity` bytes, from peaks at measured batches
    (a line through the smallest and largest; one batch: proportional)."""
    bs = sorted(peaks)
    if len(bs) == 1:
        per = peaks[bs[0]] / bs[0]
        fixed = 0.0
    else:
        per = (peaks[bs[-1]] - peaks[bs[0]]) / (bs[-1] - bs[0])
        fixed = peaks[bs[0]] - per * bs[0]
    return max(int((capacity - fixed) // per), 0) if per > 0 else 0


def variants(args) -> list[dict]:
    out = []
    for model in args.models:
        for dtype in args.dtypes:
            for remat_enc in args.remat_encoder:
                for remat_dec in args.remat_decoder:
                    for chunk in args.mask_chunk:
                        out.append(
                            dict(
                                model=model,
                                dtype=dtype,
                                remat_encoder=bool(remat_enc),
                                remat_decoder=bool(remat_dec),
                                mask_chunk=chunk,
                            )
                        )
    return out


def _row(r: dict) -> str:
    g = lambda x: f"{x / GB:8.2f}"  # noqa: E731
    return (
        f"{r['model']:6} {r['dtype']:9} enc_remat={int(r['remat_encoder'])} dec_remat={int(r['remat_decoder'])} "
        f"chunk={r['mask_chunk']:2} b={r['batch']} fsdp={r['fsdp']}  arg {g(r['argument'])} out {g(r['output'])} "
        f"alias {g(r['alias'])} temp {g(r['temp'])} peak {g(r['peak'])} GB  ({r['compile_s']:.0f} s)"
    )


def _cfg(v: dict, masks: int):
    return recipe(
        v["model"],
        v["dtype"],
        remat_encoder=v["remat_encoder"],
        remat_decoder=v["remat_decoder"],
        mask_chunk=v["mask_chunk"],
        masks=masks,
    )


def run_main(args) -> None:
    """`--run`: `run_step` of each variant, printed and kept under "runs" in the results."""
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {"rows": [], "flops": []}

    def save(r):
        fields = ("model", "dtype", "remat_encoder", "remat_decoder", "mask_chunk", "masks", "device")
        results["runs"] = [x for x in results.get("runs", []) if any(x[f] != r[f] for f in fields)] + [r]
        path.write_text(json.dumps(results, indent=1))

    def step_line(r):
        save(r)
        print(
            f"{r['model']} {r['dtype']} on {r['device']}: step {r['median_step_s']:.2f} s "
            f"({', '.join(f'{t:.2f}' for t in r['step_s'])}), {r['images_per_s']:.3f} images/s, "
            f"{r['flops_per_s'] / 1e12:.3f} TFLOP/s of {r['step_flops'] / 1e12:.2f} TFLOP, MFU {r['mfu']:.3f} "
            f"(matmul {r['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s {r['matmul_dtype']}), "
            f"peak {(r['peak_memory_bytes'] or 0) / GB:.2f} GB, compile {r['compile_s']:.0f} s",
            flush=True,
        )

    for v in variants(args):
        r = {**v, "masks": args.masks}
        r.update(run_step(_cfg(v, args.masks), steps=args.steps, report=lambda out, r=r: step_line({**r, **out})))
        if "profile" in r:
            p = r["profile"]
            print(
                f"    encoder fwd+bwd {p['encoder_fwd_bwd_s']:.2f} s (MFU {p['encoder_mfu']:.3f}), interactive loop "
                f"{p['loop_fwd_bwd_s']:.2f} s (MFU {p['loop_mfu']:.3f}): first decode "
                f"{p['first_decode_fwd_bwd_s']:.2f} s, each later iteration {p['iteration_fwd_bwd_s']:.2f} s",
                flush=True,
            )
        save(r)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_h"], choices=["tiny", "vit_b", "vit_l", "vit_h"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1], help="images per chip")
    ap.add_argument("--fsdp", nargs="+", type=int, default=[1, 8], help="simulated devices on the fsdp axis")
    ap.add_argument("--remat-encoder", nargs="+", type=int, default=[1], help="encoder block remat: 0 and/or 1")
    ap.add_argument("--remat-decoder", nargs="+", type=int, default=[0, 1], help="decoder pass remat: 0 and/or 1")
    ap.add_argument("--mask-chunk", nargs="+", type=int, default=[0], help="masks per chunk (0: all)")
    ap.add_argument("--masks", type=int, default=64, help="masks per image")
    ap.add_argument("--flops", action="store_true", help="also the FLOP split (one device, batch 1)")
    ap.add_argument(
        "--run",
        action="store_true",
        help="run the step instead (batch 1, one device of the default backend: the CPU here, else the "
        "accelerator): step time, images/s, MFU, peak memory and where the time goes",
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps of --run")
    ap.add_argument(
        "--project",
        action="store_true",
        help="print the projection to H100 and TPU v5p from the results' bf16 FLOP split, at 40%% MFU and at "
        "the MFU of the results' CPU runs (nothing is compiled)",
    )
    ap.add_argument("--out", default=str(RESULTS), help="JSON results (appended to by variant)")
    args = ap.parse_args(argv)
    if args.run:
        return run_main(args)
    if args.project:
        results = json.loads(Path(args.out).read_text())
        cpu = {f"{r['mfu']:.2f} ({r['model']} {r['dtype']} on this CPU)": r["mfu"] for r in results.get("runs", [])}
        print(projection(results, {"0.40": 0.40, **cpu}))
        return None

    # Simulated devices: set before JAX initialises its backends.
    n = max(args.fsdp)
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if len(jax.devices()) < n:
        sys.exit(f"need {n} devices, JAX has {len(jax.devices())} (XLA_FLAGS set before JAX started?)")

    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {"rows": [], "flops": []}
    fields = ("model", "dtype", "remat_encoder", "remat_decoder", "mask_chunk", "masks")

    def key(r):
        return tuple(r[f] for f in (*fields, "batch", "fsdp"))

    for v in variants(args):
        cfg = _cfg(v, args.masks)
        if args.flops:
            t = time.perf_counter()
            split = {**v, "masks": args.masks, **flop_split(cfg)}
            print(
                f"{v['model']} enc_remat={int(v['remat_encoder'])} dec_remat={int(v['remat_decoder'])}: "
                f"encoder fwd+bwd {split['encoder_fwd_bwd'] / 1e12:.2f} TFLOP, interactive loop fwd+bwd "
                f"{split['loop_fwd_bwd'] / 1e12:.2f} TFLOP (one iteration {split['iteration_fwd_bwd'] / 1e12:.3f}) "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
            old = [r for r in results["flops"] if any(r[f] != split[f] for f in fields)]
            results["flops"] = [*old, split]
            path.write_text(json.dumps(results, indent=1))
        for fsdp in args.fsdp:
            peaks = {}
            for b in args.batches:
                row = {**v, "masks": args.masks, "batch": b, "fsdp": fsdp, **analyze_step(cfg, b, fsdp)}
                peaks[b] = row["peak"]
                print(_row(row), flush=True)
                results["rows"] = [r for r in results["rows"] if key(r) != key(row)] + [row]
                path.write_text(json.dumps(results, indent=1))
            print(f"    largest per-chip batch: 80 GB {fits(peaks, 80 * GB)}, 16 GB {fits(peaks, 16 * GB)}", flush=True)


if __name__ == "__main__":
    main()
