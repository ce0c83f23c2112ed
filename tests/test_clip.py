"""CLIP for text prompts: parity with Hugging Face `transformers.CLIPModel` through the real loading
path (save_pretrained -> config.json + model.safetensors -> `load_clip`), the converter's strict
checks, the tokenizer against `CLIPTokenizerFast`, the image preprocessing against
`CLIPImageProcessor`, and the full-size presets against HF's shapes.

Everything is built here, offline: a CLIP-format BPE vocabulary is learned from a few sentences
(vocab.json + merges.txt, the files OpenAI's CLIP ships), `CLIPTokenizerFast` reads them and
`save_pretrained` writes the tokenizer.json our tokenizer loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from sam_jax.clip_folder import learn_bpe
from sam_jax.clip_tokenizer import CLIPTokenizer
from sam_jax.convert.clip import clip_key_table, clip_to_flax, expected_hf_shapes, load_clip, load_clip_config
from sam_jax.convert.errors import CheckpointError
from sam_jax.modeling.clip import (
    CLIPConfig,
    clip_image_preprocess,
    clip_vit_b32,
    clip_vit_l14_336,
    encode_image,
    encode_text,
)

CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "the cat sat on the mat",
    "two dogs playing in the park",
    "a red car parked on the street",
    "an astronaut riding a horse on the moon",
    "hello world, it's a test!",
    "a painting of a bowl of fruit",
]
TEXTS = [
    "a photo of a cat",
    "A PHOTO of   two Dogs!",
    "the astronaut's horse",
    "zebra xylophone 42",  # words the merges never saw: byte-level pieces
    "café, naïve — ok?",  # non-ASCII: bytes outside the learned merges
    "a",
]
MODEL_VOCAB = 600  # the model's table is larger than the tokenizer's: ids past EOS exist (see the EOS test)


# ---------------------------------------------------------------------------
# A CLIP-format BPE vocabulary, learned from CORPUS (`sam_jax.clip_folder.learn_bpe`).


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    src = tmp_path_factory.mktemp("bpe")
    vocab, merges = learn_bpe(CORPUS, 200)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return transformers.CLIPTokenizerFast.from_pretrained(str(src))


@pytest.fixture(scope="module")
def tok_folder(hf_tokenizer, tmp_path_factory):
    """A folder with the tokenizer.json (and tokenizer_config.json) `save_pretrained` writes."""
    folder = tmp_path_factory.mktemp("tokenizer")
    hf_tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_folder):
    return CLIPTokenizer.from_folder(tok_folder)


def _hf_ids(hf_tokenizer, texts, max_length=77):
    enc = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


# ---------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_matches_hf(tokenizer, hf_tokenizer):
    ids, mask = tokenizer(TEXTS)
    ref_ids, ref_mask = _hf_ids(hf_tokenizer, TEXTS)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    assert (ids[:, 0] == bos).all()
    assert tokenizer.pad_id == hf_tokenizer.pad_token_id == eos  # CLIP pads with <|endoftext|>
    lengths = mask.sum(1)
    assert (ids[np.arange(len(TEXTS)), lengths - 1] == eos).all()
    assert tokenizer("a photo of a cat").input_ids.shape == (1, 77)
    assert tokenizer(TEXTS).truncated == ()


def test_tokenizer_round_trip(tokenizer, hf_tokenizer):
    ids, _ = tokenizer(TEXTS)
    decoded = tokenizer.decode(ids)
    assert decoded == [hf_tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert decoded[0] == "a photo of a cat"
    assert decoded[3] == "zebra xylophone 4 2"  # CLIP splits digits one by one
    assert tokenizer.decode(ids[1]) == "a photo of two dogs !"
    for text, row in zip(TEXTS, ids):  # the text's own words come back, lowercased
        assert "".join(tokenizer.decode(row).split()) == "".join(text.lower().split())


def test_tokenizer_rejects_empty_text(tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        tokenizer(["a cat", ""])
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        tokenizer(" \t\n ")
    with pytest.raises(ValueError, match=r"texts\[0\] must be a string"):
        tokenizer([3])


def test_tokenizer_truncates_long_text_with_warning(tokenizer, hf_tokenizer):
    long = " ".join(["the cat sat on the mat"] * 30)  # 180 words
    with pytest.warns(UserWarning, match=r"truncated \(indices \[1\]\)"):
        tokens = tokenizer(["a dog", long])
    assert tokens.truncated == (1,)
    ref_ids, ref_mask = _hf_ids(hf_tokenizer, ["a dog", long])
    np.testing.assert_array_equal(tokens.input_ids, ref_ids)
    np.testing.assert_array_equal(tokens.attention_mask, ref_mask)
    assert tokens.attention_mask[1].all() and tokens.input_ids[1, -1] == hf_tokenizer.eos_token_id
    assert tokens.input_ids[1, 0] == hf_tokenizer.bos_token_id


def test_tokenizer_context_length_from_config(tok_folder, hf_tokenizer, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(tok_folder, folder)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {"max_position_embeddings": 16}})
    )
    with pytest.warns(UserWarning, match=r"context length 16 were truncated \(indices \[4\]\)"):
        ids, mask = CLIPTokenizer.from_folder(folder)(TEXTS)  # "café, naïve — ok?" is 17 tokens with BOS/EOS
    ref_ids, ref_mask = _hf_ids(hf_tokenizer, TEXTS, max_length=16)
    assert ids.shape == (len(TEXTS), 16)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


# ---------------------------------------------------------------------------
# The model: parity with transformers.CLIPModel, loaded from its saved folder.


def _save_hf_clip(folder, *, hidden_act: str, eos_token_id: int, bos_token_id: int) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=MODEL_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=hidden_act,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act=hidden_act,
        ),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # move every tensor (layer norms included) off its initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))  # config.json + model.safetensors
    return model


def _projection(out) -> np.ndarray:
    """`get_*_features`' result: a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    tensor = out if isinstance(out, torch.Tensor) else out.pooler_output
    return tensor.detach().numpy()


def _eos_case_ids(rng: np.random.Generator, eos: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """Hand-made ids (4, 77): BOS, tokens, EOS, EOS padding; in rows 0-1 an id larger than EOS
    (present in the model's table, not in the tokenizer) before the EOS, so "argmax of ids" and
    "first EOS" pick different tokens there. Returns ids and attention mask, (4, 77) int64."""
    b, n = 4, 77
    ends = np.array([10, 30, 5, 76])
    ids = rng.integers(0, eos, size=(b, n))
    ids[:, 0] = bos
    mask = np.zeros((b, n), np.int64)
    for r, e in enumerate(ends):
        ids[r, e:] = eos
        mask[r, : e + 1] = 1
    ids[0, 3] = MODEL_VOCAB - 1
    ids[1, 20] = MODEL_VOCAB - 5
    mask[2, 2] = mask[3, 40] = 0  # masked keys inside the text: the padding mask is more than the causal one
    return ids, mask


@pytest.mark.parametrize("hidden_act, legacy_eos", [("quick_gelu", True), ("gelu", False)])
def test_clip_matches_transformers(hidden_act, legacy_eos, tokenizer, hf_tokenizer, tmp_path):
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    assert eos < MODEL_VOCAB - 5
    folder = tmp_path / "clip"
    hf = _save_hf_clip(folder, hidden_act=hidden_act, eos_token_id=2 if legacy_eos else eos, bos_token_id=bos)
    config, params = load_clip(folder)
    assert config.text_config.hidden_act == config.vision_config.hidden_act == hidden_act
    assert config.text_config.eos_token_id == (2 if legacy_eos else eos)
    assert (config.text_config.vocab_size, config.projection_dim, config.vision_config.image_size) == (
        MODEL_VOCAB,
        24,
        32,
    )
    text_fn = jax.jit(functools.partial(encode_text, config=config))
    image_fn = jax.jit(functools.partial(encode_image, config=config))

    # Real tokenized text (the tokenizer's EOS is its largest id: both rules pool the same token).
    ids, mask = tokenizer(TEXTS)
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        ref = _projection(hf.get_text_features(input_ids=ids_t, attention_mask=mask_t))
    ours = np.asarray(text_fn(params, ids, mask))
    assert ours.shape == (len(TEXTS), 24) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    # The EOS rule: ids larger than the EOS before it (legacy argmax pools those, the real rule the EOS).
    ids2, mask2 = _eos_case_ids(np.random.default_rng(0), eos, bos)
    with torch.no_grad():
        ref2 = _projection(
            hf.get_text_features(input_ids=torch.from_numpy(ids2), attention_mask=torch.from_numpy(mask2))
        )
    ours2 = np.asarray(text_fn(params, ids2.astype(np.int32), mask2.astype(np.int32)))
    np.testing.assert_allclose(ours2, ref2, rtol=1e-5, atol=1e-5)
    other_rule = dataclasses.replace(config.text_config, eos_token_id=eos if legacy_eos else 2)
    other = np.asarray(encode_text(params, ids2, mask2, config=dataclasses.replace(config, text_config=other_rule)))
    assert not np.allclose(other[:2], ref2[:2], atol=1e-3)  # rows 0-1 tell the rules apart
    np.testing.assert_allclose(other[2:], ref2[2:], rtol=1e-5, atol=1e-5)  # elsewhere they agree

    # Images: channels-last here, NCHW for torch.
    pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_img = _projection(hf.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())))
    ours_img = np.asarray(image_fn(params, pixels))
    assert ours_img.shape == (3, 24)
    np.testing.assert_allclose(ours_img, ref_img, rtol=1e-5, atol=1e-5)

    # CLIPModel.forward's embeddings are these, normalized.
    with torch.no_grad():
        out = hf(
            input_ids=ids_t, attention_mask=mask_t, pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        )
    np.testing.assert_allclose(ours / np.linalg.norm(ours, axis=-1, keepdims=True), out.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        ours_img / np.linalg.norm(ours_img, axis=-1, keepdims=True), out.image_embeds.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(params["logit_scale"], hf.logit_scale.detach().numpy())


def test_encode_rejects_bad_shapes():
    config = clip_vit_b32()
    with pytest.raises(ValueError, match=r"input_ids must be \(B, L\) with 1 <= L <= 77"):
        encode_text({}, np.zeros((1, 78), np.int32), config=config)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 224, 224, 3\)"):
        encode_image({}, np.zeros((1, 3, 224, 224), np.float32), config=config)


# ---------------------------------------------------------------------------
# The converter's strict checks.


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("hf_clip")
    _save_hf_clip(
        folder, hidden_act="quick_gelu", eos_token_id=hf_tokenizer.eos_token_id, bos_token_id=hf_tokenizer.bos_token_id
    )
    return folder


def test_converter_keeps_dtype_and_ignores_position_ids(hf_folder):
    config = load_clip_config(hf_folder)
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]  # written by transformers < 4.31
    sd["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd.items()}
    params = clip_to_flax(half, config)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(clip_key_table(config)) and all(x.dtype == np.float16 for x in leaves)
    kernel = params["text_model"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(kernel, half["text_model.encoder.layers.1.mlp.fc1.weight"].T)
    out = encode_text(params, np.zeros((1, 77), np.int32), config=config)  # float16 params run in float32
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_converter_reports_missing_key(hf_folder, tmp_path):
    sd = load_file(str(hf_folder / "model.safetensors"))
    del sd["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    shutil.copy(hf_folder / "config.json", tmp_path / "config.json")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"1 missing \(vision_model\.encoder\.layers\.1\.self_attn\.v_proj\.bias\)"
    ):
        load_clip(tmp_path)


def test_converter_reports_unexpected_key(hf_folder):
    config = load_clip_config(hf_folder)
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd["text_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)  # a third layer
    with pytest.raises(
        CheckpointError, match=r"1 unexpected \(text_model\.encoder\.layers\.2\.mlp\.fc1\.weight\)"
    ) as err:
        clip_to_flax(sd, config)
    assert "missing" not in str(err.value)


def test_converter_reports_wrong_shape(hf_folder):
    config = load_clip_config(hf_folder)
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd["text_projection.weight"] = sd["text_projection.weight"].T.copy()  # (32, 24) instead of (24, 32)
    sd["vision_model.embeddings.patch_embedding.weight"] = np.zeros((48, 3, 16, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"2 mis-shaped") as err:
        clip_to_flax(sd, config)
    message = str(err.value)
    assert "text_projection.weight (32, 24) != expected (24, 32)" in message
    assert "vision_model.embeddings.patch_embedding.weight (48, 3, 16, 16) != expected (48, 3, 8, 8)" in message


def test_load_clip_reports_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="model_type 'siglip' is not a CLIPModel"):
        load_clip(tmp_path)


# ---------------------------------------------------------------------------
# The full-size presets: config.json round trip and every tensor's shape against HF's.

HUB_TEXT = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # what the OpenAI config.json files say


@pytest.mark.parametrize(
    "preset, hf_kwargs",
    [
        (clip_vit_b32, dict(text_config=dict(HUB_TEXT), vision_config=dict(), projection_dim=512)),
        (
            clip_vit_l14_336,
            dict(
                text_config=dict(
                    HUB_TEXT, hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768
                ),
                vision_config=dict(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    image_size=336,
                    patch_size=14,
                    projection_dim=768,
                ),
                projection_dim=768,
            ),
        ),
    ],
)
def test_presets_match_transformers(preset, hf_kwargs):
    hf_config = transformers.CLIPConfig(**hf_kwargs)
    ours = preset()
    assert CLIPConfig.from_hf_dict(json.loads(hf_config.to_json_string()), name=ours.name) == ours
    with torch.device("meta"):  # shapes only: nothing allocated
        hf = transformers.CLIPModel(hf_config)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert expected_hf_shapes(ours) == hf_shapes


# ---------------------------------------------------------------------------
# Image preprocessing.


def test_image_preprocess_matches_hf():
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(45, 71, 3), (80, 33, 3), (32, 32, 3), (17, 20, 3)]
    ]
    ours = clip_image_preprocess(images, 32)
    ref = np.asarray(processor(images=images, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
    assert ours.shape == (4, 32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(clip_image_preprocess(np.stack(images[2:3]), 32), ours[2:3])
    with pytest.raises(ValueError, match=r"images\[1\] must be \(H, W, 3\) uint8"):
        clip_image_preprocess([images[0], images[1].astype(np.float32)], 32)


# ---------------------------------------------------------------------------
# CLIP folders written by sam-jax (`sam_jax.clip_folder`): what transformers reads.


def test_random_clip_folder_loads_in_transformers(tmp_path):
    """`make_random_clip` writes a folder that transformers loads as the same model and tokenizer:
    HF's embeddings of our tokens equal ours, and the tokenizer.json equals the one HF derives
    from the folder's vocab.json + merges.txt (ids of several texts, and the file's settings)."""
    from sam_jax.clip_folder import make_random_clip
    from sam_jax.text import TextEncoder

    folder = make_random_clip(tmp_path / "clip", ["circle", "triangle", "rectangle", "a photo of a dog"], seed=3)
    encoder = TextEncoder.from_folder(folder)
    texts = ["circle", "A Triangle!", "rectangle", "zebra café 42", "a  photo\tof DOGS's"]
    ours = encoder.tokenizer(texts)
    bpe_only = tmp_path / "bpe"
    bpe_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, bpe_only / name)
    hf_tok = transformers.CLIPTokenizerFast.from_pretrained(str(bpe_only))
    ref = hf_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, ref.input_ids)
    hf_tok.save_pretrained(str(tmp_path / "hf_saved"))
    mine, theirs = (json.loads((p / "tokenizer.json").read_text()) for p in (folder, tmp_path / "hf_saved"))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens", "model"):
        assert mine[key] == theirs[key], key
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model.get_text_features(
            input_ids=torch.from_numpy(ours.input_ids).long(),
            attention_mask=torch.from_numpy(ours.attention_mask).long(),
        )
    np.testing.assert_allclose(_projection(out), encoder.embed_text(texts), atol=1e-5)
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 50, 3), dtype=np.uint8)
    pixels = torch.from_numpy(clip_image_preprocess(images, 32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_img = _projection(model.get_image_features(pixel_values=pixels))
    np.testing.assert_allclose(ref_img, encoder.embed_images(images), atol=1e-5)
    assert encoder.embed_dim == 64
    # Deterministic: the same seed gives the same embeddings.
    again = TextEncoder.from_folder(
        make_random_clip(tmp_path / "again", ["circle", "triangle", "rectangle", "a photo of a dog"], seed=3)
    )
    np.testing.assert_array_equal(again.embed_text(texts), encoder.embed_text(texts))
