"""HQ-SAM's rows of the key table (official `segment_anything_hq`'s `MaskDecoderHQ`): the HQ token,
its MLP and the three convolution stacks of the HQ features, after SAM's mask decoder rows. The
image encoder, prompt encoder and the rest of the decoder are SAM's, under SAM's keys.
Hugging Face's SAM has none of them (hf None)."""

from __future__ import annotations

from collections.abc import Iterator

from sam_jax.config import SamConfig
from sam_jax.convert.keys import Row, conv, conv_transpose, identity, linear


def _stack(name: str, layer) -> Iterator[Row]:
    """An official `nn.Sequential` `name` of layer 0, LayerNorm2d 1, GELU, layer 3 -> Flax `{name}_{i}`."""
    o, f = f"mask_decoder.{name}", ("mask_decoder",)
    yield Row(f"{o}.0.weight", None, (*f, f"{name}_0", "kernel"), layer)
    yield Row(f"{o}.0.bias", None, (*f, f"{name}_0", "bias"), identity)
    yield Row(f"{o}.1.weight", None, (*f, f"{name}_1", "scale"), identity)
    yield Row(f"{o}.1.bias", None, (*f, f"{name}_1", "bias"), identity)
    yield Row(f"{o}.3.weight", None, (*f, f"{name}_3", "kernel"), layer)
    yield Row(f"{o}.3.bias", None, (*f, f"{name}_3", "bias"), identity)


def hq_rows(config: SamConfig) -> Iterator[Row]:
    """The HQ decoder's own tensors, in the official module order (empty for SAM's decoder)."""
    if not config.mask_decoder.hq_token:
        return
    f = ("mask_decoder",)
    yield Row("mask_decoder.hf_token.weight", None, (*f, "hf_token", "embedding"), identity)
    for j in range(3):
        yield Row(f"mask_decoder.hf_mlp.layers.{j}.weight", None, (*f, "hf_mlp", f"layers_{j}", "kernel"), linear)
        yield Row(f"mask_decoder.hf_mlp.layers.{j}.bias", None, (*f, "hf_mlp", f"layers_{j}", "bias"), identity)
    yield from _stack("compress_vit_feat", conv_transpose)
    yield from _stack("embedding_encoder", conv_transpose)
    yield from _stack("embedding_maskfeature", conv)


# Keys only an HQ-SAM checkpoint has: how a SAM checkpoint given as an HQ model (and the reverse) is told apart.
HQ_TOKEN_KEY = "mask_decoder.hf_token.weight"
