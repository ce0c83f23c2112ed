"""The benchmark harness (bench/) end to end on the tiny config, and its agreement checks.

The harness runs as `python -m bench`, every case, one repeat, in two processes side by
side: training (mostly the single-threaded compilation of the train step) beside the other
cases, so that the test takes about a minute on 2 cores rather than two. Their timings are
not checked (they are meaningless under that contention), only that every case ran, that
both sides produced positive numbers, and that ours and the official outputs agreed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.cases import CASES, amg_check, close_check, masks_check

ROOT = Path(__file__).resolve().parent.parent
GROUPS = (["train"], [c for c in CASES if c != "train"])
EXPECTED_ROWS = {
    "encoder_b1",
    "encoder_b2",
    "predict_1",
    "predict_64",
    "amg",
    "memory",
    "compile_cold",
    "compile_warm",
    "train_shapes_tiny",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Rows of both harness runs, merged by name."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    procs = []
    for i, cases in enumerate(GROUPS):
        cmd = [
            sys.executable,
            "-m",
            "bench",
            "--model",
            "tiny",
            "--cases",
            ",".join(cases),
            "--repeats",
            "1",
            "--encoder-batches",
            "1,2",
            "--amg-points-per-side",
            "4",
            "--out",
            str(tmp / f"{i}.json"),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"{' '.join(p.args[2:])} failed ({p.returncode}):\n{out[-4000:]}"
    rows, meta = {}, []
    for i in range(len(GROUPS)):
        data = json.loads((tmp / f"{i}.json").read_text())
        rows.update(data["rows"])
        meta.append(data)
    return {"rows": rows, "runs": meta, "stdout": outputs}


def test_every_case_ran(results):
    rows = results["rows"]
    assert set(rows) == EXPECTED_ROWS
    assert {r["case"] for r in rows.values()} == set(CASES)
    for run in results["runs"]:
        assert run["matmul"]["jax_gflops"] > 0 and run["matmul"]["torch_gflops"] > 0
        assert run["meta"]["model"] == "tiny" and run["meta"]["cpu"]["model_name"]
    assert "official/ours" in results["stdout"][1]  # the table was printed


def test_both_sides_measured_and_agree(results):
    for name, row in results["rows"].items():
        assert row["ours"] > 0 and all(t > 0 for t in row["ours_runs"]), name
        assert row["check"]["ok"] is True, (name, row["check"])
        if row["case"] == "train":
            assert row["official"] is None and row["ratio"] is None  # the official package cannot train
            continue
        assert row["official"] > 0 and all(t > 0 for t in row["official_runs"]), name
        assert row["ratio"] == pytest.approx(row["official"] / row["ours"])
        assert 1e-3 < row["ratio"] < 1e3, (name, row["ratio"])


def test_case_details(results):
    rows = results["rows"]
    assert rows["encoder_b1"]["check"]["max_abs_diff"] <= 1e-3
    for name in ("encoder_b1", "encoder_b2", "predict_64", "amg"):
        extra = rows[name]["extra"]
        assert extra["gflop"] > 0 and extra["ours_gflops"] > 0 and extra["official_gflops"] > 0, name
    # Batch 2 costs twice the FLOPs of batch 1.
    assert rows["encoder_b2"]["extra"]["gflop"] == pytest.approx(2 * rows["encoder_b1"]["extra"]["gflop"], rel=1e-3)
    assert rows["predict_64"]["check"]["mask_agreement"] >= 0.999
    mem = rows["memory"]["extra"]
    assert mem["ours"]["torch_loaded"] is False and mem["official"]["torch_loaded"] is True
    assert mem["ours"]["peak_mb"] >= mem["ours"]["rss_before_mb"] > 0
    for name in ("compile_cold", "compile_warm"):
        assert rows[name]["extra"]["ours_second_call_s"] > 0
    train = rows["train_shapes_tiny"]["extra"]
    assert train["steps_per_s"] > 0
    assert train["examples_per_s"] == pytest.approx(train["batch_size"] * train["steps_per_s"])
    assert train["gflop"] > 0 and 0 < train["ours_fraction_of_matmul"] < 2


# ----------------------------------------------------------------------------- the checks can fail


def test_close_check_fails_on_a_difference():
    ref = np.zeros((2, 4, 4, 8), np.float32)
    assert close_check(ref + 1e-5, ref, atol=1e-3)["ok"]
    assert not close_check(ref + 0.01, ref, atol=1e-3)["ok"]
    assert not close_check(ref[:1], ref, atol=1e-3)["ok"]


def test_masks_check_fails_on_different_masks_or_scores():
    masks = np.random.default_rng(0).random((4, 3, 20, 30)) > 0.5
    scores = np.ones((4, 3), np.float32)
    assert masks_check((masks, scores), (masks, scores))["ok"]
    assert not masks_check((~masks, scores), (masks, scores))["ok"]
    assert not masks_check((masks, scores + 2e-4), (masks, scores))["ok"]


def test_amg_check_fails_on_missing_or_different_masks():
    rng = np.random.default_rng(1)
    recs = [{"segmentation": rng.random((16, 16)) > 0.5} for _ in range(5)]
    assert amg_check(recs, recs)["ok"]
    assert not amg_check(recs[:2], recs)["ok"]
    flipped = [{"segmentation": ~r["segmentation"]} for r in recs]
    assert not amg_check(flipped, recs)["ok"]
    assert amg_check([], [])["ok"]


def test_bad_arguments_are_refused(capsys, tmp_path):
    from bench.__main__ import main

    for argv, words in (
        (["--cases", "encoder,nope"], "unknown case"),
        (["--repeats", "0"], "integer >= 1"),
        (["--encoder-batches", "1,x"], "positive integers"),
        (["--model", "vit_q"], "invalid choice"),
        (["--out", str(tmp_path)], "is a directory"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_accelerator_script_runs_every_item(tmp_path):
    """`python -m bench.accelerator` on tiny: every item present, numbers positive, FLOPs the
    official count, and the bf16-vs-float32 mask check within its range."""
    from bench import accelerator
    from bench.cases import encoder_flops
    from sam_jax.config import get_config

    out = tmp_path / "gpu.json"
    assert (
        accelerator.main(
            [
                "--models",
                "tiny",
                "--batch",
                "1",
                "--iters",
                "1",
                "--attention",
                "chunked,xla",
                "--fp32-attention",
                "xla",
                "--matmul-n",
                "256",
                "--agreement",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    items = json.loads(out.read_text())["items"]
    assert not [k for k, v in items.items() if "error" in v or "skipped" in v]
    assert items["gflop_tiny"]["gflop_per_image"] == pytest.approx(encoder_flops(get_config("tiny"), 1) / 1e9)
    for name in ("ours_tiny_bf16_chunked", "ours_tiny_bf16_xla", "ours_tiny_fp32_xla"):
        assert items[name]["images_per_s"] > 0
    assert items["ours_tiny_bf16_xla"]["tflops"] > 0 and items["matmul_bf16_jax"]["tflops"] > 0
    agreement = items["agreement_tiny_bf16_vs_fp32"]
    assert agreement["masks"] == 6 and 0.9 < agreement["mean_iou"] <= 1.0


def test_input_pipeline_bench_compares_both_paths(tmp_path):
    """`python -m bench.input_pipeline` on a small record: both paths timed, the same examples,
    workers per chip = ceil(rate / records per second per core)."""
    import math

    from bench import input_pipeline

    out = tmp_path / "input.json"
    args = ["--config", "tiny", "--size", "320x200", "--num-masks", "12", "--masks-per-image", "4"]
    result = input_pipeline.main([*args, "--repeats", "1", "--images-per-s", "3", "--out", str(out)])
    assert result["same_examples"] and json.loads(out.read_text())["same_examples"]
    for path in ("rle", "full"):
        row = result[path]
        assert row["records_per_s"] == pytest.approx(1 / row["total_s"])
        assert 0 < row["jpeg_decode_s"] < row["total_s"]
        assert result["workers_per_chip"]["3"][path] == math.ceil(3 / row["records_per_s"])
    assert "rle_decode_s" in result["full"] and "rle_decode_s" not in result["rle"]


def test_photo_sizes_runs_both_sides_and_they_agree(tmp_path):
    """`python -m bench.photo_sizes` on tiny, one size and task: each side in its own process, the
    time and the peak memory of both, their agreement, the CPU and its product rates in the JSON."""
    out = tmp_path / "photo.json"
    cmd = [sys.executable, "-m", "bench.photo_sizes", "--model", "tiny", "--sizes", "0.24MP", "--tasks", "predict64"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    done = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["cpu"]["model_name"] and data["meta"]["matmul"]["jax_gflops"] > 0
    assert set(data["rows"]) == {"predict64_0.24MP_time", "predict64_0.24MP_peak"}
    for row in data["rows"].values():
        assert row["ours"] > 0 and row["official"] > 0, row
    assert data["rows"]["predict64_0.24MP_time"]["check"]["ok"] is True
