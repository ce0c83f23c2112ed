"""Text prompts through `SamPredictor` and `sam-jax segment --text`: the predictor's text path
equals the functional core fed `make_prompts(text=embed_text(...))`; batching, errors, the CLI."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sam_jax import cli
from sam_jax.checkpoint import save_params
from sam_jax.cli import main
from sam_jax.clip_folder import make_random_clip
from sam_jax.model import SamModel, abstract_params
from sam_jax.predictor import SamPredictor
from sam_jax.prompts import make_prompts
from sam_jax.text import TextEncoder
from sam_jax.transforms import postprocess_masks

TEXT_DIM = 64  # make_random_clip's projection_dim
WORDS = ["circle", "triangle", "rectangle"]


@pytest.fixture(scope="module")
def text_config(tiny_config):
    return dataclasses.replace(
        tiny_config, prompt_encoder=dataclasses.replace(tiny_config.prompt_encoder, text_embed_dim=TEXT_DIM)
    )


@pytest.fixture(scope="module")
def text_model(text_config, tiny_params):
    """The shared tiny params plus random text layers (cheaper than compiling a fresh init)."""
    shapes = abstract_params(text_config)["prompt_encoder"]
    rng = np.random.default_rng(0)
    text_layers = {
        name: {k: (rng.normal(size=v.shape) / np.sqrt(v.shape[0])).astype(np.float32) for k, v in layer.items()}
        for name, layer in shapes.items()
        if name.startswith("text")
    }
    tokens = tiny_params["mask_decoder"]["mask_tokens"]["embedding"]
    text_tokens = {"embedding": rng.normal(size=tokens.shape).astype(np.float32)}  # the text rows' own mask tokens
    params = {
        **tiny_params,
        "prompt_encoder": {**tiny_params["prompt_encoder"], **text_layers},
        "mask_decoder": {**tiny_params["mask_decoder"], "text_mask_tokens": text_tokens},
    }
    return SamModel(text_config, params)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_random_clip(tmp_path_factory.mktemp("clip") / "clip", WORDS)


@pytest.fixture(scope="module")
def text_encoder(clip_folder):
    encoder = TextEncoder.from_folder(clip_folder)
    assert encoder.embed_dim == TEXT_DIM
    return encoder


@pytest.fixture(scope="module")
def predictor(text_model, text_encoder, photo):
    p = SamPredictor(text_model, text_encoder=text_encoder)
    p.set_image(photo)
    return p


def _reference(predictor, text_emb, *, point_coords=None, point_labels=None, boxes=None, multimask_output=True):
    """The functional core, no predictor: make_prompts -> decode -> postprocess (B prompts, unsqueezed)."""
    cfg, orig, inp = predictor.model.config, predictor.original_size, predictor.input_size
    b = text_emb.shape[0]
    if point_coords is not None:
        point_coords = predictor.transform.apply_coords(np.asarray(point_coords, np.float64).reshape(b, -1, 2), orig)
    if boxes is not None:
        boxes = predictor.transform.apply_boxes(np.asarray(boxes, np.float64).reshape(b, 4), orig)
    prompts = make_prompts(
        batch_size=b,
        mask_size=cfg.low_res_mask_size,
        point_coords=point_coords,
        point_labels=point_labels,
        boxes=boxes,
        text=text_emb,
    )
    emb = predictor.features.broadcast_to(b)
    low, iou = predictor.model.decode(emb, jax.tree.map(jnp.asarray, prompts), multimask_output)  # jitted `decode`
    masks = postprocess_masks(low, inp, orig, cfg.image_size) > cfg.mask_threshold
    return np.asarray(masks), np.asarray(iou), np.asarray(low)


def _same(ours, ref, atol=1e-4):
    masks, scores, logits = ours
    ref_masks, ref_scores, ref_logits = ref
    assert masks.shape == ref_masks.shape and masks.dtype == bool
    assert np.mean(masks == ref_masks) > 0.9999
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    np.testing.assert_allclose(logits, ref_logits, atol=atol)


def test_text_alone_is_the_functional_core(predictor, text_encoder, text_config):
    m = text_config.low_res_mask_size  # 64 for the tiny config (256 officially)
    masks, scores, logits = predictor.predict(text="circle")
    assert masks.shape == (3, 300, 451) and scores.shape == (3,) and logits.shape == (3, m, m)
    ref = _reference(predictor, text_encoder.embed_text("circle"))
    _same((masks, scores, logits), tuple(x[0] for x in ref))
    single = predictor.predict(text=["circle"], multimask_output=False)  # a list of one: one prompt, squeezed
    assert single[0].shape == (1, 300, 451) and single[1].shape == (1,) and single[2].shape == (1, m, m)
    _same(single, tuple(x[0] for x in _reference(predictor, text_encoder.embed_text("circle"), multimask_output=False)))


def test_text_with_points_and_different_texts(predictor, text_encoder):
    pts, lab = np.array([[120.0, 90.0], [300.0, 200.0]]), np.array([1, 0])
    ours = predictor.predict(point_coords=pts, point_labels=lab, text="triangle")
    ref = _reference(predictor, text_encoder.embed_text("triangle"), point_coords=pts, point_labels=lab[None])
    _same(ours, tuple(x[0] for x in ref))
    points_only = predictor.predict(point_coords=pts, point_labels=lab)
    assert np.abs(ours[2] - points_only[2]).max() > 1e-3, "the text token changed nothing"
    other = predictor.predict(point_coords=pts, point_labels=lab, text="rectangle")
    assert np.abs(ours[2] - other[2]).max() > 1e-3, "different texts gave the same masks"
    assert np.abs(predictor.predict(text="circle")[2] - predictor.predict(text="triangle")[2]).max() > 1e-3


def test_several_texts_are_several_prompts(predictor, text_encoder):
    masks, scores, logits = predictor.predict(text=WORDS)  # 3 prompts, padded to the bucket of 4
    assert masks.shape == (3, 3, 300, 451) and scores.shape == (3, 3)
    for i, word in enumerate(WORDS):  # == each text alone (itself == the functional core, tested above)
        _same((masks[i], scores[i], logits[i]), predictor.predict(text=word))
    # One text per box; a single string is shared by every box.
    boxes = np.array([[10.0, 20.0, 200.0, 180.0], [100.0, 50.0, 440.0, 290.0]])
    per_box = predictor.predict(box=boxes, text=["circle", "triangle"], multimask_output=False)
    _same(
        per_box,
        _reference(predictor, text_encoder.embed_text(["circle", "triangle"]), boxes=boxes, multimask_output=False),
    )
    shared = predictor.predict(box=boxes, text="circle", multimask_output=False)
    _same(
        shared,
        _reference(predictor, text_encoder.embed_text(["circle", "circle"]), boxes=boxes, multimask_output=False),
    )


def test_compilation_stays_bounded(predictor):
    fresh = SamPredictor(predictor.model, text_encoder=predictor.text_encoder)
    fresh.set_image(np.zeros((300, 451, 3), np.uint8))
    before = fresh.text_encoder._text._cache_size()
    for texts in (["circle", "triangle", "rectangle"], ["circle", "circle", "triangle", "rectangle"]):  # bucket 4
        fresh.predict(text=texts)
    for word in WORDS:
        fresh.predict(text=word)  # bucket 1
    assert fresh._predict._cache_size() == 2
    assert fresh.text_encoder._text._cache_size() - before <= 2


def test_predict_batch_with_texts(predictor, text_encoder, photo):
    second = np.ascontiguousarray(photo[40:260, 100:300])
    batch = SamPredictor(predictor.model, text_encoder=text_encoder)
    batch.set_image_batch([photo, second])
    masks, scores, logits = batch.predict_batch(
        box_batch=[None, np.array([[10.0, 10.0, 150.0, 200.0], [50.0, 0.0, 199.0, 100.0]])],
        text_batch=["circle", ["triangle", "rectangle"]],
    )
    assert masks[0].shape == (3, 300, 451) and masks[1].shape == (2, 3, 220, 200) and scores[1].shape == (2, 3)
    _same((masks[0], scores[0], logits[0]), predictor.predict(text="circle"))
    alone = SamPredictor(predictor.model, text_encoder=text_encoder)
    alone.set_image(second)
    _same(
        (masks[1][1], scores[1][1], logits[1][1]),
        alone.predict(box=np.array([50.0, 0.0, 199.0, 100.0]), text="rectangle"),
    )
    with pytest.raises(ValueError, match="text_batch has 1 entries for 2 images"):
        batch.predict_batch(text_batch=["circle"])
    with pytest.raises(ValueError, match="text_batch must be a list"):
        batch.predict_batch(text_batch="circle")


def test_errors(predictor, text_encoder, tiny_config, tiny_params, photo):
    plain = SamPredictor(SamModel(tiny_config, tiny_params), text_encoder=text_encoder)  # a checkpoint without text
    plain.set_image(photo)
    with pytest.raises(
        ValueError, match="this checkpoint has no text projection: it was not trained with text prompts"
    ):
        plain.predict(text="circle")
    plain.predict(point_coords=[[100.0, 100.0]], point_labels=[1])  # without text it works as before
    no_encoder = SamPredictor(predictor.model)
    no_encoder.set_image(photo)
    with pytest.raises(ValueError, match="no text encoder"):
        no_encoder.predict(text="circle")
    with pytest.raises(ValueError, match="width 32.*width 64"):
        SamPredictor(predictor.model, text_encoder=types.SimpleNamespace(embed_dim=32))
    for text, message in [
        ("", "text is empty"),
        ("   ", "text is empty"),
        (["circle", ""], r"text\[1\] is empty"),
        ([], "text is an empty list"),
        (5, "text must be a string or a list of strings, got int"),
        (np.array(["circle"]), "text must be a string or a list of strings, got ndarray"),
        (["circle", 3], r"text\[1\] must be a string, got int"),
    ]:
        with pytest.raises(ValueError, match=message):
            predictor.predict(text=text)
    with pytest.raises(ValueError, match="text has 2 strings for 3 prompts"):
        predictor.predict(box=np.tile([[0.0, 0.0, 10.0, 10.0]], (3, 1)), text=["circle", "triangle"])


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("sam-jax"), err
    return err


def test_cli_segment_with_text(
    tmp_path, text_model, clip_folder, predictor, tiny_config, tiny_params, photo, capsys, monkeypatch
):
    ckpt = save_params(tmp_path / "text_ckpt", text_model.params, text_model.config)
    Image.fromarray(photo).save(tmp_path / "cat.png")
    base = ["segment", str(tmp_path / "cat.png"), "--checkpoint", str(ckpt), "--cache-dir", ""]
    out = tmp_path / "one"
    assert main([*base, "--text", "circle", "--clip", str(clip_folder), "--out", str(out)]) == 0
    result = json.loads((out / "cat_scores.json").read_text())
    masks, scores, _ = predictor.predict(text="circle", multimask_output=False)
    assert result["text"] == ["circle"] and result["masks"] == ["cat_mask0.png"] and result["best"] == 0
    np.testing.assert_allclose(result["scores"], scores, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "cat_mask0.png")) > 0, masks[0])
    assert Image.open(out / "cat_overlay.png").size == (451, 300)
    # One prompt per --text, each with the point.
    out = tmp_path / "two"
    argv = [
        *base,
        "--text",
        "circle",
        "--text",
        "triangle",
        "--point",
        "200,150",
        "--clip",
        str(clip_folder),
        "--multimask",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "cat_scores.json").read_text())
    assert result["text"] == ["circle", "triangle"] and len(result["scores"]) == 2 and len(result["scores"][1]) == 3
    _, scores, _ = predictor.predict(text="triangle", point_coords=[[200.0, 150.0]], point_labels=[1])
    np.testing.assert_allclose(result["scores"][1], scores, atol=1e-5)
    assert result["masks"][1][2] == "cat_text1_mask2.png" and (out / "cat_text1_mask2.png").is_file()
    capsys.readouterr()
    # Errors: --text without --clip; a checkpoint without a text projection; an empty --text.
    assert "--text needs --clip FOLDER" in _one_line_error(
        [*base, "--text", "circle", "--out", str(tmp_path / "x")], capsys
    )
    with monkeypatch.context() as m:  # a checkpoint without text layers (loaded: no need to write one)
        m.setattr(cli, "_load", lambda args: SamModel(tiny_config, tiny_params))
        err = _one_line_error(
            [*base, "--text", "circle", "--clip", str(clip_folder), "--out", str(tmp_path / "x")], capsys
        )
    assert "has no text projection: it was not trained with text prompts" in err
    assert "is empty" in _one_line_error(
        [*base, "--text", " ", "--clip", str(clip_folder), "--out", str(tmp_path / "x")], capsys
    )
    assert "no config.json" in _one_line_error(
        [*base, "--text", "circle", "--clip", str(tmp_path), "--out", str(tmp_path / "x")], capsys
    )


def test_cli_eval_with_text(
    tmp_path, text_model, clip_folder, text_encoder, tiny_config, tiny_params, capsys, monkeypatch
):
    """`sam-jax eval --text-categories`: the clicks, then each caption alone against all masks of
    its category (`evaluate_text`), with the text-blind level; clear errors."""
    from sam_jax.train.shapes import make_shapes
    from sam_jax.train.text import evaluate_text

    data = tmp_path / "shapes"
    make_shapes(data, 2, seed=0, image_size=(64, 96), categories=("circle", "triangle", "star"))
    ckpt = save_params(tmp_path / "text_ckpt", text_model.params, text_model.config)
    base = ["eval", str(data), "--checkpoint", str(ckpt), "--clicks", "1", "--cache-dir", ""]
    out = tmp_path / "eval.json"
    assert main([*base, "--text-categories", "circle, triangle", "--clip", str(clip_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text 'circle'" in printed and "every query answered with all the shapes" in printed
    result = json.loads(out.read_text())
    captions = dict(zip(["circle", "triangle"], text_encoder.embed_text(["circle", "triangle"])))
    want = evaluate_text(text_model.params, text_model.config, data, captions)
    assert result["text"]["num_queries"] == want["num_queries"] > 0 and "miou_1click" in result
    for key in ("miou_text", "miou_all_shapes"):
        assert result["text"][key] == pytest.approx(want[key], abs=1e-6)
    # Errors: no --clip; --clip alone; an empty list; a template without {}; no image with the category; no text layers.
    assert "needs --clip FOLDER" in _one_line_error([*base, "--text-categories", "circle"], capsys)
    assert "only used with --text-categories" in _one_line_error([*base, "--clip", str(clip_folder)], capsys)
    assert "--text-categories is empty" in _one_line_error(
        [*base, "--text-categories", " ,", "--clip", str(clip_folder)], capsys
    )
    bad_template = [*base, "--text-categories", "circle", "--clip", str(clip_folder), "--template", "a shape"]
    assert "--template must contain {}" in _one_line_error(bad_template, capsys)
    assert "no held-out image has a mask of the categories" in _one_line_error(
        [*base, "--text-categories", "rectangle", "--clip", str(clip_folder)], capsys
    )
    with monkeypatch.context() as m:
        m.setattr(cli, "_load", lambda args: SamModel(tiny_config, tiny_params))
        err = _one_line_error([*base, "--text-categories", "circle", "--clip", str(clip_folder)], capsys)
    assert "has no text projection" in err
