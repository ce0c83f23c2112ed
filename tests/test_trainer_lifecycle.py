"""A training run's life: config checks before anything is written, the compile message, Ctrl-C and
SIGTERM, a rerun of a finished run, and resuming past a damaged checkpoint."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from sam_jax.train.shapes import make_shapes
from tests.train_worker import small_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lifecycle_shapes")
    make_shapes(out, 8, seed=0, image_size=(96, 128))
    return out


def _cfg(shapes: Path, **overrides):
    cfg = small_config(str(shapes), **overrides)
    cfg.batch_size = 2
    cfg.checkpoint.async_save = False
    cfg.eval_images = 0
    return cfg


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive_and_nothing_is_written(shapes, tmp_path, steps, capsys):
    from sam_jax.cli import main

    work = tmp_path / "work"
    code = main(
        ["train", "--config", "shapes_tiny", f"--config.data.train_dir={shapes}", "--workdir", str(work)]
        + [f"--config.steps={steps}"]
    )
    assert code == 1
    assert f"steps={steps} must be a positive number" in capsys.readouterr().err
    assert not work.exists()  # refused before the work directory is made


def test_a_schedule_beyond_steps_is_warned(shapes):
    from sam_jax.train.trainer import check_config, load_config_file

    cfg = load_config_file("base")  # the paper's recipe: warmup 250, decays at 120k and 173,333
    cfg.data.train_dir = str(shapes)
    cfg.steps = 3
    with pytest.warns(UserWarning) as record:
        check_config(cfg)
    text = " ".join(str(w.message) for w in record)
    assert "optim.warmup_steps=250 is not below steps=3" in text
    assert "optim.decay_steps (120000, 173333) lie beyond steps=3" in text
    cfg.steps = 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config(cfg)  # the full-length run: no warning


def test_config_steps_with_a_space_is_accepted():
    from sam_jax.cli import config_overrides

    assert config_overrides(["--config.steps", "5", "--config.optim.lr=1e-3"]) == ["steps=5", "optim.lr=1e-3"]
    assert config_overrides(["--config.steps"]) is None
    assert config_overrides(["--steps=5"]) is None


def test_interrupt_saves_the_step_and_the_rerun_resumes(shapes, tmp_path, monkeypatch, capsys):
    """SIGINT mid-run through `sam-jax train`: the step ends, its checkpoint is saved, one line is printed,
    the exit code is 130; the same command then resumes from that step and finishes. SIGTERM too (143)."""
    from sam_jax.cli import main
    from sam_jax.train.trainer import Trainer

    real = Trainer.run_step
    sent = {}

    def run_step(self):
        out = real(self)
        if int(self.state.step) == sent.get("at") and sent.get("signal"):
            os.kill(os.getpid(), sent.pop("signal"))
        return out

    monkeypatch.setattr(Trainer, "run_step", run_step)
    work = tmp_path / "work"
    argv = ["train", "--config", "shapes_tiny", "--workdir", str(work), "--quiet", f"--config.data.train_dir={shapes}"]
    argv += ["--config.steps=6", "--config.batch_size=2", "--config.data.masks_per_image=2", "--config.log_every=1"]
    argv += ["--config.checkpoint.every=100", "--config.checkpoint.async_save=False", "--config.optim.warmup_steps=1"]
    argv += ["--config.optim.decay_steps=[5]", "--config.loss.num_point_iters=1"]

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    sent.update(at=2, signal=signal.SIGINT)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2; checkpoint saved; rerun the same command to resume" in err
    assert "Traceback" not in err
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back

    sent.update(at=4, signal=signal.SIGTERM)
    assert main(argv) == 143
    assert "interrupted at step 4" in capsys.readouterr().err

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained to step 6 (last logged loss" in out
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step trained once: resumed where it stopped

    assert main(argv) == 0  # a finished run: nothing trained, the last logged loss reported
    assert "trained to step 6 (last logged loss" in capsys.readouterr().out


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(shapes, tmp_path, capsys):
    """(The first run also announces the compilation of its step, which can take a minute.)"""
    from sam_jax.train.trainer import Trainer, TrainingError

    work = tmp_path / "work"
    cfg = _cfg(shapes, steps=4, **{"checkpoint.every": 2})
    tr = Trainer(cfg, work)
    tr.train(steps=2)
    out = capsys.readouterr().out
    assert "compiling the training step..." in out and "compiled the training step in" in out
    at_2 = jax.device_get(tr.state.params)
    tr.quiet = True
    tr.train(steps=4)
    tr.close()
    manifests = sorted(p.name for p in (work / "checkpoint_manifests").iterdir())
    assert manifests == ["2.json", "4.json"]

    # One array file of the latest checkpoint deleted: orbax alone would read zeros or fail.
    data_files = sorted((work / "checkpoints" / "4" / "state").rglob("d/*"))
    assert data_files
    data_files[0].unlink()
    with pytest.warns(RuntimeWarning, match=r"checkpoint of step 4 is damaged .*; resuming from step 2"):
        tr = Trainer(cfg, work, quiet=True)
    assert tr.resumed_from == 2
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), at_2, jax.device_get(tr.state.params))
    assert all(jax.tree.leaves(same))
    assert (work / "checkpoints_damaged" / "4").is_dir()  # kept, out of the way
    tr.train(steps=4)  # step 4 is trained and saved again
    tr.close()
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2, 4]

    # A missing commit marker is damage too; when no checkpoint is intact, nothing moves and training stops.
    for step in (2, 4):
        (work / "checkpoints" / str(step) / "commit_success.txt").unlink(missing_ok=True)
        (work / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").unlink()
    with pytest.raises(TrainingError, match="no checkpoint in .* can be restored; step 4: .* is missing"):
        Trainer(cfg, work, quiet=True)
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2, 4]


def test_a_damaged_inference_checkpoint_is_one_line_naming_the_file(tiny_params, tiny_config, tmp_path):
    from sam_jax import load_model
    from sam_jax.checkpoint import save_params
    from sam_jax.convert.errors import CheckpointError

    path = save_params(tmp_path / "model", tiny_params, tiny_config)
    assert (path / "MANIFEST.json").is_file()
    victim = sorted((path / "params").rglob("d/*"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and victim.relative_to(path).as_posix() in message and "missing" in message
