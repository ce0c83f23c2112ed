"""`sam-jax finetune`: the three modes on a small model, the embedding cache, LoRA's merge and
export, the report, every bad input, and a learning test (a shifted synthetic domain)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.checkpoint import load_model, save_params
from sam_jax.config import tiny, with_overrides
from sam_jax.model import init_params
from sam_jax.train import coco
from sam_jax.train.coco import write_coco
from sam_jax.train.shapes import make_shapes

# Fast settings: 2 images of 2 masks per step, one correction iteration, 2 held-out images.
FAST = [
    "batch_size=2",
    "data.masks_per_image=2",
    "loss.num_point_iters=1",
    "loss.num_no_point_iters=0",
    "loss.remat_decoder=False",
    "eval_images=2",
    "eval_every=0",
    "log_every=1",
    "checkpoint.async_save=False",
    "retain_host_memory=False",
]
CONFIG = with_overrides(tiny(), {"image_encoder": {"img_size": 128, "depth": 2, "global_attn_indexes": (1,)}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A sam-jax checkpoint of a small random model (128 px input)."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_params(path, jax.device_get(init_params(CONFIG, jax.random.key(0))), CONFIG)
    return path


def shapes_coco(root: Path, n: int, *, seed: int = 0, **kw) -> Path:
    """n synthetic images (64 x 96) with their shapes as a COCO instances file -> its path."""
    make_shapes(root / "images", n, seed=seed, image_size=(64, 96), **kw)
    return write_coco(root / "images", root / "instances.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_coco(tmp_path_factory.mktemp("data"), 6)


def run(checkpoint, train, workdir, *args: str, mode: str = "decoder", steps: int = 2, **kw) -> dict:
    from sam_jax.train.finetune import finetune

    overrides = [*FAST, *args]
    return finetune(checkpoint, train, workdir, mode=mode, steps=steps, overrides=overrides, quiet=True, **kw)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def with_bad_entries(json_path: Path) -> Path:
    """The COCO file with one entry of every kind that is left out (and counted), written beside it."""
    d = json.loads(json_path.read_text())
    img, ann = d["images"][0], d["annotations"][0]
    new_id = max(i["id"] for i in d["images"]) + 1
    (json_path.parent / "broken.jpg").write_bytes(b"not a jpeg")
    d["images"] += [
        {"id": new_id, "file_name": "missing.jpg", "height": 64, "width": 96},
        {"id": new_id + 1, "file_name": "broken.jpg", "height": 64, "width": 96},
        {"id": new_id + 2, "file_name": img["file_name"], "height": 64, "width": 96},  # no annotations
    ]
    base = {"category_id": ann["category_id"], "iscrowd": 0, "bbox": [1, 1, 5, 5], "area": 25}
    d["annotations"] += [
        {**base, "id": 9001, "image_id": 12345, "segmentation": ann["segmentation"]},  # unknown image
        {**base, "id": 9002, "image_id": new_id, "segmentation": ann["segmentation"]},
        {**base, "id": 9003, "image_id": new_id + 1, "segmentation": ann["segmentation"]},
        {**base, "id": 9004, "image_id": img["id"], "segmentation": [[1, 1, 10, 10]]},  # 2 points
        {**base, "id": 9005, "image_id": img["id"], "segmentation": [[200, 200, 300, 200, 300, 300]]},  # outside
        {**base, "id": 9006, "image_id": img["id"]},  # a bbox, no segmentation
    ]
    out = json_path.with_name("with_bad.json")
    out.write_text(json.dumps(d))
    return out


# ----------------------------------------------------------------------------- modes


def test_decoder_mode_encodes_each_image_once_then_reads_the_cache(checkpoint, data, tmp_path, monkeypatch):
    from sam_jax.train import embedding_cache, step
    from sam_jax.train.finetune import REPORT_FILE

    calls = []
    encode_image = embedding_cache.encode_image
    monkeypatch.setattr(embedding_cache, "encode_image", lambda *a: calls.append(1) or encode_image(*a))

    def no_encoder(*a, **k):
        raise AssertionError("the decoder-mode step ran the image encoder")

    monkeypatch.setattr(step, "encode", no_encoder)
    train = with_bad_entries(data)
    report = run(checkpoint, train, tmp_path / "work")
    images = report["data"]["images"]
    assert len(calls) == images == 6 - 1  # one image held out
    assert len(list((tmp_path / "work" / "embeddings").rglob("*.npz"))) == images
    on_disk = json.loads((tmp_path / "work" / REPORT_FILE).read_text())
    assert on_disk == report
    assert set(report) == {"before", "after", "data", "mode", "steps", "seconds"}
    assert report["mode"] == "decoder" and report["steps"] == 2
    for scores in (report["before"], report["after"]):
        assert set(scores) == {"1-click", "1-click-predicted", "3-click", "box"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert report["data"]["skipped"] == {
        coco.UNKNOWN_IMAGE: 1,
        coco.IMAGE_UNREADABLE: 2,
        coco.SHORT_POLYGON: 1,
        coco.EMPTY_MASK: 1,
        coco.NO_SEGMENTATION: 1,
        coco.NO_ANNOTATIONS: 1,
    }
    # The encoder is frozen: the fine-tuned model's is the checkpoint's, bit for bit.
    before, after = load_model(checkpoint).params, load_model(tmp_path / "work" / "model").params
    assert all(np.array_equal(a, b) for a, b in zip(flat(before["image_encoder"]), flat(after["image_encoder"])))
    changed = [
        k for k, v in flat(before["mask_decoder"]).items() if not np.array_equal(v, flat(after["mask_decoder"])[k])
    ]
    assert changed, "the mask decoder did not train"

    # A rerun resumes (here: finds the steps done) and never runs the encoder again.
    calls.clear()
    again = run(checkpoint, train, tmp_path / "work")
    assert calls == [] and again["steps"] == 2 and again["before"] == report["before"]
    assert again["after"] == report["after"]


def _state(checkpoint, train, workdir, mode: str):
    """The restored trainer of a finished fine-tune (its params, adapters included)."""
    from sam_jax.train.finetune import finetune_config
    from sam_jax.train.trainer import Trainer

    cfg = finetune_config(load_model(checkpoint).config, checkpoint, train, mode=mode, steps=2, overrides=FAST)
    return Trainer(cfg, workdir, quiet=True)


def test_lora_trains_adapters_only_and_exports_a_plain_sam(checkpoint, data, tmp_path, photo):
    import torch
    from safetensors.torch import load_file

    from bench.official import build_official
    from sam_jax.cli import main
    from sam_jax.train.lora import LORA, merge_adapters
    from tests.test_parity import run_end_to_end

    run(checkpoint, data, tmp_path / "work", mode="lora")
    trainer = _state(checkpoint, data, tmp_path / "work", "lora")
    try:
        params = jax.device_get(trainer.state.params)
        scale = trainer.lora.scale
    finally:
        trainer.close()
    base = load_model(checkpoint).params
    # The frozen base (the whole image encoder) is bit-identical; the adapters and the decoder trained.
    assert all(np.array_equal(a, b) for a, b in zip(flat(base["image_encoder"]), flat(params["image_encoder"])))
    adapters = flat(params[LORA])
    assert len(adapters) == 2 * 2 * CONFIG.image_encoder.depth  # a and b of qkv and proj in every block
    assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("['b']"))
    # model/ is the merged model: a plain SAM tree, W + scale * a @ b.
    model = load_model(tmp_path / "work" / "model")
    merged = jax.device_get(merge_adapters(params, scale))
    assert set(flat(model.params)) == set(flat(base))
    for k, v in flat(merged).items():
        np.testing.assert_allclose(flat(model.params)[k], v, rtol=0, atol=0)
    qkv = params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    a, b = (params[LORA]["image_encoder"]["blocks_0"]["attn"]["qkv"][n] for n in "ab")
    np.testing.assert_allclose(
        model.params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"], qkv + scale * a @ b, atol=1e-6
    )

    # Exported with official key names, it loads strictly in the official model and gives the
    # adapted model's outputs.
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "work" / "model"), str(out)]) == 0
    official = build_official(CONFIG)
    official.load_state_dict({k: v.to(torch.float32) for k, v in load_file(out).items()}, strict=True)
    run_end_to_end(official, merged, CONFIG, photo, "box_points", True)


def test_full_mode_trains_the_encoder(checkpoint, data, tmp_path):
    from sam_jax.train.finetune import finetune_config

    report = run(checkpoint, data, tmp_path / "work", mode="full")
    assert report["mode"] == "full" and report["steps"] == 2
    before, after = load_model(checkpoint).params, load_model(tmp_path / "work" / "model").params
    changed = [
        k for k, v in flat(before["image_encoder"]).items() if not np.array_equal(v, flat(after["image_encoder"])[k])
    ]
    assert len(changed) > 10
    vit_b = finetune_config(with_overrides(tiny(), {"name": "vit_b"}), checkpoint, data, mode="full")
    assert (vit_b.drop_path_rate, vit_b.optim.layer_decay) == (0.6, 0.6)  # the paper's for ViT-B


@pytest.mark.parametrize(("name", "blocks"), [("vit_b", 12), ("vit_t", 10), ("sam2.1_hiera_tiny", 12)])
def test_lora_default_targets_are_every_attention_block_of_each_encoder(name, blocks):
    """The default targets find the attention projections of the ViT's blocks, of TinyViT's attention
    stages (its MBConv stage has none) and of Hiera's trunk."""
    from sam_jax.config import get_config
    from sam_jax.model import abstract_params
    from sam_jax.train.lora import LoraSpec

    found = LoraSpec(rank=4, alpha=4.0).target_modules(abstract_params(get_config(name)))
    assert len(found) == 2 * blocks and {p[-2:] for p in found} == {("attn", "qkv"), ("attn", "proj")}, found


def test_lora_merge_equals_the_low_rank_forward(checkpoint):
    """x @ merged W == x @ W + scale * (x @ a) @ b, and the merge passes no gradient to W."""
    from sam_jax.train.lora import LoraSpec, merge_adapters

    params = jax.device_get(load_model(checkpoint).params)
    spec = LoraSpec(rank=2, alpha=4.0)
    adapted = spec.add(params, jax.random.key(2))
    adapted["lora"]["image_encoder"]["blocks_1"]["attn"]["proj"]["b"] = jnp.ones((2, 64))
    x = jax.random.normal(jax.random.key(3), (5, 64))
    w = params["image_encoder"]["blocks_1"]["attn"]["proj"]["kernel"]
    a = adapted["lora"]["image_encoder"]["blocks_1"]["attn"]["proj"]["a"]
    merged = merge_adapters(adapted, spec.scale)
    np.testing.assert_allclose(
        x @ merged["image_encoder"]["blocks_1"]["attn"]["proj"]["kernel"],
        x @ w + 2.0 * (x @ a) @ jnp.ones((2, 64)),
        rtol=1e-5,
        atol=1e-5,
    )
    grads = jax.grad(
        lambda p: merge_adapters(p, spec.scale)["image_encoder"]["blocks_1"]["attn"]["proj"]["kernel"].sum()
    )(adapted)
    assert not np.any(grads["image_encoder"]["blocks_1"]["attn"]["proj"]["kernel"])
    assert np.any(grads["lora"]["image_encoder"]["blocks_1"]["attn"]["proj"]["b"])


# ----------------------------------------------------------------------------- bad input


def _cli(capsys, *args: str) -> tuple[int, str]:
    from sam_jax.cli import main

    try:
        code = main(["finetune", *args, "--cache-dir", ""])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "case, expected_code, message",
    [
        ("not_coco", 1, "not a COCO instances file: no 'annotations', 'categories'"),
        ("bad_checkpoint", 1, "garbage.pth"),
        ("unknown_mode", 2, "invalid choice: 'adapter'"),
        ("zero_steps", 1, "--steps 0 must be a positive number"),
        ("negative_steps", 1, "--steps -3 must be a positive number"),
        ("all_filtered", 1, "no usable images (left out: 6 image without usable annotations, 1 polygon with fewer"),
        (
            "all_unreadable",
            1,
            "no usable training image after filtering (left out: 8 annotation of an unknown image id, 4 image missing",
        ),
        ("missing_data", 1, "no such file or folder"),
    ],
)
def test_bad_input_is_one_clear_line(case, expected_code, message, checkpoint, data, tmp_path, capsys):
    train, ckpt, extra = str(data), str(checkpoint), []
    if case == "not_coco":
        (tmp_path / "x.json").write_text(json.dumps({"images": []}))
        train = str(tmp_path / "x.json")
    elif case == "bad_checkpoint":
        (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
        ckpt = str(tmp_path / "garbage.pth")
    elif case == "unknown_mode":
        extra = ["--mode", "adapter"]
    elif case in ("zero_steps", "negative_steps"):
        extra = ["--steps", "0" if case == "zero_steps" else "-3"]
    elif case == "all_filtered":
        d = json.loads(data.read_text())
        d["annotations"] = [{**d["annotations"][0], "segmentation": [[1, 1, 2, 2]]}]
        train = str(tmp_path / "filtered.json")
        Path(train).write_text(json.dumps(d))
    elif case == "all_unreadable":
        d = json.loads(data.read_text())
        d["images"] = [{**i, "file_name": f"gone_{i['id']}.jpg"} for i in d["images"][:4]]
        train = str(data.parent / "unreadable.json")
        Path(train).write_text(json.dumps(d))
        extra = ["--val", str(data)]
    elif case == "missing_data":
        train = str(tmp_path / "nothing_here")
    with pytest.warns(RuntimeWarning) if case == "all_unreadable" else _nothing():
        code, err = _cli(capsys, "--checkpoint", ckpt, "--train", train, "--workdir", str(tmp_path / "w"), *extra)
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if not line.startswith(" ")]
    assert len(err.splitlines()) == 1, err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "w" / "report.json").exists() and not (tmp_path / "w" / "model").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- learning


@pytest.mark.optimized
def test_decoder_finetune_learns_a_shifted_domain(tmp_path):
    """Pretrained briefly (the demo's recipe) on textured circles, ellipses and rectangles, then
    fine-tuned in decoder mode (frozen encoder, cached embeddings) on flat-coloured stars, rings and
    triangles at another scale, written as COCO: the held-out 1-click mIoU ends clearly above its
    value before."""
    from sam_jax.train.trainer import Trainer, apply_overrides, load_config_file

    big = dict(size_range=(0.2, 0.5), max_shapes=4)
    pre = tmp_path / "pretrain_data"
    make_shapes(pre, 48, seed=1, image_size=(96, 128), categories=("circle", "ellipse", "rectangle"), **big)
    overrides = ["steps=250", "optim.warmup_steps=10", "optim.decay_steps=()", "checkpoint.every=1000"]
    overrides += [f"data.train_dir={pre}", "log_every=1000", "checkpoint.async_save=False", "retain_host_memory=False"]
    trainer = Trainer(apply_overrides(load_config_file("shapes_p8"), overrides), tmp_path / "pretrain", quiet=True)
    try:
        trainer.train()
    finally:
        trainer.close()
    shifted = shapes_coco(
        tmp_path / "shifted", 40, seed=2, categories=("star", "ring", "triangle"), colour_by_category=True, **big
    )
    report = run(
        tmp_path / "pretrain" / "model",
        shifted,
        tmp_path / "ft",
        "batch_size=4",
        "data.masks_per_image=3",
        "optim.lr=1e-3",
        "loss.dice_weight=5.0",  # the demo recipe's loss for short runs (train/configs/shapes_p8.py)
        "loss.focal_alpha=0.75",
        "eval_images=8",
        "val_fraction=0.2",
        steps=100,
    )
    before, after = report["before"]["1-click"], report["after"]["1-click"]
    assert after > before + 0.05, report
