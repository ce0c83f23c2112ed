"""CLIP (Radford et al. 2021) in Flax, module for module Hugging Face `transformers`' `CLIPModel`.

The text prompts of SAM (paper, section 7.5) are CLIP ViT-L/14@336 embeddings; this file is
the CLIP part: both towers and their projections, with the HF module and attribute names
(`text_model.encoder.layers_0.self_attn.q_proj`, `vision_model.pre_layrnorm`, ...), so the
converter's key table (`sam_jax.convert.clip`) is one line per tensor.

    config, params = load_clip(folder)                                   # sam_jax.convert.clip
    ids, mask = CLIPTokenizer.from_folder(folder)(["a photo of a cat"])  # sam_jax.clip_tokenizer
    text = encode_text(params, ids, mask, config=config)                 # (B, projection_dim)
    pixels = clip_image_preprocess(images, config.vision_config.image_size)
    image = encode_image(params, pixels, config=config)                  # (B, projection_dim)

`encode_text` / `encode_image` return the unnormalized projections, as HF's
`get_text_features` / `get_image_features` (`CLIPModel.forward`'s `text_embeds` /
`image_embeds` are these divided by their L2 norm).

Text tower: token + position embeddings -> pre-LN encoder layers under a causal mask (and the
padding mask) -> final LayerNorm -> the hidden state at the EOS token -> `text_projection`
(no bias). Which token is the EOS follows HF's rule on the config's `eos_token_id`: when it is
2 (the value in the original OpenAI configs, from before HF PR #24773) the position of the
largest input id (CLIP's EOS, 49407, is the largest id of its vocabulary); otherwise the first
position whose id equals `eos_token_id`. The final LayerNorm acts on each token alone, so it
is applied to the pooled token only: the same numbers as HF, which normalizes every token.

Vision tower: patch conv (no bias) -> [class embedding; patches] + position embeddings ->
`pre_layrnorm` -> encoder (no mask) -> `post_layernorm` on the class token ->
`visual_projection` (no bias). Images are channels-last (B, S, S, C), S = `image_size`
(HF's `interpolate_pos_encoding` is not supported: other sizes raise).

Precision follows the rest of sam-jax: params are created float32, computation runs in the
config's `dtype`, layer norms and softmaxes in float32. Params loaded in another dtype (a
float16 checkpoint keeps its dtype through the converter) are cast to `dtype` where used.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

from sam_jax.modeling.common import LayerNorm, PatchConv, accum_dtype, dense

Params = Any  # a nested dict of arrays, the `params` collection of `CLIP`


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, HF's `QuickGELUActivation`: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# HF `ACT2FN` names -> functions (the ones CLIP checkpoints use).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch.nn.GELU(), exact erf
    "gelu_new": functools.partial(nn.gelu, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}

# OpenAI CLIP's image normalization (HF `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), for pixels in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------
# Configs. Defaults are those of HF's `CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig`, so
# a config.json that leaves a field out means the same thing here as in transformers.


def _check_tower(kind: str, hidden_size: int, num_heads: int, hidden_act: str) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"{kind}: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"{kind}: hidden_act {hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (HF `CLIPTextConfig`)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # the context length: input ids are at most this long
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    # The pooled token: 2 means "the largest input id" (legacy rule); else the first id equal to it.
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        _check_tower("CLIPTextConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (HF `CLIPVisionConfig`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower("CLIPVisionConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side: image_size / patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """The class token plus one per patch."""
        return self.grid_size**2 + 1


_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPTextConfig))
_VISION_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPVisionConfig))


def _single_int(name: str, value: Any) -> int:
    """HF allows some ints as lists (`eos_token_id`, `image_size`); CLIP uses one value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: {name} {value!r} is not supported; CLIP needs a single value")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the joint embedding width and the compute dtype (params stay float32)."""

    text_config: CLIPTextConfig = CLIPTextConfig()
    vision_config: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), the initial `logit_scale`
    dtype: str = "float32"
    name: str = "clip"

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], *, dtype: str = "float32", name: str | None = None) -> CLIPConfig:
        """A Hugging Face `CLIPModel` config.json (as a dict) -> `CLIPConfig`.

        Fields the file leaves out take HF's defaults; fields CLIP's forward pass does not use
        (dropout, initializer ranges, generation settings) are ignored. The old layout with
        `text_config_dict` / `vision_config_dict` is read too (those win, as in transformers).
        """
        model_type = config.get("model_type", "clip")
        if model_type != "clip":
            raise ValueError(f"config.json: model_type {model_type!r} is not a CLIPModel ('clip')")
        text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
        vision = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
        text_kw = {k: text[k] for k in _TEXT_FIELDS if text.get(k) is not None}
        vision_kw = {k: vision[k] for k in _VISION_FIELDS if vision.get(k) is not None}
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if key in text_kw:
                text_kw[key] = _single_int(f"text_config.{key}", text_kw[key])
        for key in ("image_size", "patch_size"):
            if key in vision_kw:
                vision_kw[key] = _single_int(f"vision_config.{key}", vision_kw[key])
        kw: dict[str, Any] = {}
        if config.get("projection_dim") is not None:
            kw["projection_dim"] = int(config["projection_dim"])
        if config.get("logit_scale_init_value") is not None:
            kw["logit_scale_init_value"] = float(config["logit_scale_init_value"])
        name = name or str(config.get("_name_or_path") or "clip")
        return cls(CLIPTextConfig(**text_kw), CLIPVisionConfig(**vision_kw), dtype=dtype, name=name, **kw)


# The OpenAI checkpoints' config.json says eos_token_id 2 (legacy argmax pooling); their
# tokenizer's EOS, 49407, is the largest id, so both rules pick the same token.
def clip_vit_b32() -> CLIPConfig:
    """openai/clip-vit-base-patch32: 224 px, patch 32, vision 768 x 12, text 512 x 12, embeddings 512."""
    return CLIPConfig(
        text_config=CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=CLIPVisionConfig(),
        projection_dim=512,
        name="clip_vit_b32",
    )


def clip_vit_l14_336() -> CLIPConfig:
    """openai/clip-vit-large-patch14-336 (SAM's text prompts): 336 px, patch 14, vision 1024 x 24,
    text 768 x 12, embeddings 768."""
    return CLIPConfig(
        text_config=CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        projection_dim=768,
        name="clip_vit_l14_336",
    )


def tiny() -> CLIPConfig:
    """A small CLIP for tests: 32 px images in 8 px patches, 2 layers of width 32 / 48, 4 heads."""
    return CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=600,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=598,
            eos_token_id=599,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
        name="clip_tiny",
    )


CLIP_CONFIGS = {"clip_vit_b32": clip_vit_b32, "clip_vit_l14_336": clip_vit_l14_336, "clip_tiny": tiny}


# ---------------------------------------------------------------------------
# Modules (HF names).


def _embed(num: int, features: int, dtype: Any, name: str) -> nn.Embed:
    """A `torch.nn.Embedding` (table (num, features)), looked up in the compute dtype."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        name=name,
    )


class CLIPAttention(nn.Module):
    """HF `CLIPAttention`: multi-head self-attention with q/k/v/out projections (all with bias)."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, D), mask (B, 1, L, L) bool (True: may attend) or None -> (B, L, D)."""
        b, n, d = x.shape
        nh, hd = self.num_heads, d // self.num_heads
        acc = accum_dtype(self.dtype)
        q = dense(d, ("embed", "qkv"), dtype=self.dtype, name="q_proj")(x).reshape(b, n, nh, hd)
        k = dense(d, ("embed", "qkv"), dtype=self.dtype, name="k_proj")(x).reshape(b, n, nh, hd)
        v = dense(d, ("embed", "qkv"), dtype=self.dtype, name="v_proj")(x).reshape(b, n, nh, hd)
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=acc) * (hd**-0.5)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(acc).min)
        attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", attn, v).reshape(b, n, d)
        return dense(d, ("qkv", "embed"), dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """HF `CLIPMLP`: fc1 -> activation -> fc2."""

    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., D)."""
        h = dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """HF `CLIPEncoderLayer`, pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, D), mask (B, 1, L, L) or None -> (B, L, D)."""
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x)
        x = x + CLIPAttention(cfg.num_attention_heads, dtype=self.dtype, name="self_attn")(h, mask)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x)
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """HF `CLIPEncoder`: `num_hidden_layers` encoder layers, `layers_{i}`."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, D), mask (B, 1, L, L) or None -> (B, L, D)."""
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, dtype=self.dtype, name=f"layers_{i}")(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    """HF `CLIPTextEmbeddings`: token embedding + position embedding (positions 0..L-1)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (B, L) int -> (B, L, D)."""
        cfg = self.config
        tokens = _embed(cfg.vocab_size, cfg.hidden_size, self.dtype, "token_embedding")(input_ids)
        positions = _embed(cfg.max_position_embeddings, cfg.hidden_size, self.dtype, "position_embedding")(
            jnp.arange(input_ids.shape[-1])
        )
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    """HF `CLIPTextTransformer` (the `text_model`): token ids -> the pooled (EOS) state."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B, L) int, attention_mask (B, L) (1: token, 0: padding) -> pooled (B, D)."""
        cfg = self.config
        n = input_ids.shape[-1]
        x = CLIPTextEmbeddings(cfg, dtype=self.dtype, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((n, n), bool))
        mask = causal[None, None] & (attention_mask[:, None, None, :] != 0)  # (B, 1, L, L)
        x = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x, mask)
        ids = input_ids.astype(jnp.int32)
        # eos_token_id 2 (configs before the EOS id was stored): the EOS is the largest id; else the
        # first EOS (padding may use the EOS id too).
        eos = jnp.argmax(ids, axis=-1) if cfg.eos_token_id == 2 else jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # (B, D)
        return LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(pooled)


class CLIPVisionEmbeddings(nn.Module):
    """HF `CLIPVisionEmbeddings`: [class embedding; patch conv (no bias)] + position embeddings."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, S, S, C) -> (B, 1 + (S/p)^2, D), patches in row-major order."""
        cfg = self.config
        b = pixel_values.shape[0]
        class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size**-0.5), ("embed",)),
            (cfg.hidden_size,),
            jnp.float32,
        )
        patches = PatchConv(cfg.hidden_size, cfg.patch_size, use_bias=False, dtype=self.dtype, name="patch_embedding")(
            pixel_values
        )
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + _embed(cfg.num_positions, cfg.hidden_size, self.dtype, "position_embedding")(
            jnp.arange(cfg.num_positions)
        )


class CLIPVisionTransformer(nn.Module):
    """HF `CLIPVisionTransformer` (the `vision_model`): pixels -> the pooled (class token) state."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, S, S, C) normalized -> pooled (B, D)."""
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, dtype=self.dtype, name="embeddings")(pixel_values)
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm")(x)  # sic: HF's spelling
        x = CLIPEncoder(cfg, dtype=self.dtype, name="encoder")(x)
        return LayerNorm(cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """HF `CLIPModel`: both towers, their projections (no bias) and `logit_scale`."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.text_model = CLIPTextTransformer(cfg.text_config, dtype=dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision_config, dtype=dtype)
        self.visual_projection = dense(cfg.projection_dim, ("embed", None), dtype=dtype, use_bias=False)
        self.text_projection = dense(cfg.projection_dim, ("embed", None), dtype=dtype, use_bias=False)
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init_value), ()),
            (),
            jnp.float32,
        )

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """input_ids (B, L), attention_mask (B, L) -> (B, projection_dim), unnormalized."""
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, S, S, C) -> (B, projection_dim), unnormalized."""
        return self.visual_projection(self.vision_model(pixel_values))

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Both features, (B_text, P) and (B_image, P) (what `init` traces)."""
        return self.get_text_features(input_ids, attention_mask), self.get_image_features(pixel_values)


# ---------------------------------------------------------------------------
# The functional core: pure, jit them with `functools.partial(..., config=config)`.


def init_clip_params(config: CLIPConfig, rng: jax.Array, *, boxed: bool = False) -> Params:
    """Random params for `config`; `boxed=True` keeps the logical-axis metadata (for sharding)."""
    s, c = config.vision_config.image_size, config.vision_config.num_channels
    ids = jnp.zeros((1, config.text_config.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, s, s, c), jnp.float32)
    variables = jax.jit(CLIP(config).init)(rng, ids, jnp.ones_like(ids), pixels)
    return variables["params"] if boxed else nn.unbox(variables["params"])


def abstract_clip_params(config: CLIPConfig, *, boxed: bool = False) -> Params:
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s), computed without allocating them."""
    return jax.eval_shape(functools.partial(init_clip_params, config, boxed=boxed), jax.random.key(0))


def encode_text(
    params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, config: CLIPConfig
) -> jax.Array:
    """input_ids (B, L) int, L <= max_position_embeddings, attention_mask (B, L) (None: all
    tokens) -> (B, projection_dim) float32: HF `get_text_features`, unnormalized.

    Ids must lie in [0, vocab_size) (not checked: they may be traced).
    """
    max_len = config.text_config.max_position_embeddings
    if np.ndim(input_ids) != 2 or not 1 <= np.shape(input_ids)[1] <= max_len:
        raise ValueError(
            f"encode_text: input_ids must be (B, L) with 1 <= L <= {max_len}; got shape {np.shape(input_ids)}"
        )
    if attention_mask is None:
        attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
    elif np.shape(attention_mask) != np.shape(input_ids):
        raise ValueError(
            f"encode_text: attention_mask must have the shape of input_ids {np.shape(input_ids)}; "
            f"got {np.shape(attention_mask)}"
        )
    out = CLIP(config).apply({"params": params}, input_ids, attention_mask, method=CLIP.get_text_features)
    return out.astype(jnp.float32)


def encode_image(params: Params, pixel_values: jax.Array, *, config: CLIPConfig) -> jax.Array:
    """pixel_values (B, S, S, C) channels-last, normalized (`clip_image_preprocess`), S =
    image_size -> (B, projection_dim) float32: HF `get_image_features`, unnormalized."""
    vc = config.vision_config
    expected = (vc.image_size, vc.image_size, vc.num_channels)
    if np.ndim(pixel_values) != 4 or tuple(np.shape(pixel_values)[1:]) != expected:
        raise ValueError(
            f"encode_image: pixel_values must be (B, {', '.join(map(str, expected))}) channels-last; "
            f"got shape {np.shape(pixel_values)}"
        )
    out = CLIP(config).apply({"params": params}, pixel_values, method=CLIP.get_image_features)
    return out.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Image preprocessing (HF `CLIPImageProcessor`, PIL backend), numpy + PIL only.


def _preprocess_one(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    # Shortest side -> size, the other int(size * long / short) (HF, torchvision `Resize(size)`).
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2  # HF's center crop rounds down
    crop = resized[top : top + size, left : left + size].astype(np.float64) / 255.0
    return ((crop - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)


def clip_image_preprocess(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """CLIP's preprocessing: uint8 RGB images -> (B, size, size, 3) float32, channels-last.

    `images` is a (B, H, W, 3) uint8 array or a list of (H, W, 3) uint8 arrays (sizes may
    differ). Each is resized (PIL bicubic) so its shortest side is `size`, center-cropped to
    `size` x `size`, scaled to [0, 1] and normalized with CLIP's mean and std: HF
    `CLIPImageProcessor` with `size={"shortest_edge": size}`, `crop_size=size`.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                "clip_image_preprocess: images must be (B, H, W, 3) uint8 or a list of (H, W, 3); "
                f"got shape {images.shape}"
            )
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        raise ValueError(
            f"clip_image_preprocess: images must be a (B, H, W, 3) uint8 array or a list; got {type(images).__name__}"
        )
    if not images:
        raise ValueError("clip_image_preprocess: no images")
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(
                f"clip_image_preprocess: images[{i}] must be (H, W, 3) uint8 RGB; got {image.dtype} {image.shape}"
            )
        out.append(_preprocess_one(image, int(size)))
    return np.stack(out)
