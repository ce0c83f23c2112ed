"""A frozen image encoder's outputs cached on disk: each training image is encoded once, ever.

    cache = EmbeddingCache(workdir / "embeddings", params, config)
    cache.ensure(record["image"])      # encodes the image unless its embeddings are on disk -> True if it encoded
    emb = cache.load(record["image"])  # the encoder's output for it, leaves without the batch axis (numpy)

Keys: the cache's folder is named by a hash of the image encoder's params and of the config fields
the embeddings depend on (the image encoder, the pixel normalisation, the compute dtype); a file by
a hash of the image's pixels and of the preprocessing (`PREPROCESSING`, the resize of
`train.data.model_input`; training applies no augmentation). Another checkpoint, another dtype
or a changed image never reads a stale entry.

The encoder's output is treated as an opaque pytree (`ImageEmbeddings`: the embedding and any
extra features): every leaf is stored, one `.npz` per image, written atomically (a crash never
leaves a partial entry). An official-size model's entry is its 64 x 64 x 256 embedding (4 MiB
in float32).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.config import SamConfig
from sam_jax.files import write_atomic
from sam_jax.model import Params, encode
from sam_jax.train.data import model_input

PREPROCESSING = "resize-longest-bilinear+normalize+pad"  # what train.data.model_input does to an image
_HALF = {"bfloat16": np.uint16, "float16": np.uint16}  # stored bit for bit (np.load does not know bfloat16)


class EmbeddingCacheError(RuntimeError):
    """An image's embeddings are not in the cache (it was not encoded before training)."""


@functools.cache
def _jitted_encoder(config: SamConfig):
    return jax.jit(functools.partial(encode, config=config))


def encode_image(params: Params, image: np.ndarray, config: SamConfig) -> Any:
    """image (H, W, 3) uint8 -> the encoder's output for it (a pytree, leaves (1, ...)) on the host."""
    x = jnp.asarray(model_input(image, config))[None]
    return jax.device_get(_jitted_encoder(config)(params, x))


def encoder_key(params: Params, config: SamConfig) -> str:
    """A hash of the image encoder's params (names, shapes, dtypes, bytes) and of the config fields its
    output depends on: two encoders with the same key give the same embeddings."""
    h = hashlib.blake2b(digest_size=16)
    fields = {k: config.to_dict()[k] for k in ("image_encoder", "pixel_mean", "pixel_std", "dtype")}
    if config.mask_decoder.hq_token:  # HQ-SAM's encoder also gives its early features (a SAM's fine-tuned as HQ-SAM)
        fields["interm"] = True
    h.update(json.dumps(fields, sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["image_encoder"])[0]:
        arr = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def image_key(image: np.ndarray) -> str:
    """A hash of an image's pixels (H, W, 3) uint8 and of the preprocessing."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{PREPROCESSING}{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """The encoder outputs of one frozen encoder (`params`' image encoder under `config`), under
    `root / encoder_key(params, config)`. `ensure` encodes an image not cached yet (`encode_image`);
    `load` reads one back. Safe to read from several threads (the data pipeline's)."""

    def __init__(self, root: str | Path, params: Params, config: SamConfig):
        self.params, self.config = params, config
        self.dir = Path(root) / encoder_key(params, config)
        self.dir.mkdir(parents=True, exist_ok=True)
        s = config.image_size
        shapes = jax.eval_shape(_jitted_encoder(config), params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
        self.treedef = jax.tree.structure(shapes)
        self.leaf_shapes = [(tuple(x.shape[1:]), np.dtype(x.dtype)) for x in jax.tree.leaves(shapes)]

    def path(self, image: np.ndarray) -> Path:
        return self.dir / f"{image_key(image)}.npz"

    def __contains__(self, image: np.ndarray) -> bool:
        return self.path(image).is_file()

    def ensure(self, image: np.ndarray) -> bool:
        """Encode `image` (H, W, 3) uint8 and store its output unless it is stored -> whether it encoded."""
        path = self.path(image)
        if path.is_file():
            return False
        leaves = [np.asarray(x)[0] for x in jax.tree.leaves(encode_image(self.params, image, self.config))]
        arrays = {f"leaf_{i}": _storable(x) for i, x in enumerate(leaves)}
        arrays["dtypes"] = np.asarray([str(x.dtype) for x in leaves])

        def write(tmp: Path) -> None:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            tmp.write_bytes(buffer.getvalue())

        write_atomic(path, write)
        return True

    def load(self, image: np.ndarray) -> Any:
        """The stored encoder output of `image` (H, W, 3) uint8: the encoder's pytree with leaves
        without the batch axis (e.g. the embedding (h, w, C)); EmbeddingCacheError if it is not stored."""
        path = self.path(image)
        try:
            with np.load(path) as f:
                dtypes = [str(d) for d in f["dtypes"]]
                leaves = [_restored(f[f"leaf_{i}"], d) for i, d in enumerate(dtypes)]
        except FileNotFoundError:
            raise EmbeddingCacheError(f"{path}: no cached embeddings for this image (encode it first)") from None
        got = [(x.shape, x.dtype) for x in leaves]
        if got != self.leaf_shapes:
            raise EmbeddingCacheError(f"{path}: cached leaves {got} differ from the encoder's {self.leaf_shapes}")
        return jax.tree.unflatten(self.treedef, leaves)


def _storable(x: np.ndarray) -> np.ndarray:
    return x.view(_HALF[str(x.dtype)]) if str(x.dtype) in _HALF else x


def _restored(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(jnp.dtype(dtype)) if dtype in _HALF else x
