"""`SamPredictor`: the official predictor's API (plus SAM 2's batched prompts and images, and
text prompts) over jitted steps: `decode_prompts` (the decoder, in sub-batches) and `upsample_chunk` (masks at
the original size, a chunk at a time).

    predictor = SamPredictor(sam)
    predictor.set_image(image)                       # HxWx3 uint8 RGB
    masks, scores, logits = predictor.predict(point_coords=[[500, 375]], point_labels=[1])

Prompts are in original-image pixels. One prompt gives masks (C, H, W), scores (C,),
low-res logits (C, 256, 256); B prompts at once (point_coords (B, N, 2), box (B, 4),
mask_input (B, 1, 256, 256)) give (B, C, H, W), (B, C), (B, C, 256, 256); a batch of one
is squeezed, as SAM 2 does. C = 3 with `multimask_output`, else 1.

Text prompts (a checkpoint trained with them: `PromptEncoderConfig.text_embed_dim`) need a
CLIP `TextEncoder` of the same width:

    predictor = SamPredictor(sam, text_encoder=TextEncoder.from_folder("clip-vit-large-patch14-336"))
    masks, scores, logits = predictor.predict(text="a dog")                  # text alone
    predictor.predict(text="a dog", point_coords=[[500, 375]], point_labels=[1])
    predictor.predict(text=["a dog", "a cat"])                               # B = 2 prompts

`text` is a string (one text, added to every prompt of the call: with B boxes, B prompts
that share it) or a list of B strings (one per prompt: B prompts, so B must equal the
number of prompts given by point_coords / box / mask_input, if any). Each prompt gets one
text token: its CLIP embedding (`TextEncoder.embed_text`). A list of one string is one
prompt, like a string.

Compilation: one decoder per bucket of point counts (4, 8, 16, ...) and of prompt
counts (1, 2, 4, ..., 64, then multiples of 64), and per original image size (for the
upsampling), each with and without text; texts are embedded in the same prompt-count
buckets (padded with copies of the first). Points outside the image are allowed, as
upstream: they are encoded like any other coordinate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.config import SamConfig
from sam_jax.embeddings import ImageEmbeddings
from sam_jax.model import Params, SamModel, decode
from sam_jax.prompts import Prompts, bucket_size, make_prompts
from sam_jax.transforms import CHUNK_PIXELS, ResizeLongestSide, postprocess_masks, preprocess

if TYPE_CHECKING:
    from sam_jax.text import TextEncoder

PROMPT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _as_float_array(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_image(image: Any, image_format: str = "RGB", name: str = "image") -> np.ndarray:
    """Validate an HxWx3 uint8 image and return it as RGB."""
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (HxWx3 uint8), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8 (HxWx3 in [0, 255]), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape HxWx3, got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image)


def check_text(text: Any, name: str = "text") -> list[str] | str:
    """Validate a text prompt: a non-empty string, or a non-empty list (or tuple) of them."""
    form = "a string or a list of strings"
    if isinstance(text, str):
        if not text.strip():
            raise ValueError(f"{name} is empty: give {form} with words in them")
        return text
    if not isinstance(text, (list, tuple)):
        raise ValueError(f"{name} must be {form}, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{name} is an empty list: give {form}")
    for i, t in enumerate(text):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{name}[{i}] is empty: each text needs words in it")
    return list(text)


# Prompts decoded together on an accelerator: a larger batch of prompts is decoded DECODE_BATCH at a
# time (a `lax.map`), so the decoder's per-prompt activations (~20 MB a prompt at vit_b: upscaled
# mask embeddings, image tokens) take memory for one sub-batch. On a CPU the prompts are decoded one
# at a time: a prompt's activations then stay in the cache, and 64 prompts at vit_b decode in 0.72x
# the time of 16 at a time (2 cores: 1.99 s against 2.75 s; 0.83x at 4 at a time, 1.15x at 64).
# The first layer's image-side projections, the same for every prompt, stay outside the loop (64
# separate one-prompt calls, which redo them, take 3.09 s).
DECODE_BATCH = 16


def default_decode_batch(params: Params | None = None) -> int:
    """How many prompts `decode_prompts` decodes together by default: 1 on a CPU, else DECODE_BATCH. The
    platform is that of `params` where they are placed arrays (not numpy, not tracers), else JAX's default."""
    placed = (x for x in jax.tree.leaves(params) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))
    leaf = next(placed, None)
    platform = next(iter(leaf.devices())).platform if leaf is not None else jax.default_backend()
    return 1 if platform == "cpu" else DECODE_BATCH


def decode_prompts(
    params: Params,
    embedding: ImageEmbeddings,
    prompts: Prompts,
    *,
    config: SamConfig,
    multimask_output: bool,
    max_batch: int | None = None,
    hq_token_only: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One image's `ImageEmbeddings` (batch 1), B prompts -> low-res logits (B, M, 4h, 4w), IoU (B, M)
    (the decoding half of `sam_jax.model.predict_masks`), in sub-batches of the largest divisor of
    B between max_batch / 2 and max_batch (all B at once when there is none); max_batch None:
    `default_decode_batch(params)`."""
    b = prompts.labels.shape[0]
    max_batch = default_decode_batch(params) if max_batch is None else max_batch

    def run(p: Prompts) -> tuple[jax.Array, jax.Array]:
        n = p.labels.shape[0]
        emb = embedding if p.mask_input is None else embedding.broadcast_to(n)
        return decode(params, emb, p, config=config, multimask_output=multimask_output, hq_token_only=hq_token_only)

    sub = max((d for d in range(max(1, max_batch // 2), max_batch + 1) if b % d == 0), default=b)
    if sub >= b:
        return run(prompts)
    split = jax.tree.map(lambda x: x.reshape(b // sub, sub, *x.shape[1:]), prompts)
    low, iou = jax.lax.map(run, split)
    return low.reshape(b, *low.shape[2:]), iou.reshape(b, *iou.shape[2:])


def upsample_chunk(
    low: jax.Array,
    start: jax.Array,
    *,
    size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
    threshold: float | None,
) -> jax.Array:
    """Masks start .. start + size of low-res logits (N, s, s) -> (size, H, W) at the original
    size (the postprocessing half of `sam_jax.model.predict_masks`)."""
    chunk = jax.lax.dynamic_slice_in_dim(low, start, size)
    return postprocess_masks(chunk, input_size, original_size, image_size, threshold=threshold)


class SamPredictor:
    def __init__(self, sam_model: SamModel, text_encoder: TextEncoder | None = None) -> None:
        """sam_model: a `SamModel`; text_encoder: a CLIP `TextEncoder` for `predict(text=...)`
        (needs a model with a text projection of the encoder's width)."""
        self.model = sam_model
        self.text_encoder = text_encoder
        width = sam_model.config.prompt_encoder.text_embed_dim
        if text_encoder is not None and width is not None and text_encoder.embed_dim != width:
            self._check_text_support()  # raises: the widths differ
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.postprocess_size = self._postprocess_size(sam_model)
        self.mask_threshold = float(sam_model.config.mask_threshold)
        self.low_res_clamp: float | None = None  # SAM 2 clamps the low-res logits it returns to +-32
        self._predict = jax.jit(  # the decoder step; `_upsample` postprocesses its masks
            functools.partial(
                decode_prompts, config=sam_model.config, max_batch=default_decode_batch(sam_model.params)
            ),
            static_argnames=("multimask_output", "hq_token_only"),
        )
        self._upsample = jax.jit(
            functools.partial(upsample_chunk, image_size=self.postprocess_size),
            static_argnames=("size", "input_size", "original_size", "threshold"),
        )
        self.reset_image()

    @staticmethod
    def _postprocess_size(sam_model: SamModel) -> int:
        """The side of the square low-res logits are upscaled to, before they are cropped to the input
        size and resized to the original size (`postprocess_masks`): the model input's."""
        return sam_model.image_size

    # ------------------------------------------------------------------ images

    def _encode(self, images: Sequence[np.ndarray]) -> tuple[ImageEmbeddings, list, list]:
        cfg = self.model.config
        resized = [self.transform.apply_image(im) for im in images]
        batch = jnp.concatenate([preprocess(jnp.asarray(r)[None], cfg) for r in resized])
        return self.model.encode(batch), [im.shape[:2] for im in images], [r.shape[:2] for r in resized]

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of one HxWx3 uint8 image."""
        image = check_image(image, image_format)
        self.reset_image()
        self.features, self._orig_hw, self._input_hw = self._encode([image])
        self.is_image_set = True

    def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Compute the embeddings of several images (each HxWx3 uint8, sizes may differ) in one call."""
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of HxWx3 uint8 arrays")
        images = [check_image(im, image_format, f"images[{i}]") for i, im in enumerate(images)]
        self.reset_image()
        self.features, self._orig_hw, self._input_hw = self._encode(images)
        self.is_image_set = True
        self._is_batch = True

    def reset_image(self) -> None:
        self.is_image_set = False
        self._is_batch = False
        self.features = None
        self._orig_hw: list[tuple[int, int]] = []
        self._input_hw: list[tuple[int, int]] = []

    @property
    def original_size(self) -> tuple[int, int]:
        return self._orig_hw[0]

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_hw[0]

    def get_image_embedding(self) -> jax.Array:
        """The image embeddings, (B, C, h, w) as the official predictor returns them (B = 1 for
        set_image). All the encoder's outputs, high-res features included, are in `features`
        (`ImageEmbeddings`; SAM 2's predictor returns its image embedding alone too)."""
        self._require_image()
        return jnp.transpose(self.features.embedding, (0, 3, 1, 2))

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError(
                "An image must be set with .set_image(...) (or .set_image_batch(...)) before prediction."
            )

    # ------------------------------------------------------------------ prompts

    def _check_text_support(self) -> None:
        """Text is asked for: the model must have a text projection and a text encoder of its width."""
        width = self.model.config.prompt_encoder.text_embed_dim
        if width is None:
            raise ValueError(
                "text: this checkpoint has no text projection: it was not trained with text prompts "
                "(its config has prompt_encoder.text_embed_dim = None)"
            )
        if self.text_encoder is None:
            raise ValueError(
                "text: this predictor has no text encoder; create it as "
                "SamPredictor(sam, text_encoder=TextEncoder.from_folder(CLIP_FOLDER))"
            )
        if self.text_encoder.embed_dim != width:
            raise ValueError(
                f"text: the text encoder gives embeddings of width {self.text_encoder.embed_dim}, but this checkpoint "
                f"takes CLIP embeddings of width {width} (prompt_encoder.text_embed_dim): "
                "use the CLIP it was trained with"
            )

    def _prepare_prompts(
        self, point_coords, point_labels, box, mask_input, original_size: tuple[int, int], text=None
    ) -> tuple[Prompts, int, bool]:
        """Validate official-style prompts -> (padded Prompts, number of prompts B, batched?)."""
        sizes, batched = [], False
        if text is not None:
            text = check_text(text)
            self._check_text_support()
        coords = labels = boxes = masks = None
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            coords = _as_float_array(point_coords, "point_coords")
            labels = np.asarray(point_labels)
            if coords.ndim not in (2, 3) or coords.shape[-1] != 2 or coords.shape[-2] == 0:
                raise ValueError(f"point_coords must have shape (N, 2) or (B, N, 2) with N >= 1, got {coords.shape}")
            if labels.shape != coords.shape[:-1]:
                raise ValueError(
                    f"point_labels must have shape {coords.shape[:-1]} to match point_coords {coords.shape}, "
                    f"got {labels.shape}"
                )
            if not np.all(np.isin(labels, (0, 1))):
                raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
            batched |= coords.ndim == 3
            coords, labels = coords.reshape(-1, *coords.shape[-2:]), labels.reshape(-1, labels.shape[-1])
            sizes.append(coords.shape[0])
            coords = self._apply_coords(coords, original_size)
        if box is not None:
            boxes = _as_float_array(box, "box")
            if boxes.ndim not in (1, 2) or boxes.shape[-1] != 4:
                raise ValueError(f"box must have shape (4,) or (B, 4) as x0, y0, x1, y1, got {boxes.shape}")
            boxes = boxes.reshape(-1, 4)
            if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
                raise ValueError("box must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
            batched |= boxes.shape[0] > 1
            sizes.append(boxes.shape[0])
            boxes = self._apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
        if mask_input is not None:
            m = self.model.config.low_res_mask_size
            masks = _as_float_array(mask_input, "mask_input")
            if masks.ndim not in (3, 4) or masks.shape[-3:] != (1, m, m):
                raise ValueError(f"mask_input must have shape (1, {m}, {m}) or (B, 1, {m}, {m}), got {masks.shape}")
            batched |= masks.ndim == 4
            masks = masks.reshape(-1, m, m)
            sizes.append(masks.shape[0])
        if len(set(sizes)) > 1:
            raise ValueError(f"point_coords, box and mask_input give different numbers of prompts: {sizes}")
        if isinstance(text, list):
            if sizes and len(text) != sizes[0]:
                raise ValueError(
                    f"text has {len(text)} strings for {sizes[0]} prompts (point_coords / box / mask_input): give one "
                    "text per prompt, or a single string to use for every prompt"
                )
            batched |= len(text) > 1
            sizes.append(len(text))
        n = sizes[0] if sizes else 1
        padded = bucket_size(n, PROMPT_BATCH_BUCKETS)

        def pad(x):
            return None if x is None else np.concatenate([x, np.repeat(x[:1], padded - n, axis=0)])

        embeddings = None
        if isinstance(text, str):  # one text for every prompt: embedded once
            embeddings = np.broadcast_to(self.text_encoder.embed_text([text]), (padded, self.text_encoder.embed_dim))
        elif text is not None:  # one per prompt, embedded in the prompt bucket (a bounded set of CLIP shapes)
            embeddings = self.text_encoder.embed_text(text + [text[0]] * (padded - n))

        prompts = self._make_prompts(padded, pad(coords), pad(labels), pad(boxes), pad(masks), embeddings)
        if masks is None:
            prompts = prompts.without_masks()
        return prompts, n, batched

    def _apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Points (..., 2) (x, y) in the original image -> the model input's frame (float32)."""
        return self.transform.apply_coords(coords, original_size)

    def _make_prompts(self, batch_size, coords, labels, boxes, masks, text) -> Prompts:
        """The padded `Prompts` of B prompts in the model input's frame (points (B, N, 2) with labels
        (B, N), boxes (B, 4), masks (B, s, s), CLIP embeddings (B, Dt); each may be None)."""
        return make_prompts(
            batch_size=batch_size,
            mask_size=self.model.config.low_res_mask_size,
            point_coords=coords,
            point_labels=labels,
            boxes=boxes,
            mask_input=masks,
            text=text,  # (B, Dt): one text token per prompt
        )

    def _run(
        self,
        index,
        point_coords,
        point_labels,
        box,
        mask_input,
        multimask_output,
        return_logits,
        text=None,
        hq_token_only=False,
    ):
        orig, inp = self._orig_hw[index], self._input_hw[index]
        if hq_token_only and not self.model.config.mask_decoder.hq_token:
            raise ValueError(f"hq_token_only=True needs an HQ-SAM model (vit_b_hq, ...), not {self.model.config.name}")
        prompts, n, _ = self._prepare_prompts(point_coords, point_labels, box, mask_input, orig, text)
        low, iou = self._predict(
            self.model.params,
            self.features.select(index),
            prompts,
            multimask_output=bool(multimask_output),
            hq_token_only=bool(hq_token_only),
        )
        masks = self._postprocess(low, n, tuple(inp), tuple(orig), bool(return_logits))
        iou, low = np.array(np.asarray(iou)[:n]), np.array(np.asarray(low)[:n])
        if self.low_res_clamp is not None:
            np.clip(low, -self.low_res_clamp, self.low_res_clamp, out=low)
        return (masks[0], iou[0], low[0]) if n == 1 else (masks, iou, low)

    def _postprocess(
        self, low: jax.Array, n: int, input_size: tuple[int, int], original_size: tuple[int, int], logits: bool
    ) -> np.ndarray:
        """Low-res logits (Bp, M, s, s) of a padded prompt batch -> the first n prompts' masks
        (n, M, H, W) at the original size, bool (or float32 logits), in a new numpy array.

        The masks are upsampled a chunk at a time (`CHUNK_PIXELS` output pixels, a fixed chunk
        per prompt bucket) and each chunk is copied into the output as soon as it is done, so
        the peak memory is the output plus two chunks, whatever the number of prompts.
        """
        bp, m, s = low.shape[:3]
        h, w = original_size
        total, padded = n * m, bp * m
        k = max(1, min(padded, CHUNK_PIXELS // (h * w)))
        flat = low.reshape(padded, s, s)
        out = np.empty((total, h, w), np.float32 if logits else bool)
        threshold = None if logits else self.mask_threshold

        def copy(start: int, first: int, chunk: jax.Array) -> None:
            stop = min(start + k, total)
            out[start:stop] = np.asarray(chunk)[start - first : stop - first]

        pending = None
        for start in range(0, total, k):
            first = min(start, padded - k)  # the last chunk may overlap the previous one
            chunk = self._upsample(
                flat, first, size=k, input_size=input_size, original_size=original_size, threshold=threshold
            )
            if pending is not None:  # dispatched the next chunk before copying this one
                copy(*pending)
            pending = (start, first, chunk)
        copy(*pending)
        return out.reshape(n, m, h, w)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | Sequence[str] | None = None,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the image given to `set_image` (see the module docstring for shapes).

        text: a string (added to every prompt; alone, one prompt) or a list of B strings (one
        per prompt); needs a checkpoint with a text projection and the predictor's `text_encoder`.

        An HQ-SAM model returns one mask per prompt (C = 1), as `segment_anything_hq`: the SAM mask
        (with `multimask_output` the best of its three by predicted IoU) plus the HQ mask, or the
        HQ mask alone with `hq_token_only`.
        """
        self._require_image()
        if self._is_batch:
            raise RuntimeError("An image batch is set: use predict_batch(...) (or set_image(...) for one image).")
        return self._run(
            0, point_coords, point_labels, box, mask_input, multimask_output, return_logits, text, hq_token_only
        )

    def predict_batch(
        self,
        point_coords_batch: Sequence[np.ndarray | None] | None = None,
        point_labels_batch: Sequence[np.ndarray | None] | None = None,
        box_batch: Sequence[np.ndarray | None] | None = None,
        mask_input_batch: Sequence[np.ndarray | None] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text_batch: Sequence[str | Sequence[str] | None] | None = None,
        hq_token_only: bool = False,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`predict` for each image of `set_image_batch`: one entry per image in each list argument
        (each entry as `predict` takes it, possibly with B prompts; a `text_batch` entry as
        `predict`'s `text`). Returns three lists."""
        self._require_image()
        if not self._is_batch:
            raise RuntimeError("No image batch is set: call set_image_batch(...) first.")
        num = len(self._orig_hw)
        args = []
        for name, value in (
            ("point_coords_batch", point_coords_batch),
            ("point_labels_batch", point_labels_batch),
            ("box_batch", box_batch),
            ("mask_input_batch", mask_input_batch),
            ("text_batch", text_batch),
        ):
            if value is None:
                value = [None] * num
            if name == "text_batch" and (isinstance(value, str) or not isinstance(value, (list, tuple))):
                raise ValueError(
                    "text_batch must be a list with one entry per image (a string, a list of strings or None), "
                    f"got {type(value).__name__}"
                )
            if len(value) != num:
                raise ValueError(f"{name} has {len(value)} entries for {num} images")
            args.append(value)
        outs = [
            self._run(i, pc, pl, bx, mi, multimask_output, return_logits, tx, hq_token_only)
            for i, (pc, pl, bx, mi, tx) in enumerate(zip(*args))
        ]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]
