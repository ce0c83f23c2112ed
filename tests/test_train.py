"""Training: losses, prompt simulation, the trainer (in process), sharding equivalence on 8
simulated devices and kill-and-resume (in processes of their own, tests/train_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.train import losses
from sam_jax.train import prompt_simulation as sim
from sam_jax.train.shapes import make_shapes
from tests.conftest import FAST_COMPILE
from tests.train_worker import _params_digest, param_diffs, small_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shapes")
    make_shapes(out, 16, seed=0, image_size=(96, 128))
    return out


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache shared by the worker processes of this module."""
    return tmp_path_factory.mktemp("jax_cache")


def _worker_env(cache: Path, devices: int, xla_flags: str = FAST_COMPILE) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PLATFORMS": "cpu",
    }


def _worker(args: list[str], cache: Path, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train_worker", *args],
        cwd=ROOT,
        env=_worker_env(cache, devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _workers(
    jobs: list[tuple[list[str], int]], cache: Path, logs: Path, xla_flags: str = FAST_COMPILE, timeout: float = 900
) -> list[subprocess.CompletedProcess]:
    """Run the workers `jobs` ([(args, devices)]) side by side; when one fails or the time
    runs out, all are killed (a process waiting for a dead peer would wait for minutes)."""
    import time

    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i, (args, devices) in enumerate(jobs):
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                cmd = [sys.executable, "-m", "tests.train_worker", *args]
                procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=_worker_env(cache, devices, xla_flags), stdout=out, stderr=err)
                )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    done = [
        subprocess.CompletedProcess(
            p.args, p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()
        )
        for i, p in enumerate(procs)
    ]
    failed = [
        f"worker {a} exited with {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        for (a, _), p in zip(jobs, done)
        if p.returncode
    ]
    if failed:
        raise AssertionError(
            f"workers failed or were killed (-9) after {timeout} s or a failure of another:\n" + "\n".join(failed)
        )
    return done


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(proc: subprocess.CompletedProcess) -> dict:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:") :])


# ----------------------------------------------------------------------------- losses


def test_focal_and_dice_limits():
    t = jnp.zeros((1, 8, 8)).at[0, 2:6, 2:6].set(1.0)
    perfect = jnp.where(t > 0, 20.0, -20.0)
    wrong = -perfect
    assert float(losses.sigmoid_focal_loss(perfect, t)[0]) < 1e-6
    assert float(losses.dice_loss(perfect, t)[0]) < 1e-6
    assert float(losses.sigmoid_focal_loss(wrong, t)[0]) > 1.0
    assert float(losses.dice_loss(wrong, t)[0]) > 0.9
    # focal at logit 0, target 1: alpha * log(2) * 0.5^2
    np.testing.assert_allclose(
        losses.sigmoid_focal_loss(jnp.zeros((1, 1)), jnp.ones((1, 1))), 0.25 * np.log(2) * 0.25, rtol=1e-6
    )


def test_sam_loss_trains_the_lowest_loss_mask_and_ignores_padding():
    t = jnp.zeros((2, 8, 8)).at[:, 2:6, 2:6].set(1.0)
    good = jnp.where(t > 0, 10.0, -10.0)
    logits = jnp.stack([-good, good, -good], axis=1)  # (2, 3, 8, 8): output 1 is right
    iou_pred = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss, metrics, best, chosen_iou = losses.sam_loss(logits, iou_pred, t, jnp.array([True, False]))
    assert best.tolist() == [1, 1] and chosen_iou.tolist() == [1.0, 1.0]
    assert float(metrics["mask_iou"]) == 1.0 and float(metrics["iou_mse"]) < 1e-6
    assert float(loss) < 1e-3
    # The padded example contributes nothing, whatever its logits.
    loss2, _, _, chosen_iou2 = losses.sam_loss(logits.at[1].set(0.0), iou_pred, t, jnp.array([True, False]))
    assert float(loss2) == float(loss)
    assert chosen_iou2.tolist() == [1.0, 0.0]  # per example, padding included: an empty prediction


def _one_mask_setup(shapes):
    """The tiny model with random params, a batch of one random image with one mask, and a loss
    config with the first decode only."""
    from sam_jax.config import get_config
    from sam_jax.model import init_params
    from sam_jax.train.step import TrainBatch

    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    masks = np.zeros((1, 1, 64, 64), bool)
    masks[0, 0, 20:40, 10:30] = True
    batch = TrainBatch(
        images=jax.random.normal(jax.random.key(1), (1, 256, 256, 3)),
        masks=jnp.asarray(masks),
        valid=jnp.ones((1, 1), bool),
        ids=jnp.zeros((1,), jnp.int32),
    )
    cfg = small_config(str(shapes), **{"loss.num_point_iters": 0, "loss.num_no_point_iters": 0}).loss
    return config, params, batch, cfg


def test_sam_loss_focal_alpha_and_gamma(shapes):
    # All logits 0 (p = 0.5): a foreground pixel's focal term is alpha * log 2 * 0.5**gamma, a
    # background pixel's (1 - alpha) * log 2 * 0.5**gamma; alpha < 0 weights both by 1.
    t = jnp.zeros((1, 4, 4)).at[0, 0].set(1.0)  # a quarter foreground
    logits, iou_pred, valid = jnp.zeros((1, 3, 4, 4)), jnp.zeros((1, 3)), jnp.array([True])
    for alpha, gamma, weight in ((0.25, 2.0, 0.625), (0.5, 2.0, 0.5), (-1.0, 2.0, 1.0), (0.75, 1.0, 0.375)):
        _, metrics, _, _ = losses.sam_loss(logits, iou_pred, t, valid, focal_alpha=alpha, focal_gamma=gamma)
        np.testing.assert_allclose(metrics["focal"], weight * np.log(2) * 0.5**gamma, rtol=1e-6)

    # The training step takes them from the loss config (base.py: 0.25 and 2, the defaults
    # of a config without them).
    from sam_jax.train.step import simulate_and_loss

    config, params, batch, cfg = _one_mask_setup(shapes)
    assert (cfg.focal_alpha, cfg.focal_gamma) == (0.25, 2.0)

    def step(c):
        return jax.jit(
            lambda p: simulate_and_loss(p, batch, jax.random.key(2), model_config=config, cfg=c)[1]["first_focal"]
        )(params)

    focal = {}
    for alpha in (0.25, 0.5):
        c = cfg.copy_and_resolve_references()
        c.focal_alpha = alpha
        focal[alpha] = float(step(c))
    assert focal[0.25] != focal[0.5], focal


# ----------------------------------------------------------------------------- prompt simulation


def test_initial_prompts_lie_on_the_mask():
    m = 32
    gt = np.zeros((64, m, m), bool)
    gt[:, 5:15, 8:20] = True
    keys = jax.random.split(jax.random.key(0), 64)
    points, labels = sim.initial_prompt(keys, jnp.asarray(gt), image_size=128, num_slots=4, box_prob=0.5)
    points, labels = np.asarray(points), np.asarray(labels)
    is_box = labels[:, 0] == sim.LABEL_BOX_TOP_LEFT
    assert 0 < is_box.sum() < 64  # both kinds occur
    scale = 128 / m
    cell = np.floor(points[~is_box, 0] / scale).astype(int)
    assert np.all(gt[0][cell[:, 1], cell[:, 0]])  # foreground points
    assert np.all(labels[~is_box, 1] == -1) and np.all(labels[is_box, 1] == sim.LABEL_BOX_BOTTOM_RIGHT)
    box = np.array([8 * scale, 5 * scale, 20 * scale - 1, 15 * scale - 1])
    corners = points[is_box][:, :2].reshape(-1, 4)
    assert np.all(np.abs(corners - box) <= 20 * 128 / 1024 * 5)  # noise: std <= 10% of the side, <= 20 px at 1024
    assert np.all(corners[:, 2:] >= corners[:, :2])
    # Per-row keys: a row's prompt does not depend on the other rows.
    p1, _ = sim.initial_prompt(keys[:3], jnp.asarray(gt[:3]), image_size=128, num_slots=4, box_prob=0.5)
    np.testing.assert_array_equal(np.asarray(p1), points[:3])


def test_correction_points_come_from_the_error_region():
    m = 16
    gt = np.zeros((3, m, m), bool)
    gt[:, 4:8, 4:8] = True
    logits = np.full((3, m, m), -5.0, np.float32)
    logits[1, 4:8, 4:8] = 5.0
    logits[1, 12, 12] = 5.0  # one false-positive pixel
    logits[2, 4:8, 4:8] = 5.0  # perfect
    keys = jax.random.split(jax.random.key(1), 3)
    point, label = sim.correction_point(keys, jnp.asarray(logits), jnp.asarray(gt), image_size=64)
    point, label = np.asarray(point), np.asarray(label)
    assert label.tolist() == [1, 0, -1]  # FN -> positive, FP -> negative, no error -> no point
    cell = np.floor(point / 4).astype(int)
    assert gt[0, cell[0, 1], cell[0, 0]]
    assert tuple(cell[1]) == (12, 12)


def test_a_point_iteration_can_add_several_distinct_error_points():
    """`loss.points_per_iter` k: 1 to k distinct points of the error region per row, the first
    the one `correction_point` draws; with fewer error pixels than drawn, the rest are -1."""
    m, rows, k = 16, 200, 3
    gt = np.zeros((rows, m, m), bool)
    gt[:, 2:10, 2:10] = True
    logits = np.full((rows, m, m), -5.0, np.float32)
    logits[:, 2:10, 2:6] = 5.0  # the right half of the square missed: 32 false-negative pixels
    logits[:, 14, 14] = 5.0  # one false-positive pixel
    logits[-1] = np.where(gt[-1], 5.0, -5.0)  # perfect: no point
    logits[-2, 2:10, 2:10] = 5.0  # a single error pixel (the false positive)
    keys = jax.random.split(jax.random.key(2), rows)
    points, labels = sim.iteration_points(keys, jnp.asarray(logits), jnp.asarray(gt), image_size=64, points_per_iter=k)
    points, labels = np.asarray(points), np.asarray(labels)
    assert points.shape == (rows, k, 2) and labels.shape == (rows, k)
    counts = (labels >= 0).sum(1)
    assert set(counts[:-2].tolist()) == {1, 2, 3}  # each row draws how many
    assert np.all(labels[:, 1:][labels[:, :-1] < 0] < 0)  # points first, then padding
    assert counts[-1] == 0 and labels[-2].tolist() == [0, -1, -1]
    cells = np.floor(points / 4).astype(int)
    err = gt & ~(logits > 0) | (logits > 0) & ~gt
    for i in range(rows):
        got = [tuple(c) for c, lab in zip(cells[i], labels[i]) if lab >= 0]
        assert len(set(got)) == len(got)  # distinct
        for (x, y), lab in zip(got, labels[i][labels[i] >= 0]):
            assert err[i, y, x] and lab == int(gt[i, y, x])  # FN -> 1, FP -> 0
    first, first_label = sim.correction_point(keys, jnp.asarray(logits), jnp.asarray(gt), image_size=64)
    np.testing.assert_array_equal(np.asarray(first), points[:, 0])
    np.testing.assert_array_equal(np.asarray(first_label), labels[:, 0])


def test_iteration_schedule_ends_without_a_point():
    s = np.asarray(sim.iteration_schedule(jax.random.key(0), 8, 2))
    assert s.shape == (10,) and s.sum() == 8 and not s[-1]


def test_upsample_logits_is_torch_bilinear():
    import torch

    from sam_jax.train.step import upsample_logits

    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), (64, 64), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(upsample_logits(jnp.asarray(x), 64)), want, atol=1e-5)
    assert upsample_logits(x, 16) is x


def test_targets_at_input_resolution(shapes):
    """`mask_size`: the targets at the input size are the resized, zero-padded masks; the
    low-res targets are their block averages."""
    from sam_jax.config import get_config
    from sam_jax.train.data import prepare_example, resize_masks
    from sam_jax.train.sa1b import list_records, load_record

    config = get_config("tiny")
    s, low = config.image_size, config.low_res_mask_size
    record = load_record(*list_records(shapes)[0])
    kw = dict(masks_per_image=3, max_mask_fraction=0.9)
    full = prepare_example(record, config, **kw, rng=np.random.default_rng(0), mask_size=s)
    coarse = prepare_example(record, config, **kw, rng=np.random.default_rng(0))
    assert full["masks"].shape == (3, s, s) and coarse["masks"].shape == (3, low, low)
    f = s // low
    np.testing.assert_array_equal(full["masks"].reshape(3, low, f, low, f).mean(axis=(2, 4)) >= 0.5, coarse["masks"])
    resized = resize_masks(np.asarray(record["masks"], bool), (192, 256))  # 96 x 128 -> longest side 256
    assert full["valid"].sum() == min(3, len(resized)) and np.array_equal(full["valid"], coarse["valid"])
    for m, valid in zip(full["masks"], full["valid"]):
        assert not m[192:].any()  # the padding
        assert any(np.array_equal(m[:192], r) for r in resized) if valid else not m.any()
    with pytest.raises(ValueError, match="must divide the image size"):
        prepare_example(record, config, **kw, rng=np.random.default_rng(0), mask_size=100)


def test_low_res_targets_are_block_majorities():
    """`to_low_res` (integer sums of strided slices) is the definition: the frame zero-padded
    to the input size, averaged over f x f blocks, inside at >= 0.5."""
    from sam_jax.train.data import to_low_res

    rng = np.random.default_rng(0)
    for h, w, low in [(192, 256, 64), (190, 250, 128), (256, 101, 16), (256, 256, 256), (3, 7, 8), (200, 256, 1)]:
        masks = rng.random((3, h, w)) < rng.random((3, 1, 1))
        padded = np.zeros((3, 256, 256))
        padded[:, :h, :w] = masks
        f = 256 // low
        want = padded.reshape(3, low, f, low, f).mean(axis=(2, 4)) >= 0.5
        np.testing.assert_array_equal(to_low_res(masks, 256, low), want)
        transposed = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)  # column-major masks
        np.testing.assert_array_equal(to_low_res(transposed, 256, low), want)


def test_sam_loss_candidates_restrict_the_trained_output():
    t = jnp.zeros((2, 8, 8)).at[:, 2:6, 2:6].set(1.0)
    good = jnp.where(t > 0, 10.0, -10.0)
    logits = jnp.stack([-good, good, -good, -good], axis=1)  # (2, 4, 8, 8): output 1 is right
    iou_pred = jnp.zeros((2, 4))
    candidates = jnp.array([[True, False, False, False], [False, True, True, True]])
    loss, metrics, best, chosen_iou = losses.sam_loss(
        logits, iou_pred, t, jnp.array([True, True]), candidates=candidates
    )
    assert best.tolist() == [0, 1] and chosen_iou.tolist() == [0.0, 1.0]
    # The IoU head is supervised on the candidates only: row 0 on output 0 (actual IoU 0), row 1
    # on outputs 1..3 (actual IoUs 1, 0, 0).
    np.testing.assert_allclose(metrics["iou_mse"], (0.0 + 1 / 3) / 2, rtol=1e-6)


def test_a_box_trains_the_single_output(shapes):
    """With `loss.box_single_output`, a box's first decode trains output 0 (what a box gets at
    inference), so with boxes only the multimask outputs' hypernetworks get no gradient;
    without it, the best of outputs 1..3 is trained, as a lone point's."""
    from sam_jax.train.step import simulate_and_loss

    config, params, batch, cfg = _one_mask_setup(shapes)
    cfg.box_prob = 1.0
    norms = {}
    for single in (True, False):
        c = cfg.copy_and_resolve_references()
        c.box_single_output = single

        def loss(p, c=c):
            return simulate_and_loss(p, batch, jax.random.key(2), model_config=config, cfg=c)[0]

        grads = jax.jit(jax.grad(loss))(params)["mask_decoder"]
        norms[single] = [
            float(sum(np.abs(g).sum() for g in jax.tree.leaves(grads[f"output_hypernetworks_mlps_{i}"])))
            for i in range(4)
        ]
    assert norms[True][0] > 0 and norms[True][1:] == [0.0, 0.0, 0.0], norms
    assert norms[False][0] == 0.0 and sum(norms[False][1:]) > 0, norms


def test_no_gradient_into_buffers_or_a_frozen_encoder(shapes):
    """The positional frequencies are a buffer (never a gradient); a frozen encoder gets none
    either, so its backward pass is not computed; the decoder is trained in both cases."""
    from sam_jax.train.step import simulate_and_loss

    config, params, batch, cfg = _one_mask_setup(shapes)
    for train_encoder in (True, False):

        def loss(p, train_encoder=train_encoder):
            return simulate_and_loss(
                p, batch, jax.random.key(2), model_config=config, cfg=cfg, train_image_encoder=train_encoder
            )[0]

        grads = jax.jit(jax.grad(loss))(params)
        assert not np.any(grads["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"])
        encoder = [np.abs(g).sum() for g in jax.tree.leaves(grads["image_encoder"])]
        assert (sum(encoder) > 0) == train_encoder
        assert np.abs(grads["mask_decoder"]["iou_token"]["embedding"]).sum() > 0


def test_grid_ceiling(shapes):
    from sam_jax.train.evaluate import grid_ceiling

    ceilings = [grid_ceiling(shapes, 256, m) for m in (256, 128, 64, 16)]
    assert ceilings[0] == ceilings[1] == 1.0  # the input grid loses nothing; nor does 128 here (images upscaled 2x)
    assert ceilings[1] > ceilings[2] > ceilings[3] > 0.0  # coarser grids lose the small shapes


def test_trainer_loss_at_input_resolution(shapes, tmp_path):
    """loss.mask_size = the input size: full-size targets reach the step and it trains; sizes
    off the grid are refused with a clear error."""
    from sam_jax.train.trainer import Trainer, TrainingError, loss_mask_size, model_config

    cfg = small_config(str(shapes), **{"loss.mask_size": 256, "checkpoint.async_save": False})
    mc = model_config(cfg)
    for bad in (32, 100, 512):
        with pytest.raises(TrainingError, match="loss.mask_size"):
            loss_mask_size(small_config(str(shapes), **{"loss.mask_size": bad}), mc)
    assert loss_mask_size(small_config(str(shapes), **{"loss.mask_size": 0}), mc) == 64
    tr = Trainer(cfg, tmp_path / "work", quiet=True)
    batch = tr._next_batch()
    assert batch.masks.shape == (8, 2, 256, 256)
    last = tr.train(steps=2)
    assert np.isfinite(last["loss"]) and 0.0 <= last["first_iou"] <= 1.0
    tr.close()


def test_trainer_with_several_points_per_iteration(shapes, tmp_path):
    """loss.points_per_iter = 2 trains (the prompts get 2 + 2 slots' worth); 0 is refused."""
    from sam_jax.train.trainer import Trainer, TrainingError

    with pytest.raises(TrainingError, match="loss.points_per_iter=0 must be at least 1"):
        Trainer(small_config(str(shapes), **{"loss.points_per_iter": 0}), tmp_path / "bad", quiet=True)
    cfg = small_config(
        str(shapes), **{"loss.points_per_iter": 2, "loss.num_no_point_iters": 0, "checkpoint.async_save": False}
    )
    tr = Trainer(cfg, tmp_path / "work", quiet=True)
    last = tr.train(steps=1)
    assert np.isfinite(last["loss"]) and 0.0 <= last["last_iou"] <= 1.0
    tr.close()


# ----------------------------------------------------------------------------- trainer


def test_config_overrides_and_errors(tmp_path):
    from sam_jax.train.trainer import TrainingError, apply_overrides, load_config_file

    cfg = load_config_file(ROOT / "train" / "configs" / "shapes_tiny.py")
    out = apply_overrides(
        cfg,
        ["steps=7", "optim.lr=1", "optim.decay_steps=[3, 5]", "data.train_dir=/x", "optim.freeze_image_encoder=True"],
    )
    assert out.steps == 7 and out.optim.lr == 1.0 and isinstance(out.optim.lr, float)
    assert (
        tuple(out.optim.decay_steps) == (3, 5) and out.data.train_dir == "/x" and out.optim.freeze_image_encoder is True
    )
    assert cfg.steps != 7  # the original is not modified
    for bad, msg in (
        ("nope=1", "unknown key"),
        ("steps", "KEY=VALUE"),
        ("steps=abc", "cannot parse"),
        ("steps=1.5", "expected int"),
        ("x.y=1", "no config section"),
    ):
        with pytest.raises(TrainingError, match=msg):
            apply_overrides(cfg, [bad])
    with pytest.raises(TrainingError, match="no such config file"):
        load_config_file(tmp_path / "missing.py")


def test_trainer_frozen_encoder_nonfinite_and_corrupt_data(shapes, tmp_path, monkeypatch):
    """One in-process trainer: a frozen encoder stays put while the decoder learns, a corrupt
    record is skipped and counted, a non-finite loss stops training with a clear error and
    leaves the checkpoint already written intact."""
    import shutil

    from sam_jax.train.trainer import Trainer, TrainingError

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "shapes_000003.jpg").write_bytes(b"not a jpeg")  # corrupt image
    (data / "shapes_000005.json").write_text("{broken")  # unreadable JSON
    cfg = small_config(str(data))
    cfg.optim.freeze_image_encoder = True
    cfg.checkpoint.every = 1
    cfg.checkpoint.async_save = False
    cfg.data.eval_dir = str(shapes)
    cfg.eval_images = 1
    tr = Trainer(cfg, tmp_path / "work", quiet=True)
    before = jax.device_get(tr.state.params)
    with pytest.warns(RuntimeWarning, match="skipping corrupt record"):
        last = tr.train(steps=2)
    after = jax.device_get(tr.state.params)
    assert np.isfinite(last["loss"]) and last["step"] == 2
    assert last["skipped_records"] >= 2  # every skip counts (a record read again next epoch too)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before["image_encoder"], after["image_encoder"])
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(
        before["mask_decoder"]["iou_token"]["embedding"], after["mask_decoder"]["iou_token"]["embedding"]
    )
    np.testing.assert_array_equal(
        before["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
        after["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
    )  # a fixed buffer, never trained
    lines = [json.loads(ln) for ln in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2]
    assert set(lines[-1]) == {
        "step",
        "eval_miou_1click",
        "eval_miou_1click_predicted",
        "eval_miou_3click",
        "eval_miou_box",
    }
    assert 0.0 <= last["eval_miou_1click"] <= 1.0  # held-out evaluation at the end

    # The exported model loads for inference.
    from sam_jax.checkpoint import load_model

    model = load_model(tmp_path / "work" / "model")
    np.testing.assert_array_equal(
        model.params["mask_decoder"]["iou_token"]["embedding"], after["mask_decoder"]["iou_token"]["embedding"]
    )

    # A NaN batch: the step is refused, training stops, the checkpoint of step 2 stays.
    real = tr._next_batch

    def nan_batch():
        batch = real()
        return batch.replace(images=jnp.full_like(batch.images, jnp.nan))

    monkeypatch.setattr(tr, "_next_batch", nan_batch)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 2"):
        tr.train(steps=4)
    assert tr.step == 3 and tr.manager.latest_step() == 2  # the bad update was not applied nor saved
    after_nan = jax.device_get(tr.state.params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), after, after_nan)))
    tr.close()


def test_sharding_equivalence_on_8_devices(shapes, tmp_path, compile_cache):
    res = _result(_worker(["meshes", str(shapes), str(tmp_path), "2"], compile_cache, devices=8))
    ref = res["losses"]["1x1"]
    for name in ("4x2", "8x1"):
        np.testing.assert_allclose(res["losses"][name], ref, rtol=0, atol=1e-5)
        assert res["max_param_diff"][name] <= 1e-5, res["max_param_diff"]
    assert res["shards"]["4x2"] == [[16, 16, 3, 32]]  # the embedding dim split over fsdp=2
    # Data parallel, the devices sync only to sum the loss, metrics and gradients: nothing is
    # gathered, in particular not inside the prompt simulation's iterations (an indexed scatter of
    # each row's correction point over the batch made XLA all-gather the slots in every one).
    dp = res["collectives"]["8x1"]
    assert dp["all-gather"] == dp["reduce-scatter"] == dp["all-to-all"] == dp["collective-permute"] == 0, dp
    assert 0 < dp["all-reduce"] <= 4, dp
    assert res["collectives"]["4x2"]["all-gather"] > 0  # fsdp gathers its params


def test_kill_and_resume_gives_the_uninterrupted_params(shapes, tmp_path, compile_cache):
    from sam_jax.checkpoint import load_params

    full = _result(_worker(["run", str(shapes), str(tmp_path / "full"), "6"], compile_cache))
    assert full == {"resumed_from": None, "step": 6}

    killed = _worker(["run", str(shapes), str(tmp_path / "killed"), "6", "5"], compile_cache, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert complete and complete[-1] in (2, 4), complete  # 4 unless its async save was cut off
    # A save interrupted by a crash leaves a temporary directory: it must be ignored.
    (ckpts / "6.orbax-checkpoint-tmp-1234567").mkdir()
    resumed = _worker(["run", str(shapes), str(tmp_path / "killed"), "6"], compile_cache)
    assert "ignoring the incomplete checkpoint 6.orbax-checkpoint-tmp-1234567" in resumed.stderr
    assert _result(resumed) == {"resumed_from": complete[-1], "step": 6}

    _, a = load_params(tmp_path / "full" / "model")
    _, b = load_params(tmp_path / "killed" / "model")
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)
    assert all(jax.tree.leaves(same))


def test_distributed_options_all_three_or_none(tmp_path, capsys):
    from sam_jax.cli import main
    from sam_jax.train.sharding import initialize_distributed

    assert initialize_distributed() is False  # none: one process, nothing to join
    for args, msg in (
        (("localhost:1234", 2, None), "all three or none"),
        (("localhost", 2, 0), "HOST:PORT"),
        (("localhost:1234", 2, 2), "process id"),
    ):
        with pytest.raises(ValueError, match=msg):
            initialize_distributed(*args)
    config = str(ROOT / "train" / "configs" / "shapes_tiny.py")
    assert main(["train", "--config", config, "--workdir", str(tmp_path), "--num-processes", "2"]) == 1
    assert "--coordinator, --num-processes and --process-id go together" in capsys.readouterr().err


def test_two_processes_train_like_one_with_4_devices(shapes, tmp_path, compile_cache):
    """Two processes of 2 CPU devices each (jax.distributed on localhost, gloo collectives)
    train like one process with 4 devices: the same loss at every step and the same
    exported params. They train 2 steps data-parallel (4x1), then resume from that
    checkpoint on a 2x2 mesh whose fsdp pairs span the processes for the third step."""
    from sam_jax.checkpoint import load_params

    coordinator = f"localhost:{_free_port()}"
    one = ["layouts", str(shapes), str(tmp_path / "one"), "4x1:3"]
    two = [["layouts", str(shapes), str(tmp_path / "two"), "4x1:2,2x2:3", coordinator, "2", str(i)] for i in range(2)]
    procs = _workers([(one, 4), (two[0], 2), (two[1], 2)], compile_cache, tmp_path / "logs")
    results = [_result(p) for p in procs]
    assert [(r["process"], r["processes"]) for r in results] == [(0, 1), (0, 2), (1, 2)]
    for r in results[1:]:
        assert r["resumed_from"] == [None, 2]
        assert r["shards"] == [[[16, 16, 3, 64]], [[16, 16, 3, 32]]]  # 2x2: the params split over the processes
    # Each process saved (and restored) its own data iterator next to the shared state.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "2" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    metrics = {
        k: [json.loads(ln) for ln in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("one", "two")
    }
    assert [r["step"] for r in metrics["two"]] == [r["step"] for r in metrics["one"]] == [1, 2, 3]
    np.testing.assert_allclose(
        [r["loss"] for r in metrics["two"]], [r["loss"] for r in metrics["one"]], rtol=0, atol=1e-5
    )
    ref = _params_digest(load_params(tmp_path / "one" / "model")[1])
    got = _params_digest(load_params(tmp_path / "two" / "model")[1])
    diff = param_diffs(ref, got)
    assert len(diff) > 50 and max(diff.values()) <= 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


def test_initial_params_from_checkpoint_and_encoder(tiny_params, tiny_config, tmp_path):
    from sam_jax.checkpoint import save_params
    from sam_jax.model import abstract_params
    from sam_jax.train import sharding as shd
    from sam_jax.train.trainer import TrainingError, initial_params, model_config

    cfg = small_config("unused")
    mc = model_config(cfg)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    shardings = shd.logical_shardings(abstract_params(mc, boxed=True), mesh)
    ckpt = save_params(tmp_path / "ckpt", tiny_params, tiny_config)
    equal = lambda a, b: all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))  # noqa: E731

    cfg.init = f"checkpoint:{ckpt}"
    assert equal(jax.device_get(initial_params(cfg, mc, shardings)), tiny_params)
    cfg.init = f"encoder:{ckpt}"
    enc = jax.device_get(initial_params(cfg, mc, shardings))
    cfg.init = "scratch"
    scratch = jax.device_get(initial_params(cfg, mc, shardings))
    assert equal(enc["image_encoder"], tiny_params["image_encoder"])
    assert equal(enc["mask_decoder"], scratch["mask_decoder"]) and not equal(
        enc["mask_decoder"], tiny_params["mask_decoder"]
    )
    for bad, msg in (("checkpoint:", "init must be"), ("pretrained:x", "init must be")):
        cfg.init = bad
        with pytest.raises(TrainingError, match=msg):
            initial_params(cfg, mc, shardings)
    cfg.model = "vit_b"
    cfg.init = f"checkpoint:{ckpt}"
    with pytest.raises(TrainingError, match="does not match model 'vit_b'"):
        initial_params(
            cfg, model_config(cfg), shd.logical_shardings(abstract_params(model_config(cfg), boxed=True), mesh)
        )
