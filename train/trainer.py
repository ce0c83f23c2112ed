"""The training loop: a config in, a trained checkpoint out, resumable after any crash.

    trainer = Trainer(cfg, workdir)      # mesh, sharded state (fresh or restored), data
    trainer.train()                       # until cfg.steps; checkpoints every cfg.checkpoint.every

`Trainer` only holds state; the work is `step.train_step`, jitted once with the state's
and the batch's shardings (params fully sharded along `fsdp` by their logical axis names,
the batch over `data` x `fsdp`) and the state donated. What the step minimises is a
`step.Objective` (its batch, loss, extra head params, data and evaluation): SAM's interactive
loss by default; `train.pretrain` runs the encoder's kinds pretraining as another.

Work directory:
  checkpoints/<step>/   orbax items `state` (params, optimizer state, step, RNG), `data`
                        (the grain iterator of each process) and `config` (the training
                        config); async saves, the last `checkpoint.keep` kept
  metrics.jsonl         one JSON line per logged step
  model/                the final params in the inference format (`sam_jax.checkpoint`),
                        loadable with `sam_jax.load_model(workdir / "model")`
  checkpoint_manifests/ the files of each complete checkpoint (`sam_jax.manifest`), checked
                        before it is restored
  checkpoints_damaged/  checkpoints found damaged, set aside (never deleted)

SIGINT or SIGTERM ends the current step, saves it and stops (`TrainingInterrupted`). A damaged
latest checkpoint is set aside with a warning and the newest intact one is restored.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sam_jax.config import SamConfig, get_config, with_overrides
from sam_jax.model import Params, abstract_params, init_params
from sam_jax.modeling.hq import is_hq_param
from sam_jax.train import sharding as shd
from sam_jax.train.data import make_train_dataset
from sam_jax.train.lora import LORA, LoraSpec, lora_spec, merge_adapters
from sam_jax.train.optim import make_optimizer
from sam_jax.train.step import HEAD, Objective, TrainState, init_state, sam_objective, train_step

log = logging.getLogger("sam_jax.train")

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
MANIFEST_DIR = "checkpoint_manifests"
DAMAGED_DIR = "checkpoints_damaged"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under `on_nonfinite="stop"`, a bad config)."""


# ----------------------------------------------------------------------------- config


def recipe_model(cfg: ml_collections.ConfigDict) -> SamConfig:
    """The model variant a training config names: `cfg.model` with `cfg.model_overrides` applied."""
    try:
        return with_overrides(get_config(cfg.model), cfg.model_overrides.to_dict())
    except ValueError as e:
        raise TrainingError(str(e)) from None


def model_config(cfg: ml_collections.ConfigDict) -> SamConfig:
    """The model of a training config: `recipe_model` with the config's compute dtype, encoder
    training options (drop path, rematerialisation) where the model has them, and text layers."""
    mc = recipe_model(cfg)
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
    low, size = mc.low_res_mask_size, int(cfg.loss.mask_size)
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
    text layers (an official SAM) starts a text-prompt model: its text layers are new. A plain
    SAM starts an HQ-SAM model of its encoder (HQ-SAM's training): its HQ layers
    (`modeling.hq.HQ_LAYERS`) are new, the seed's init."""
    kind, _, path = str(cfg.init).partition(":")
    if kind not in ("scratch", "checkpoint", "encoder") or (kind != "scratch") != bool(path):
        raise TrainingError(f"init must be 'scratch', 'checkpoint:PATH' or 'encoder:PATH', got {cfg.init!r}")
    init = jax.jit(functools.partial(init_params, mc), out_shardings=shardings)
    if kind == "scratch":
        return init(jax.random.key(cfg.seed))
    from sam_jax.checkpoint import load_model

    loaded = load_model(path).params
    fresh = functools.cache(functools.partial(init, jax.random.key(cfg.seed)))  # the init runs at most once
    if kind == "encoder":  # the image encoder from the checkpoint, the rest from scratch
        loaded = {**fresh(), "image_encoder": loaded["image_encoder"]}
    if mc.prompt_encoder.text_embed_dim is not None and "text_embed" not in loaded["prompt_encoder"]:
        loaded = with_new_layers(loaded, fresh(), "prompt_encoder", lambda name: name.startswith("text"))
        # The text rows' mask tokens start as the checkpoint's own mask tokens.
        loaded["mask_decoder"] = {**loaded["mask_decoder"], "text_mask_tokens": loaded["mask_decoder"]["mask_tokens"]}
    if mc.mask_decoder.hq_token and "hf_token" not in loaded["mask_decoder"]:  # a plain SAM, as HQ-SAM's training
        loaded = with_new_layers(loaded, fresh(), "mask_decoder", lambda name: is_hq_param(("mask_decoder", name)))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(init, jax.random.key(cfg.seed)))
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), loaded)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise TrainingError(f"init checkpoint {path} does not match model {mc.name!r} (different shapes)")
    return jax.device_put(loaded, shardings)


def with_new_layers(loaded: Params, fresh: Params, module: str, is_new: Callable[[str], bool]) -> Params:
    """`loaded` with the layers of params[`module`] whose names `is_new` accepts taken from `fresh`
    (a checkpoint without a model's added layers: a text model's, HQ-SAM's)."""
    new = {name: layer for name, layer in fresh[module].items() if is_new(name)}
    return {**loaded, module: {**loaded[module], **new}}


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file (as ml_collections' config_flags reads them), or of a
    recipe shipped in `sam_jax.train.configs` given by its name ("shapes_p8")."""
    import importlib.util

    path = Path(path)
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:
        try:
            return importlib.import_module(f"sam_jax.train.configs.{path.name}").get_config()
        except ModuleNotFoundError:
            pass
    if not path.is_file():
        raise TrainingError(f"{path}: no such config file (nor a recipe of sam_jax.train.configs)")
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


def state_shardings(tx: optax.GradientTransformation, abstract: Params, param_sh: Any, mesh) -> TrainState:
    """The shardings of a `TrainState`: params (and their optimizer moments) as `param_sh`, the rest replicated."""
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


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Refuse a config that cannot train (before anything is written); warn about a schedule that
    does not fit `steps` (a warmup that never ends, decays that never happen)."""
    if not isinstance(cfg.steps, int) or cfg.steps <= 0:
        raise TrainingError(f"steps={cfg.steps!r} must be a positive number of optimizer steps")
    if not cfg.data.train_dir:
        raise TrainingError("data.train_dir is not set")
    if cfg.loss.points_per_iter < 1:
        raise TrainingError(
            f"loss.points_per_iter={cfg.loss.points_per_iter} must be at least 1 (points a correction iteration adds)"
        )
    o = cfg.optim
    if o.warmup_steps >= cfg.steps:
        warnings.warn(
            f"optim.warmup_steps={o.warmup_steps} is not below steps={cfg.steps}: the learning rate never reaches "
            f"optim.lr={o.lr} (it ends at {o.lr * cfg.steps / max(o.warmup_steps, 1):.2e})",
            UserWarning,
            stacklevel=2,
        )
    late = [int(d) for d in o.decay_steps if int(d) >= cfg.steps]
    if late:
        warnings.warn(
            f"optim.decay_steps {tuple(late)} lie beyond steps={cfg.steps}: those learning-rate decays never happen",
            UserWarning,
            stacklevel=2,
        )


def check_batch_size(cfg: ml_collections.ConfigDict, mesh) -> None:
    """Refuse a batch size the mesh's data x fsdp devices or the processes do not divide."""
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch or cfg.batch_size % jax.process_count():
        raise TrainingError(
            f"batch_size={cfg.batch_size} must be a multiple of the data x fsdp devices ({n_batch}) and processes"
        )


def make_checkpoint_manager(directory: Path, cfg: ml_collections.ConfigDict):
    """The orbax `CheckpointManager` of a work directory's checkpoints (async saves, the last
    `checkpoint.keep` kept, temporary directories of crashed saves cleaned up)."""
    import orbax.checkpoint as ocp

    _warn_incomplete_checkpoints(directory)
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep,
            enable_async_checkpointing=cfg.checkpoint.async_save,
            cleanup_tmp_directories=True,
        ),
    )


def make_dataset(
    cfg: ml_collections.ConfigDict,
    mc: SamConfig,
    mask_size: int,
    text_prompts: Any = None,
    source: Any = None,
    embed: Any = None,
):
    """This process's slice of the training data: (the record source, the batched grain dataset).
    `source` (default: `open_source` of data.train_dir) is any random-access record source; with
    `embed` (record -> the frozen encoder's cached output) the batches hold `embeddings`, not images."""
    from sam_jax.train.sources import open_source

    if source is None:
        source = open_source(cfg.data.train_dir, cfg.data.train_images or None, cache=cfg.data.cache_records)
    dataset = make_train_dataset(
        source,
        mc,
        seed=cfg.seed,
        batch_size=cfg.batch_size // jax.process_count(),
        masks_per_image=cfg.data.masks_per_image,
        max_mask_fraction=cfg.data.max_mask_fraction,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        text_prompts=text_prompts,
        mask_size=mask_size,
        embed=embed,
    )
    return source, dataset


def create_train_state(
    cfg: ml_collections.ConfigDict,
    mc: SamConfig,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    lora: LoraSpec | None = None,
    head: Callable[[jax.Array], Params] | None = None,
) -> TrainState:
    """The step-0 state (params from `cfg.init`, with fresh `lora` adapters if given and an objective's
    `head` (key -> its params) at params["head"]; fresh optimizer state, the seed's RNG), placed with `shardings`."""
    model_sh = {k: v for k, v in shardings.params.items() if k not in (LORA, HEAD)}
    params = initial_params(cfg, mc, model_sh)
    if lora is not None:
        params = lora.add(params, jax.random.key(cfg.seed + 1))
    if head is not None:
        params = {**params, HEAD: jax.jit(head, out_shardings=shardings.params[HEAD])(jax.random.key(cfg.seed + 2))}
    return jax.jit(functools.partial(init_state, tx=tx, seed=cfg.seed), out_shardings=shardings)(params)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a whole step, whose checkpoint was saved."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved; rerun the same command to resume")
        self.step, self.signal_name = step, signal_name


class _StopSignals:
    """While active, SIGINT and SIGTERM only raise a flag: the loop finishes its step, saves and stops.
    A second signal of the same kind stops at once (the default handler)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """Whether any process received a signal (all processes agree, so they stop at the same step)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


class Trainer:
    """`source` (a record source) replaces data.train_dir; `embed` (record -> its cached encoder output,
    `train.embedding_cache`) feeds a frozen encoder's embeddings instead of images; `eval_data` (a record
    source) replaces data.eval_dir as the held-out set. `objective` (`step.Objective`, default SAM's
    interactive loss) is what the step minimises, with its data, head and evaluation; `model` replaces
    `model_config(cfg)`; `log` prints the progress lines (default `print`; nothing when `quiet`)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        *,
        mesh=None,
        quiet: bool = False,
        source: Any = None,
        embed: Any = None,
        eval_data: Any = None,
        objective: Objective | None = None,
        model: SamConfig | None = None,
        log: Callable[[str], Any] = print,
    ):
        check_config(cfg)
        self.cfg, self.quiet, self.log = cfg, quiet, log
        self.model_config = model if model is not None else model_config(cfg)
        self.lora = lora_spec(cfg)  # low-rank adapters on a frozen base (None: none)
        if self.lora is not None and self.model_config.mask_decoder.hq_token:
            raise TrainingError(
                f"lora.rank={self.lora.rank}: {self.model_config.name} is an HQ-SAM model, which trains its HQ "
                "layers alone with SAM frozen (adapters would never train)"
            )
        self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        check_batch_size(cfg, self.mesh)
        self.mask_size = loss_mask_size(cfg, self.model_config)
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)

        self.objective = objective if objective is not None else self._sam_objective()
        abstract = self._abstract_params()
        self.tx, self.schedule, labels = make_optimizer(abstract, self.model_config, cfg.optim, self.objective.trains)
        self.state_sharding = state_shardings(self.tx, abstract, self._param_shardings(abstract), self.mesh)
        self.batch_sharding = shd.batch_sharding(self.mesh)
        self._step = jax.jit(
            functools.partial(train_step, objective=self.objective, tx=self.tx, schedule=self.schedule, labels=labels),
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, shd.replicated(self.mesh)),
            donate_argnums=0,
        )
        self._compiled = None  # the step, compiled ahead of the first call (`_compile`)
        self._open_data(source, embed)
        self.eval_data = eval_data if eval_data is not None else (cfg.data.eval_dir or None)
        self.data_iter = iter(self.dataset)

        self.manager = make_checkpoint_manager(self.workdir / CHECKPOINT_DIR, cfg)
        self.resumed_from = self._restore_latest_intact()
        if self.resumed_from is None:
            self.state = create_train_state(
                cfg, self.model_config, self.tx, self.state_sharding, self.lora, self.objective.head
            )

    def _sam_objective(self) -> Objective:
        return sam_objective(
            self.model_config,
            self.cfg.loss,
            train_image_encoder=not self.cfg.optim.freeze_image_encoder,
            lora_scale=self.lora.scale if self.lora is not None else 1.0,
        )

    def _param_shardings(self, abstract: Params) -> Any:
        """The model's params fully sharded by their logical names; adapters and the objective's head replicated."""
        param_sh = shd.logical_shardings(abstract_params(self.model_config, boxed=True), self.mesh)
        small = {k: v for k, v in abstract.items() if k in (LORA, HEAD)}  # small: replicated
        return {**param_sh, **jax.tree.map(lambda _: shd.replicated(self.mesh), small)}

    def _open_data(self, source: Any, embed: Any) -> None:
        """The training data: the objective's own, or SAM's records (with text prompts if the model has text layers)."""
        self.text_prompts = None  # with text prompts on: each mask's, in the data pipeline
        if self.objective.dataset is not None:
            self.source, self.dataset = None, self.objective.dataset(self.cfg)
            return
        if self.model_config.prompt_encoder.text_embed_dim is not None:
            from sam_jax.text import TextEncoder
            from sam_jax.train.text import text_prompts

            self.text_prompts = text_prompts(self.cfg, TextEncoder.from_folder(self.cfg.text.clip))
        self.source, self.dataset = make_dataset(
            self.cfg, self.model_config, self.mask_size, self.text_prompts, source=source, embed=embed
        )

    # ------------------------------------------------------------------ checkpoints

    def _abstract_params(self) -> Params:
        """The trained params' shapes: the model's, with the adapters' under "lora" when it has them and the
        objective's head under "head"."""
        abstract = abstract_params(self.model_config)
        if self.lora is not None:
            abstract = self.lora.abstract(abstract)
        if self.objective.head is not None:
            abstract = {**abstract, HEAD: jax.eval_shape(self.objective.head, jax.random.key(0))}
        return abstract

    def trained_params(self) -> Params:
        """The current params as numpy arrays (adapters merged), with the objective's head if it has one,
        whole in every process (every process calls it)."""
        params = shd.fetch(self.state.params, self.mesh)
        if self.lora is not None:
            params = jax.device_get(merge_adapters(params, self.lora.scale))
        return jax.tree.map(np.asarray, params)

    def model_params(self) -> Params:
        """The current params of the model as numpy arrays (a plain SAM tree: adapters merged, no head),
        whole in every process (every process calls it)."""
        return {k: v for k, v in self.trained_params().items() if k != HEAD}

    def _abstract_state(self) -> TrainState:
        params = self._abstract_params()
        shapes = jax.eval_shape(functools.partial(init_state, tx=self.tx, seed=self.cfg.seed), params)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sharding
        )

    def _manifest_path(self, step: int) -> Path:
        return self.workdir / MANIFEST_DIR / f"{step}.json"

    def _restore(self, step: int) -> TrainState:
        import grain
        import orbax.checkpoint as ocp

        from sam_jax.manifest import verify_manifest

        verify_manifest(self.workdir / CHECKPOINT_DIR / str(step), self._manifest_path(step))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self._abstract_state()),
                data=grain.checkpoint.CheckpointRestore(self.data_iter),
            ),
        )
        return restored["state"]

    def _restore_latest_intact(self) -> int | None:
        """Restore the newest checkpoint that is intact -> its step (None: there is none, start afresh).

        A damaged checkpoint (a file its manifest lists is missing or cut short, or orbax cannot
        read it) is moved to `checkpoints_damaged/` with a warning that names it and the step
        resumed from; nothing is deleted. If no checkpoint restores, nothing is moved and the
        first error is raised: a config that no longer fits the checkpoints is not "damage".
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self.state = self._restore(step)
            except Exception as error:  # orbax and tensorstore raise many kinds for a broken file
                damaged.append((step, " ".join(str(error).split())[:300]))
                continue
            self._set_aside(damaged)
            if damaged:
                warnings.warn(
                    f"the checkpoint of step {damaged[0][0]} is damaged ({damaged[0][1]}); resuming from step {step}, "
                    f"the newest intact one (damaged checkpoints moved to {self.workdir / DAMAGED_DIR})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._print(f"resumed from step {step} ({self.workdir / CHECKPOINT_DIR / str(step)})")
            return step
        if damaged:
            raise TrainingError(
                f"no checkpoint in {self.workdir / CHECKPOINT_DIR} can be restored; "
                f"step {damaged[0][0]}: {damaged[0][1]}"
            )
        return None

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Move damaged step directories (and their manifests) out of the manager's way, keeping them."""
        if not damaged:
            return
        if jax.process_index() == 0:
            aside = self.workdir / DAMAGED_DIR
            aside.mkdir(exist_ok=True)
            for step, _ in damaged:
                target = aside / str(step)
                n = 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                os.replace(self.workdir / CHECKPOINT_DIR / str(step), target)
                if self._manifest_path(step).exists():
                    os.replace(self._manifest_path(step), target.with_name(target.name + ".manifest.json"))
        shd.sync("checkpoints:set-aside")
        self.manager.reload()

    def _write_manifests(self) -> None:
        """Write the manifest of every finished checkpoint that has none; drop those of deleted steps."""
        from sam_jax.manifest import write_manifest

        self.manager.wait_until_finished()
        if jax.process_index() != 0:
            return
        steps = set(self.manager.all_steps())
        (self.workdir / MANIFEST_DIR).mkdir(exist_ok=True)
        for step in steps:
            if not self._manifest_path(step).exists():
                write_manifest(self.workdir / CHECKPOINT_DIR / str(step), self._manifest_path(step))
        for path in (self.workdir / MANIFEST_DIR).glob("*.json"):
            if path.stem.isdigit() and int(path.stem) not in steps:
                path.unlink()

    def save(self, force: bool = False) -> None:
        import grain
        import orbax.checkpoint as ocp

        step = int(self.state.step)
        if step in self.manager.all_steps():
            return
        self._write_manifests()  # of the previous (async) save, now finished
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                data=grain.checkpoint.CheckpointSave(self.data_iter),
                config=ocp.args.JsonSave(json.loads(self.cfg.to_json())),
            ),
            force=force,
        )
        if not self.cfg.checkpoint.async_save:
            self._write_manifests()

    def export(self) -> Path:
        """Write the current params in the inference format to workdir/model (replacing it).
        Every process calls it (the params are gathered and orbax syncs); process 0 writes."""
        from sam_jax.checkpoint import save_params

        out, tmp = self.workdir / MODEL_DIR, self.workdir / f".{MODEL_DIR}.tmp"
        params = self.model_params()
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

    def _next_batch(self) -> Any:
        local = next(self.data_iter)
        put = lambda v: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))  # noqa: E731
        return self.objective.batch(**{k: jax.tree.map(put, v) for k, v in local.items()})

    def _print(self, text: str) -> None:
        if not self.quiet and jax.process_index() == 0:
            if self.log is print:
                print(text, flush=True)
            else:
                self.log(text)

    @property
    def step(self) -> int:
        return int(self.state.step)

    def _compile(self, batch: Any) -> None:
        """Compile the step ahead of its first call, saying so: it can take a minute."""
        self._print("compiling the training step...")
        t = time.perf_counter()
        self._compiled = self._step.lower(self.state, batch).compile()
        self._print(f"compiled the training step in {time.perf_counter() - t:.1f} s")

    def run_step(self) -> dict[str, jax.Array]:
        """One optimizer step on the next batch -> its metrics (on the device, not fetched)."""
        batch = self._next_batch()
        if self._compiled is None:
            self._compile(batch)
        self.state, metrics = self._compiled(self.state, batch)
        return metrics

    def last_logged(self) -> dict[str, Any]:
        """The last training metrics line of metrics.jsonl ({} if none)."""
        path = self.workdir / METRICS_FILE
        last: dict[str, Any] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if "loss" in row:
                    last = row
        return last

    def train(self, steps: int | None = None, callback: Any = None) -> dict[str, float]:
        """Train until `steps` (default cfg.steps) -> the last logged metrics. Saves every
        `checkpoint.every` steps and at the end, then exports the params to workdir/model.
        `callback(step)`, if given, runs after each step.

        SIGINT (Ctrl-C) or SIGTERM (a preempted job) ends the current step, saves its checkpoint
        and raises `TrainingInterrupted`; rerunning resumes from that step. A run already at
        `steps` trains nothing and returns the last logged metrics."""
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        start = self.step
        if start >= total:
            self._print(f"already trained to step {start} of {total}")
            return self.last_logged()
        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            disable=self.quiet or not sys.stderr.isatty() or jax.process_index() != 0,
        )
        last: dict[str, float] = {}
        t0, n0 = time.perf_counter(), start
        with _StopSignals() as signals:
            for step in range(start, total):
                metrics = self.run_step()
                if step == start:
                    t0 = time.perf_counter()  # the rate leaves out the compilation
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
                    last = self._log(metrics, done, (done - n0) / max(dt, 1e-9))
                    t0, n0 = time.perf_counter(), done
                    bar.write(last["line"]) if not bar.disable else self._print(last["line"])
                if done % cfg.checkpoint.every == 0:
                    self.save()
                if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                    self.evaluate()
                if callback is not None:
                    callback(done)
                if done < total and signals.stop_requested():
                    bar.close()
                    self.save(force=True)
                    self._write_manifests()
                    raise TrainingInterrupted(done, signals.received or "a signal on another process")
        bar.close()
        self.save(force=True)
        self._write_manifests()
        self.export()
        last.update(self.evaluate())
        return last

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, logged and appended to metrics.jsonl: the objective's `evaluate`, or SAM's
        held-out mIoU (`_evaluate_sam`; {} without held-out data)."""
        if self.objective.evaluate is not None:
            out = self.objective.evaluate(self.trained_params())
            line = " ".join(f"{k.removeprefix('eval_').replace('_', '-')} {v:.3f}" for k, v in out.items())
        elif self.eval_data is None:
            return {}
        else:
            out = self._evaluate_sam()
            line = "mIoU " + " ".join(f"{k[5:]} {v:.3f}" for k, v in out.items())
        if jax.process_index() == 0:
            with open(self.workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, **out}) + "\n")
        self._print(f"step {self.step}: held-out {line}")
        return out

    def _evaluate_sam(self) -> dict[str, float]:
        """Held-out mIoU (`sam_jax.train.evaluate`, 1 and 3 clicks, box; with captions, each caption alone) on
        the held-out data (`eval_data` or data.eval_dir), at most `eval_images` images."""
        from sam_jax.train.evaluate import evaluate

        params = self.model_params()
        r = evaluate(params, self.model_config, self.eval_data, num_clicks=3, max_images=self.cfg.eval_images or None)
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
        return out

    def _log(self, metrics: dict[str, jax.Array], step: int, steps_per_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped = self.source.num_skipped if self.source is not None else 0
        out.update(
            step=step,
            steps_per_s=steps_per_s,
            examples_per_s=steps_per_s * self.cfg.batch_size,
            skipped_records=skipped,
        )
        if jax.process_index() == 0:
            with open(self.workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps(out) + "\n")
        out["line"] = (
            f"step {step}: {self.objective.log_line(out)} lr {out['lr']:.2e} grad-norm {out['grad_norm']:.3f} "
            f"{steps_per_s:.2f} steps/s {out['examples_per_s']:.1f} ex/s"
            + (f" skipped-records {skipped}" if skipped else "")
        )
        return out

    def close(self) -> None:
        self._write_manifests()
        self.manager.close()
