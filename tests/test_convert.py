"""The converter: official .pth / HF safetensors -> sam-jax -> official safetensors, strictly and safely."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as torch_load_safetensors

from bench.official import build_official, state_dict_numpy
from sam_jax.checkpoint import export_safetensors, load_model, load_params
from sam_jax.cli import main
from sam_jax.config import get_config
from sam_jax.convert.errors import CheckpointError
from sam_jax.convert.keys import key_table
from sam_jax.convert.state_dict import HF_PE_ALIAS, infer_model_type, to_official
from sam_jax.model import abstract_params


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory, official_tiny):
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(official_tiny.state_dict(), path)
    return path


def _official_outputs(model: torch.nn.Module, config) -> tuple[np.ndarray, np.ndarray]:
    s, m = config.image_size, config.low_res_mask_size
    g = torch.Generator().manual_seed(0)
    record = {
        "image": torch.rand(3, s, s - 40, generator=g) * 255,
        "original_size": (s, s - 40),
        "point_coords": torch.tensor([[[40.0, 50.0], [100.0, 20.0]]]),
        "point_labels": torch.tensor([[1, 0]]),
        "mask_inputs": torch.randn(1, 1, m, m, generator=g),
    }
    with torch.no_grad():
        out = model([record], multimask_output=True)[0]
    return out["low_res_logits"].numpy(), out["iou_predictions"].numpy()


def test_cli_round_trip_to_the_official_model(official_pth, official_tiny, tiny_config, tmp_path, capsys):
    """official .pth -> `sam-jax convert` -> directory -> `sam-jax export` -> official model: same outputs."""
    out_dir, out_st = tmp_path / "converted", tmp_path / "exported.safetensors"
    assert main(["convert", str(official_pth), str(out_dir), "--model-type", "tiny"]) == 0
    config, params = load_params(out_dir)
    assert config == tiny_config
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
    assert main(["export", str(out_dir), str(out_st)]) == 0

    reloaded = build_official(tiny_config)
    reloaded.load_state_dict(torch_load_safetensors(str(out_st)), strict=True)
    for ref, ours in zip(official_tiny.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(ref, ours)  # a lossless round trip, bit for bit
    for a, b in zip(_official_outputs(official_tiny, tiny_config), _official_outputs(reloaded, tiny_config)):
        np.testing.assert_array_equal(a, b)


def test_export_import_is_lossless(tiny_params, tiny_config, tmp_path):
    path = export_safetensors(tiny_params, tiny_config, tmp_path / "x.safetensors")
    model = load_model(path, tiny_config)
    jax.tree.map(np.testing.assert_array_equal, model.params, tiny_params)


@pytest.mark.parametrize("with_alias", [False, True])
def test_hugging_face_safetensors(official_tiny, tiny_config, tiny_params, tmp_path, with_alias):
    """HF `SamModel` key names (vision_encoder.layers.N, shared_image_embedding, proj_in/proj_out ...)."""
    sd = state_dict_numpy(official_tiny)
    hf = {row.hf: sd[row.official] for row in key_table(tiny_config)}
    if with_alias:  # transformers v5 ties the PE matrix to a second name
        hf[HF_PE_ALIAS] = hf["shared_image_embedding.positional_embedding"]
    assert any(k.startswith("vision_encoder.layers.0.layer_norm1") for k in hf)
    save_file(hf, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path / "model.safetensors", tiny_config)
    jax.tree.map(np.testing.assert_array_equal, model.params, tiny_params)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_infer_model_type(name):
    config = get_config(name)
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract_params(config))
    assert infer_model_type(to_official(zeros, config)) == name  # only shapes are read


def test_registry_loads_every_form(official_pth, tiny_config, tiny_params, tmp_path):
    """The drop-in entry point takes a .pth, a .safetensors or a directory (tiny via load_model)."""
    from sam_jax import sam_model_registry

    export_safetensors(tiny_params, tiny_config, tmp_path / "t.safetensors")
    for ckpt in (official_pth, tmp_path / "t.safetensors"):
        jax.tree.map(np.testing.assert_array_equal, load_model(ckpt, "tiny").params, tiny_params)
    with pytest.raises(CheckpointError, match="does not match the vit_b model"):
        sam_model_registry["vit_b"](checkpoint=official_pth)
    assert {"default", "vit_b", "vit_l", "vit_h", "vit_t"} <= set(sam_model_registry)


# ----------------------------------------------------------------------------- bad inputs


def _cli_error(args, capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam-jax: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_wrong_variant(official_pth, tmp_path, capsys):
    err = _cli_error(["convert", str(official_pth), str(tmp_path / "o"), "--model-type", "vit_b"], capsys)
    assert "does not match the vit_b model" in err and "mis-shaped" in err
    assert not (tmp_path / "o").exists()


def test_auto_refuses_unknown_shapes(official_pth, tmp_path, capsys):
    err = _cli_error(["convert", str(official_pth), str(tmp_path / "o")], capsys)
    assert "cannot infer the model type" in err


def test_missing_and_unexpected_keys(official_tiny, tmp_path, capsys):
    sd = official_tiny.state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    sd["mask_decoder.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    err = _cli_error(["convert", str(tmp_path / "broken.pth"), str(tmp_path / "o"), "--model-type", "tiny"], capsys)
    assert "1 missing (mask_decoder.iou_token.weight)" in err
    assert "1 unexpected (mask_decoder.extra.weight)" in err


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"this is not a checkpoint\n" * 10, "not a"),
        (None, "truncated"),
    ],
)
def test_unreadable_files(official_pth, tmp_path, capsys, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(official_pth.read_bytes()[: official_pth.stat().st_size // 2] if content is None else content)
    assert message in _cli_error(["convert", str(path), str(tmp_path / "o")], capsys)


def test_missing_file_and_existing_output(official_pth, tmp_path, capsys):
    assert "no such file" in _cli_error(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "o")], capsys)
    (tmp_path / "taken").mkdir()
    err = _cli_error(["convert", str(official_pth), str(tmp_path / "taken"), "--model-type", "tiny"], capsys)
    assert "already exists" in err


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    """A .pth whose pickle calls os.system: refused by the real console entry point, nothing runs."""
    marker = tmp_path / "pwned"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Exploit(str(marker))}, tmp_path / "evil.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "sam_jax.cli", "convert", str(tmp_path / "evil.pth"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "refusing to load" in proc.stderr and "system" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_shapes_are_checked_from_metadata_alone(official_tiny):
    """`load_model`'s shape check looks at the shapes a checkpoint declares, never allocates them."""
    from sam_jax.config import tiny
    from sam_jax.convert.errors import CheckpointError
    from sam_jax.convert.state_dict import shape_check

    shapes = {k: tuple(v.shape) for k, v in official_tiny.state_dict().items()}
    config = tiny()
    shape_check(config)(shapes)  # the model's own shapes pass
    huge = {**shapes, "image_encoder.neck.0.weight": (10**6, 10**6, 1, 1)}
    with pytest.raises(CheckpointError, match=r"1 mis-shaped \(image_encoder.neck.0.weight \(1000000, 1000000, 1, 1\)"):
        shape_check(config)(huge)
