"""The training loop: a config in, a trained checkpoint out, resumable after any crash.

    trainer = Trainer(cfg, workdir)      # mesh, sharded state (fresh or restored), data
    trainer.train()                       # until cfg.steps; checkpoints every cfg.checkpoint.every

`Trainer` only holds state; the work is `step.train_step`, jitted once with the state's
and the batch's shardings (params fully sharded along `fsdp` by their logical axis names,
the batch over `data` x `fsdp`) and the state donated.

Work directory:
  checkpoints/<step>/   orbax items `state` (params, optimizer state, step, RNG), `data`
                        (the grain iterator of each process) and `config` (the training
                        config); async saves, the last `checkpoint.keep` kept
  metrics.jsonl         one JSON line per logged step
  model/                the final params in the inference format (`sam_jax.checkpoint`),
                        loadable with `sam_model_registry[...](checkpoint=workdir/"model")`

A restart resumes from the latest complete checkpoint: params, optimizer, RNG and the data
iterator are restored, so an interrupted run ends with exactly the params of an
uninterrupted one. A checkpoint left half-written by a crash is ignored, with a warning.

Several processes (hosts): each calls `sharding.initialize_distributed` (`sam-jax train
--coordinator ...`), then runs the same Trainer on the same (shared) workdir; each reads
its own slice of every batch, all take part in checkpoints and the export, process 0
writes metrics.jsonl and model/. They train like one process with all the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sam_jax.train import sharding as shd
from sam_jax.train.data import make_train_dataset
from sam_jax.train.optim import make_optimizer
from sam_jax.train.step import TrainState, train_step

from sam_jax.config import SamConfig, get_config
from sam_jax.model import Params, abstract_params, init_params

log = logging.getLogger("sam_jax.train")

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under `on_nonfinite="stop"`, a bad config)."""


# ----------------------------------------------------------------------------- config


def model_config(cfg: ml_collections.ConfigDict) -> SamConfig:
    """The model of a training config: the named variant with the config's compute dtype
    and encoder training options (drop path, rematerialisation) where the model has them."""
    mc = get_config(cfg.model)
    mc = dataclasses.replace(mc, dtype=str(jnp.dtype(cfg.dtype)))
    enc = {f.name for f in dataclasses.fields(mc.image_encoder)}
    extra = {k: cfg.get(k) for k in ("drop_path_rate", "remat") if k in enc and cfg.get(k) is not None}
    if extra:
        mc = dataclasses.replace(mc, image_encoder=dataclasses.replace(mc.image_encoder, **extra))
    from sam_jax.train.text import with_text_projection

    try:
        return with_text_projection(mc, cfg)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def loss_mask_size(cfg: ml_collections.ConfigDict, mc: SamConfig) -> int:
    """The side of the grid the mask losses are computed on: `loss.mask_size`, or the
    decoder's low-res size when it is 0. It must lie between the two and divide the input size."""
    low, size = mc.low_res_mask_size, int(cfg.loss.get("mask_size", 0) or 0)
    if size == 0:
        return low
    if not low <= size <= mc.image_size or mc.image_size % size:
        raise TrainingError(
            f"loss.mask_size={size} must be 0 (the low-res size, {low}) or a divisor of the input size "
            f"{mc.image_size} of at least {low}"
        )
    return size


def initial_params(cfg: ml_collections.ConfigDict, mc: SamConfig, shardings: Any) -> Params:
    """Params to start from, placed with `shardings`: `cfg.init` is "scratch",
    "checkpoint:PATH" (any form `load_model` reads) or "encoder:PATH" (that checkpoint's
    image encoder, the rest from scratch, e.g. an MAE-pretrained ViT). A checkpoint without
    text layers (an official SAM) starts a text-prompt model: its text layers are new."""
    kind, _, path = str(cfg.init).partition(":")
    if kind not in ("scratch", "checkpoint", "encoder") or (kind != "scratch") != bool(path):
        raise TrainingError(f"init must be 'scratch', 'checkpoint:PATH' or 'encoder:PATH', got {cfg.init!r}")
    init = jax.jit(functools.partial(init_params, mc), out_shardings=shardings)
    if kind == "scratch":
        return init(jax.random.key(cfg.seed))
    from sam_jax.checkpoint import load_model

    loaded = load_model(path).params
    if kind == "encoder":  # the image encoder from the checkpoint, the rest from scratch
        loaded = {**init(jax.random.key(cfg.seed)), "image_encoder": loaded["image_encoder"]}
    elif mc.prompt_encoder.text_embed_dim is not None and "text_embed" not in loaded["prompt_encoder"]:
        fresh = init(jax.random.key(cfg.seed))["prompt_encoder"]  # the text layers, new
        text_layers = {k: v for k, v in fresh.items() if k.startswith("text")}
        # The text rows' mask tokens start as the checkpoint's own mask tokens.
        decoder = {**loaded["mask_decoder"], "text_mask_tokens": loaded["mask_decoder"]["mask_tokens"]}
        loaded = {**loaded, "prompt_encoder": {**loaded["prompt_encoder"], **text_layers}, "mask_decoder": decoder}
    want = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(init, jax.random.key(cfg.seed)))
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), loaded)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise TrainingError(f"init checkpoint {path} does not match model {cfg.model!r} (different shapes)")
    return jax.device_put(loaded, shardings)


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file (as ml_collections' config_flags reads them)."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_sam_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise TrainingError(f"{path}: a config file must define get_config()")
    return module.get_config()


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `key.sub=value` strings (values parsed as the type of the current value)."""
    import ast

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise TrainingError(f"override {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(node, ml_collections.ConfigDict):
                raise TrainingError(f"override {item!r}: no config section {name!r}")
        if leaf not in node:
            raise TrainingError(f"override {item!r}: unknown key {key!r}")
        old = node[leaf]
        if isinstance(old, str):
            value: Any = text
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise TrainingError(f"override {item!r}: cannot parse {text!r} as {type(old).__name__}") from None
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(old, tuple) and isinstance(value, list):
                value = tuple(value)
            if old is not None and not isinstance(value, type(old)):
                raise TrainingError(f"override {item!r}: expected {type(old).__name__}, got {type(value).__name__}")
        node[leaf] = value
    return cfg


# ----------------------------------------------------------------------------- trainer


def _state_shardings(tx: optax.GradientTransformation, abstract: Params, param_sh: Any, mesh) -> TrainState:
    from optax.transforms._masking import MaskedNode  # the frozen params' (empty) optimizer state

    rep = shd.replicated(mesh)
    opt = optax.tree_map_params(
        tx,
        lambda x, s: x if isinstance(x, MaskedNode) else s,
        jax.eval_shape(tx.init, abstract),
        param_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, MaskedNode),
    )
    return TrainState(step=rep, params=param_sh, opt_state=opt, rng=rep)


def _warn_incomplete_checkpoints(directory: Path) -> None:
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if p.is_dir() and ".orbax-checkpoint-tmp" in p.name:
            warnings.warn(
                f"ignoring the incomplete checkpoint {p.name} (a save interrupted by a crash)",
                RuntimeWarning,
                stacklevel=2,
            )


class Trainer:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, mesh=None, quiet: bool = False):
        import orbax.checkpoint as ocp

        self.cfg = cfg
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.model_config = model_config(cfg)
        self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        n_batch = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.batch_size % n_batch or cfg.batch_size % jax.process_count():
            raise TrainingError(
                f"batch_size={cfg.batch_size} must be a multiple of the data x fsdp devices ({n_batch}) and processes"
            )
        if not cfg.data.train_dir:
            raise TrainingError("data.train_dir is not set")
        if int(cfg.loss.get("points_per_iter", 1)) < 1:
            raise TrainingError(
                f"loss.points_per_iter={cfg.loss.points_per_iter} must be at least 1 "
                "(points a correction iteration adds)"
            )
        self.mask_size = loss_mask_size(cfg, self.model_config)

        boxed = abstract_params(self.model_config, boxed=True)
        param_sh = shd.logical_shardings(boxed, self.mesh)
        abstract = abstract_params(self.model_config)
        self.tx, self.schedule = make_optimizer(abstract, self.model_config, cfg.optim)
        self.state_sharding = _state_shardings(self.tx, abstract, param_sh, self.mesh)
        self.batch_sharding = shd.batch_sharding(self.mesh)
        self._step = jax.jit(
            functools.partial(
                train_step,
                model_config=self.model_config,
                cfg=cfg.loss,
                tx=self.tx,
                schedule=self.schedule,
                train_image_encoder=not cfg.optim.freeze_image_encoder,
            ),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
            donate_argnums=0,
        )

        from sam_jax.train.sa1b import SA1BSource

        self.text_prompts = None  # with text prompts on: each mask's, in the data pipeline
        if self.model_config.prompt_encoder.text_embed_dim is not None:
            from sam_jax.train.text import text_prompts

            from sam_jax.text import TextEncoder

            self.text_prompts = text_prompts(cfg, TextEncoder.from_folder(cfg.text.clip))
        self.source = SA1BSource(cfg.data.train_dir, cache=bool(cfg.data.get("cache_records", False)))
        self.dataset = make_train_dataset(
            self.source,
            self.model_config,
            seed=cfg.seed,
            batch_size=cfg.batch_size // jax.process_count(),
            masks_per_image=cfg.data.masks_per_image,
            max_mask_fraction=cfg.data.max_mask_fraction,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            text_prompts=self.text_prompts,
            mask_size=self.mask_size,
        )
        self.data_iter = iter(self.dataset)

        ckpt_dir = self.workdir / CHECKPOINT_DIR
        _warn_incomplete_checkpoints(ckpt_dir)
        self.manager = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.checkpoint.keep,
                enable_async_checkpointing=cfg.checkpoint.async_save,
                cleanup_tmp_directories=True,
            ),
        )
        latest = self.manager.latest_step()
        if latest is None:
            params = initial_params(cfg, self.model_config, param_sh)
            init = jax.jit(
                lambda p: TrainState(
                    step=jnp.zeros((), jnp.int32),
                    params=p,
                    opt_state=self.tx.init(p),
                    rng=jax.random.key_data(jax.random.key(cfg.seed)),
                ),
                out_shardings=self.state_sharding,
            )
            self.state = init(params)
            self.resumed_from = None
        else:
            self.state = self._restore(latest)
            self.resumed_from = latest

    # ------------------------------------------------------------------ checkpoints

    def _abstract_state(self) -> TrainState:
        def init(key):
            p = init_params(self.model_config, key)
            return TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p), jax.random.key_data(key))

        shapes = jax.eval_shape(init, jax.random.key(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sharding
        )

    def _restore(self, step: int) -> TrainState:
        import grain
        import orbax.checkpoint as ocp

        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self._abstract_state()),
                data=grain.checkpoint.CheckpointRestore(self.data_iter),
            ),
        )
        self._print(f"resumed from step {step} ({self.workdir / CHECKPOINT_DIR / str(step)})")
        return restored["state"]

    def save(self, force: bool = False) -> None:
        import grain
        import orbax.checkpoint as ocp

        step = int(self.state.step)
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                data=grain.checkpoint.CheckpointSave(self.data_iter),
                config=ocp.args.JsonSave(json.loads(self.cfg.to_json())),
            ),
            force=force,
        )

    def export(self) -> Path:
        """Write the current params in the inference format to workdir/model (replacing it).
        Every process calls it (the params are gathered and orbax syncs); process 0 writes."""
        from sam_jax.checkpoint import save_params

        out, tmp = self.workdir / MODEL_DIR, self.workdir / f".{MODEL_DIR}.tmp"
        params = jax.tree.map(np.asarray, shd.fetch(self.state.params, self.mesh))
        config = dataclasses.replace(self.model_config, dtype="float32")
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        shd.sync("export:clean")
        save_params(tmp, params, config)
        if jax.process_index() == 0:
            # The previous model is moved aside, not deleted, until the new one is in place:
            # a crash here never leaves the work directory without a model on disk.
            old = self.workdir / f".{MODEL_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        shd.sync("export:done")
        return out

    # ------------------------------------------------------------------ training

    def _next_batch(self) -> dict[str, jax.Array]:
        local = next(self.data_iter)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in local.items()}

    def _print(self, text: str) -> None:
        if not self.quiet and jax.process_index() == 0:
            print(text, flush=True)

    @property
    def step(self) -> int:
        return int(self.state.step)

    def run_step(self) -> dict[str, jax.Array]:
        """One optimizer step on the next batch -> its metrics (on the device, not fetched)."""
        self.state, metrics = self._step(self.state, self._next_batch())
        return metrics

    def train(self, steps: int | None = None, callback: Any = None) -> dict[str, float]:
        """Train until `steps` (default cfg.steps) -> the last logged metrics. Saves every
        `checkpoint.every` steps and at the end, then exports the params to workdir/model.
        `callback(step)`, if given, runs after each step."""
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        start = self.step
        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            disable=self.quiet or not sys.stderr.isatty() or jax.process_index() != 0,
        )
        last: dict[str, float] = {}
        t0, n0 = time.perf_counter(), start
        for step in range(start, total):
            metrics = self.run_step()
            if not bool(metrics["finite"]):
                msg = f"non-finite loss or gradient at step {step} (loss {float(metrics['loss'])})"
                if cfg.on_nonfinite == "stop":
                    self.manager.wait_until_finished()
                    raise TrainingError(
                        msg + "; stopped, the last checkpoint is kept (on_nonfinite='skip' skips such steps)"
                    )
                warnings.warn(msg + "; update skipped", RuntimeWarning, stacklevel=2)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == total:
                dt = time.perf_counter() - t0
                last = self._log(metrics, done, (done - n0) / dt)
                t0, n0 = time.perf_counter(), done
                bar.write(last["line"]) if not bar.disable else self._print(last["line"])
            if done % cfg.checkpoint.every == 0:
                self.save()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                self.evaluate()
            if callback is not None:
                callback(done)
        bar.close()
        self.save(force=True)
        self.manager.wait_until_finished()
        self.export()
        if cfg.data.eval_dir:
            last.update(self.evaluate())
        return last

    def evaluate(self) -> dict[str, float]:
        """Held-out mIoU (`sam_jax.train.evaluate`, 1 and 3 clicks, box) on data.eval_dir, at most
        `eval_images` images; logged and appended to metrics.jsonl. {} without an eval_dir."""
        if not self.cfg.data.eval_dir:
            return {}
        from sam_jax.train.evaluate import evaluate

        params = shd.fetch(self.state.params, self.mesh)
        r = evaluate(
            params, self.model_config, self.cfg.data.eval_dir, num_clicks=3, max_images=self.cfg.eval_images or None
        )
        out = {f"eval_{k}": r[k] for k in ("miou_1click", "miou_1click_predicted", "miou_3click", "miou_box")}
        if getattr(self.text_prompts, "captions", None):  # caption mode: what each caption alone selects
            from sam_jax.train.text import evaluate_text

            t = evaluate_text(
                params,
                self.model_config,
                self.cfg.data.eval_dir,
                self.text_prompts.captions,
                max_images=self.cfg.eval_images or None,
            )
            out["eval_miou_text"] = t["miou_text"]
            out.update({f"eval_miou_text_{c}": v for c, v in t["per_category"].items()})
        if jax.process_index() == 0:
            with open(self.workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, **out}) + "\n")
        self._print(f"step {self.step}: held-out mIoU " + " ".join(f"{k[5:]} {v:.3f}" for k, v in out.items()))
        return out

    def _log(self, metrics: dict[str, jax.Array], step: int, steps_per_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {k: float(v) for k, v in jax.device_get(metrics).items()}
        out.update(
            step=step,
            steps_per_s=steps_per_s,
            examples_per_s=steps_per_s * self.cfg.batch_size,
            skipped_records=self.source.num_skipped,
        )
        if jax.process_index() == 0:
            with open(self.workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps(out) + "\n")
        out["line"] = (
            f"step {step}: loss {out['loss']:.4f} first-iou {out['first_iou']:.3f} last-iou {out['last_iou']:.3f} "
            + (f"text-iou {out['text_iou']:.3f} " if "text_iou" in out else "")
            + f"lr {out['lr']:.2e} grad-norm {out['grad_norm']:.3f} {steps_per_s:.2f} steps/s "
            f"{out['examples_per_s']:.1f} ex/s"
            + (f" skipped-records {self.source.num_skipped}" if self.source.num_skipped else "")
        )
        return out

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
