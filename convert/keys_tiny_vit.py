"""The explicit key table of MobileSAM's TinyViT image encoder (official `tiny_vit_sam.TinyViT`).

`tiny_vit_rows(config)` lists one `keys.Row` per tensor of the encoder, walking the modules in
the official order; `tiny_vit_buffers(config)` the BatchNorms' `num_batches_tracked` counters,
which an inference-mode BatchNorm never reads: they are accepted on load, present or not, and
written as 0 on export (as a fresh `BatchNorm2d` holds them). TinyViT has no Hugging Face
`transformers` counterpart, so its rows have no `hf` key.
"""

from __future__ import annotations

from collections.abc import Iterator

from sam_jax.config import SamConfig
from sam_jax.convert.keys import Path, Row, conv, identity, linear

PREFIX = "image_encoder"


def _conv_bn(o: str, f: Path) -> Iterator[Row]:
    """`Conv2d_BN`: a bias-free conv `c`, a BatchNorm `bn` (weight, bias, running statistics)."""
    yield Row(f"{o}.c.weight", None, (*f, "c", "kernel"), conv)
    for official, flax in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
        yield Row(f"{o}.bn.{official}", None, (*f, "bn", flax), identity)


def _linear(o: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", None, (*f, "kernel"), linear)
    yield Row(f"{o}.bias", None, (*f, "bias"), identity)


def _norm(o: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", None, (*f, "scale"), identity)
    yield Row(f"{o}.bias", None, (*f, "bias"), identity)


def tiny_vit_rows(config: SamConfig) -> list[Row]:
    """Every tensor of a TinyViT encoder, in the official module order."""
    enc = config.image_encoder
    o, f = PREFIX, (PREFIX,)
    rows: list[Row] = []
    for i in (0, 2):
        rows += _conv_bn(f"{o}.patch_embed.seq.{i}", (*f, "patch_embed", f"seq_{i}"))
    for i, depth in enumerate(enc.depths):
        ol, fl = f"{o}.layers.{i}", (*f, f"layers_{i}")
        for j in range(depth):
            ob, fb = f"{ol}.blocks.{j}", (*fl, f"blocks_{j}")
            if i == 0:
                for name in ("conv1", "conv2", "conv3"):
                    rows += _conv_bn(f"{ob}.{name}", (*fb, name))
                continue
            rows.append(Row(f"{ob}.attn.attention_biases", None, (*fb, "attn", "attention_biases"), identity))
            rows += _norm(f"{ob}.attn.norm", (*fb, "attn", "norm"))
            rows += _linear(f"{ob}.attn.qkv", (*fb, "attn", "qkv"))
            rows += _linear(f"{ob}.attn.proj", (*fb, "attn", "proj"))
            rows += _norm(f"{ob}.mlp.norm", (*fb, "mlp", "norm"))
            rows += _linear(f"{ob}.mlp.fc1", (*fb, "mlp", "fc1"))
            rows += _linear(f"{ob}.mlp.fc2", (*fb, "mlp", "fc2"))
            rows += _conv_bn(f"{ob}.local_conv", (*fb, "local_conv"))
        if i < len(enc.depths) - 1:
            for name in ("conv1", "conv2", "conv3"):
                rows += _conv_bn(f"{ol}.downsample.{name}", (*fl, "downsample", name))
    rows += _norm(f"{o}.norm_head", (*f, "norm_head"))
    if enc.num_classes:
        rows += _linear(f"{o}.head", (*f, "head"))
    rows.append(Row(f"{o}.neck.0.weight", None, (*f, "neck_0", "kernel"), conv))
    rows += _norm(f"{o}.neck.1", (*f, "neck_1"))
    rows.append(Row(f"{o}.neck.2.weight", None, (*f, "neck_2", "kernel"), conv))
    rows += _norm(f"{o}.neck.3", (*f, "neck_3"))
    return rows


def tiny_vit_buffers(config: SamConfig) -> list[str]:
    """The official keys of the BatchNorms' `num_batches_tracked` counters (int64 scalars), one
    beside each BatchNorm's `running_var`."""
    suffix = ".bn.running_var"
    return [
        row.official[: -len(suffix)] + ".bn.num_batches_tracked"
        for row in tiny_vit_rows(config)
        if row.flax[-2:] == ("bn", "var")
    ]
