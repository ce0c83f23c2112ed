"""The public API: the official package's names, its usage snippets with only the import changed,
`load_model` for every checkpoint this project writes, and an inference layer free of training and torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

# The official README's two snippets; `{package}` is the only difference between the runs. The
# generator's takes official arguments: a 4 x 4 grid (16 prompts of vit_b instead of 1024) and open
# thresholds, so that random weights give records.
PREDICTOR_SNIPPET = """
from {package} import SamPredictor, sam_model_registry
sam = sam_model_registry["{model_type}"](checkpoint="{checkpoint}")
predictor = SamPredictor(sam)
predictor.set_image(image)
masks, scores, logits = predictor.predict(point_coords=np.array([[200, 150]]), point_labels=np.array([1]))
"""
GENERATOR_SNIPPET = """
from {package} import SamAutomaticMaskGenerator, sam_model_registry
sam = sam_model_registry["{model_type}"](checkpoint="{checkpoint}")
mask_generator = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
records = mask_generator.generate(image)
"""


def _run(snippet: str, **names) -> dict:
    scope = {"np": np, "image": names.pop("image")}
    exec(snippet.format(**names), scope)
    return scope


@pytest.mark.slow
def test_official_snippets_run_with_only_the_import_changed(photo, tmp_path):
    """vit_b with random weights made by the official code, saved as an official .pth."""
    import segment_anything
    import torch

    from bench.official import randomize_

    official = randomize_(segment_anything.sam_model_registry["vit_b"](), seed=3)
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(official.state_dict(), checkpoint)
    image = np.ascontiguousarray(photo[:240, :320])

    ours = _run(PREDICTOR_SNIPPET, package="sam_jax", model_type="vit_b", checkpoint=checkpoint, image=image)
    ref = _run(PREDICTOR_SNIPPET, package="segment_anything", model_type="vit_b", checkpoint=checkpoint, image=image)
    assert ours["masks"].shape == ref["masks"].shape == (3, 240, 320) and ours["masks"].dtype == bool
    assert np.mean(ours["masks"] == ref["masks"]) > 0.999
    np.testing.assert_allclose(ours["scores"], ref["scores"], atol=2e-3)
    np.testing.assert_allclose(ours["logits"], ref["logits"], atol=2e-2)

    ours = _run(GENERATOR_SNIPPET, package="sam_jax", model_type="vit_b", checkpoint=checkpoint, image=image)
    assert isinstance(ours["records"], list) and ours["records"]
    for record in ours["records"]:
        assert set(record) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }


def test_official_names_are_exported():
    import sam_jax
    from sam_jax import SamAutomaticMaskGenerator, SamPredictor, build_sam, load_model, sam_model_registry
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator as Generator
    from sam_jax.checkpoint import load_model as checkpoint_load_model
    from sam_jax.predictor import SamPredictor as Predictor

    assert SamPredictor is Predictor and SamAutomaticMaskGenerator is Generator
    assert load_model is checkpoint_load_model
    assert {"default", "vit_h", "vit_l", "vit_b", "vit_t"} <= set(sam_model_registry)
    assert build_sam is sam_model_registry["vit_h"]
    assert {"build_sam_vit_b", "build_sam_vit_l", "build_sam_vit_h", "build_sam_vit_t"} <= set(dir(sam_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sam_jax.nope  # noqa: B018


def test_the_inference_layer_imports_neither_training_nor_torch():
    code = textwrap.dedent(
        """
        import sys
        import sam_jax, sam_jax.predictor, sam_jax.automatic_mask_generator, sam_jax.checkpoint
        from sam_jax import SamPredictor, SamAutomaticMaskGenerator, load_model
        loaded = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "sam_jax.train"))]
        print(loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_trained_model_loads_through_load_model(tmp_path, capsys):
    """The model `sam-jax train` writes (here the demo recipe's variant) loads with `sam_jax.load_model`;
    the official registry points there for a variant it does not know."""
    import jax

    import sam_jax
    from sam_jax.checkpoint import save_params
    from sam_jax.convert.errors import CheckpointError
    from sam_jax.train.trainer import load_config_file, model_config

    config = model_config(load_config_file("shapes_p8"))  # the `make demo` model
    params = sam_jax.init_params(config, jax.random.key(0))
    path = save_params(tmp_path / "model", params, config)

    model = sam_jax.load_model(path)
    assert model.config == config
    predictor = sam_jax.SamPredictor(model)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, _ = predictor.predict(point_coords=[[30, 20]], point_labels=[1])
    assert masks.shape == (3, 40, 60) and scores.shape == (3,)

    with pytest.raises(CheckpointError, match=r"sam_jax.load_model\(path\) loads any checkpoint"):
        sam_jax.sam_model_registry["vit_b"](checkpoint=path)
    with pytest.raises(KeyError, match=r"sam_jax.load_model\(path\)"):
        sam_jax.sam_model_registry[config.name]
