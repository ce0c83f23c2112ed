"""The functional core: pure `init`, `encode` and `decode`, and `SamModel`, the object holding both.

    params = init_params(config, jax.random.key(0))
    emb = encode(params, preprocess(images, config), config=config)  # ImageEmbeddings: .embedding (B, h, w, C)
    masks, iou = decode(params, emb, prompts, config=config, multimask_output=True)

`SamModel` binds a config and params and keeps the jitted versions; the
predictor, the mask generator and training all call these same functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sam_jax.config import SamConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.modeling.sam import Sam
from sam_jax.prompts import Prompts, make_prompts
from sam_jax.transforms import postprocess_masks

Params = Any  # a nested dict of float32 arrays, the `params` collection of `Sam`


def _dummy_inputs(config: SamConfig) -> tuple[jax.Array, Prompts]:
    s = config.image_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    prompts = make_prompts(
        batch_size=1,
        mask_size=config.low_res_mask_size,
        point_coords=np.zeros((1, 1, 2)),
        point_labels=np.ones((1, 1)),
    )
    return images, jax.tree.map(jnp.asarray, prompts)


def init_params(config: SamConfig, rng: jax.Array, *, boxed: bool = False) -> Params:
    """Random params for `config`; `boxed=True` keeps the logical-axis metadata (for sharding)."""
    images, prompts = _dummy_inputs(config)
    variables = jax.jit(Sam(config).init)(rng, images, prompts)  # jitted: eager init runs op by op
    return variables["params"] if boxed else nn.unbox(variables["params"])


def abstract_params(config: SamConfig, *, boxed: bool = False) -> Params:
    """The params' shapes and dtypes (`jax.ShapeDtypeStruct`s), computed without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config, boxed=boxed), jax.random.key(0))


def encode(
    params: Params, images: jax.Array, *, config: SamConfig, drop_path_rng: jax.Array | None = None
) -> ImageEmbeddings:
    """images (B, S, S, 3) normalized and padded (`transforms.preprocess`) -> `ImageEmbeddings`,
    float32: the embedding (B, h, w, C) and, for a model that has them, high-res features.

    Training passes `drop_path_rng` (a PRNG key) to apply the encoder's stochastic
    depth (`config.image_encoder.drop_path_rate`); without it, or at rate 0, the
    encoder is deterministic (inference).
    """
    if drop_path_rng is None or config.image_encoder.drop_path_rate == 0.0:
        return Sam(config).apply({"params": params}, images, method=Sam.encode)
    return Sam(config).apply({"params": params}, images, False, method=Sam.encode, rngs={"drop_path": drop_path_rng})


def decode(
    params: Params,
    embeddings: ImageEmbeddings,
    prompts: Prompts,
    *,
    config: SamConfig,
    multimask_output: bool | None = True,
    hq_token_only: bool = False,
    return_object_scores: bool = False,
) -> tuple[jax.Array, ...]:
    """`ImageEmbeddings` of B images, prompts of batch B -> low-res mask logits (B, M, 4h, 4w), IoU (B, M).

    M is 3 with `multimask_output` (masks 1..3), else 1 (mask 0), as officially; None gives
    all 4 (mask 0 first: training picks per prompt). One image's
    embeddings (batch 1) serve all B prompts; with `prompts.without_masks()` the decoder
    then runs the image side of its first layer once instead of B times.

    HQ-SAM (`config.mask_decoder.hq_token`) gives M = 1: the SAM mask (mask 0, or with
    `multimask_output` the best of 1..3 by predicted IoU) plus its HQ mask, or with `hq_token_only`
    the HQ mask alone, as `segment_anything_hq`.

    SAM 2 (`config.mask_decoder`'s SAM 2 options): with multimask_output False an unstable mask 0 is
    replaced by the best multimask output; `return_object_scores` adds the object score logits (B, 1).
    """
    return Sam(config).apply(
        {"params": params},
        embeddings,
        prompts,
        multimask_output,
        hq_token_only,
        return_object_scores,
        method=Sam.decode,
    )


def predict_masks(
    params: Params,
    embedding: ImageEmbeddings,
    prompts: Prompts,
    *,
    config: SamConfig,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    multimask_output: bool,
    return_logits: bool,
    hq_token_only: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image's `ImageEmbeddings` (batch 1) with B prompts -> masks at the original size
    (B, M, H, W) (bool, or logits with `return_logits`), IoU (B, M), low-res logits (B, M, 4h, 4w).

    The masks are upsampled and thresholded a few at a time (`postprocess_masks`): without
    `return_logits` no float logits at the original size are stored, and the intermediates
    take memory for one chunk of masks whatever B.
    """
    b = prompts.labels.shape[0]
    # Without mask prompts the embeddings stay batch 1: the decoder's first layer runs its
    # image side once for the B prompts (`TwoWayTransformer`); with them, one copy per prompt.
    emb = embedding if prompts.mask_input is None else embedding.broadcast_to(b)
    low_res, iou = decode(
        params, emb, prompts, config=config, multimask_output=multimask_output, hq_token_only=hq_token_only
    )
    threshold = None if return_logits else config.mask_threshold
    masks = postprocess_masks(low_res, input_size, original_size, config.image_size, threshold=threshold)
    return masks, iou, low_res


@dataclasses.dataclass
class SamModel:
    """A config with its params and the jitted `encode` / `decode` bound to them.

    What `sam_model_registry[...]` returns and what the predictor takes. Change the
    compute dtype with `model.with_dtype("bfloat16")` (params are unchanged), the encoder's
    attention kernel with `model.with_attention("cudnn")`.
    """

    config: SamConfig
    params: Params

    def __post_init__(self) -> None:
        # Params on the device once (a converted checkpoint arrives as numpy arrays, which
        # every jitted call would otherwise copy again: ~77 ms per call for vit_b).
        self.params = jax.device_put(self.params)
        self._encode = jax.jit(functools.partial(encode, config=self.config))
        self._decode = jax.jit(
            functools.partial(decode, config=self.config), static_argnames=("multimask_output", "hq_token_only")
        )

    def encode(self, images: jax.Array) -> ImageEmbeddings:
        """images (B, S, S, 3) normalized and padded -> `ImageEmbeddings` (embedding (B, h, w, C))."""
        return self._encode(self.params, images)

    def decode(
        self, embeddings: ImageEmbeddings, prompts: Prompts, multimask_output: bool = True, hq_token_only: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """`ImageEmbeddings` of B images, prompts of batch B -> mask logits (B, M, 4h, 4w), IoU (B, M)
        (`hq_token_only`: HQ-SAM's HQ mask alone)."""
        return self._decode(
            self.params, embeddings, prompts, multimask_output=multimask_output, hq_token_only=hq_token_only
        )

    def with_dtype(self, dtype: str) -> SamModel:
        return SamModel(dataclasses.replace(self.config, dtype=str(jnp.dtype(dtype))), self.params)

    def with_attention(self, impl: str) -> SamModel:
        """The same model with the image encoder's attention kernel `impl` ("chunked", "cudnn"
        or "xla"; see `ImageEncoderConfig.attention`): "cudnn" with bfloat16 on NVIDIA GPUs."""
        if not hasattr(self.config.image_encoder, "attention"):
            raise ValueError(
                f"{self.config.name}: its image encoder ({type(self.config.image_encoder).__name__}) has one attention "
                "kernel; with_attention chooses the ViT encoder's (SAM, HQ-SAM)"
            )
        encoder = dataclasses.replace(self.config.image_encoder, attention=impl)
        return SamModel(dataclasses.replace(self.config, image_encoder=encoder), self.params)

    @property
    def image_size(self) -> int:
        return self.config.image_size
