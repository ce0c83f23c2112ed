"""The key table of SAM 2's image side (official `sam2`): the Hiera trunk and FPN neck
(`image_encoder.trunk.*`, `image_encoder.neck.*`), `no_mem_embed`, and the mask decoder's two
projections of the high-res features (`sam_mask_decoder.conv_s0`, `conv_s1`), which
`SAM2Base.forward_image` applies once per image and `modeling.hiera.Sam2ImageEncoder` therefore
holds. `hiera_rows(config)` lists one `keys.Row` per tensor, walking the modules in the official
order (the module docstring of `modeling.hiera` lists the paths). The neck's sine position
encodings have no parameters. SAM 2 has no Hugging Face `SamModel` counterpart here (hf None).

`pos_embed` (1, C, bh, bw), `pos_embed_window` (1, C, w, w) and `no_mem_embed` (1, 1, C) keep the
official layouts (identity).
"""

from __future__ import annotations

from collections.abc import Iterator

from sam_jax.config import HieraConfig, SamConfig
from sam_jax.convert.keys import Path, Row, conv, identity, linear

PREFIX = "image_encoder"


def _linear(o: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", None, (*f, "kernel"), linear)
    yield Row(f"{o}.bias", None, (*f, "bias"), identity)


def _conv(o: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", None, (*f, "kernel"), conv)
    yield Row(f"{o}.bias", None, (*f, "bias"), identity)


def _norm(o: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", None, (*f, "scale"), identity)
    yield Row(f"{o}.bias", None, (*f, "bias"), identity)


def hiera_rows(config: SamConfig) -> list[Row]:
    """Every tensor of SAM 2's image side for a `SamConfig` holding a `HieraConfig`, in the official
    module order: the trunk, the neck, then `no_mem_embed` and the decoder's `conv_s0`, `conv_s1`."""
    enc = config.image_encoder
    if not isinstance(enc, HieraConfig):
        raise TypeError(f"hiera_rows: {config.name} has a {type(enc).__name__}, not a HieraConfig")
    f = (PREFIX,)
    ot, ft = f"{PREFIX}.trunk", (*f, "trunk")
    rows: list[Row] = [
        Row(f"{ot}.pos_embed", None, (*ft, "pos_embed"), identity),
        Row(f"{ot}.pos_embed_window", None, (*ft, "pos_embed_window"), identity),
    ]
    rows += _conv(f"{ot}.patch_embed.proj", (*ft, "patch_embed", "proj"))
    for i, (dim, dim_out, *_) in enumerate(enc.block_specs):
        ob, fb = f"{ot}.blocks.{i}", (*ft, f"blocks_{i}")
        rows += _norm(f"{ob}.norm1", (*fb, "norm1"))
        rows += _linear(f"{ob}.attn.qkv", (*fb, "attn", "qkv"))
        rows += _linear(f"{ob}.attn.proj", (*fb, "attn", "proj"))
        rows += _norm(f"{ob}.norm2", (*fb, "norm2"))
        for j in range(2):
            rows += _linear(f"{ob}.mlp.layers.{j}", (*fb, "mlp", f"layers_{j}"))
        if dim != dim_out:
            rows += _linear(f"{ob}.proj", (*fb, "proj"))
    for j in range(len(enc.backbone_channel_list)):
        rows += _conv(f"{PREFIX}.neck.convs.{j}.conv", (*f, "neck", f"convs_{j}"))
    rows.append(Row("no_mem_embed", None, (*f, "no_mem_embed"), identity))
    rows += _conv("sam_mask_decoder.conv_s0", (*f, "conv_s0"))
    rows += _conv("sam_mask_decoder.conv_s1", (*f, "conv_s1"))
    return rows
