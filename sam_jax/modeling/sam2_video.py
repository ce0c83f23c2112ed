"""SAM 2's video-only tensors, carried unused by the image model (`SamConfig.video_tensors`).

A SAM 2.1 checkpoint also holds the memory attention, the memory encoder, the object-pointer
projections and a few learned embeddings that only video tracking reads. The image model never
uses them, but keeps them as params under their official names (one flat Flax param per official
key), so that a converted checkpoint exports whole: the official `build_sam2(cfg, ckpt_path)`
refuses a checkpoint with a missing key. Random weights give zeros.

The tensors and shapes are those of every SAM 2.1 size (hiera t, s, b+, l): d_model 256, memory
width 64, 4 memory attention layers (feed-forward 2048), 2 fuser blocks, 7 memory frames.
"""

from __future__ import annotations

from flax import linen as nn


def _linear(name: str, d_out: int, d_in: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (d_out, d_in)), (f"{name}.bias", (d_out,))]


def _conv(name: str, d_out: int, d_in: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (d_out, d_in, k, k)), (f"{name}.bias", (d_out,))]


def _norm(name: str, d: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (d,)), (f"{name}.bias", (d,))]


def video_tensors(
    d: int = 256, mem: int = 64, layers: int = 4, ffn: int = 2048, fuser_layers: int = 2, num_maskmem: int = 7
) -> list[tuple[str, tuple[int, ...]]]:
    """(official key, shape) of each video-only tensor of a SAM 2.1 checkpoint, in the official order."""
    out: list[tuple[str, tuple[int, ...]]] = [
        ("maskmem_tpos_enc", (num_maskmem, 1, 1, mem)),
        ("no_mem_pos_enc", (1, 1, d)),
        ("no_obj_ptr", (1, d)),
        ("no_obj_embed_spatial", (1, mem)),
    ]
    out += _conv("mask_downsample", 1, 1, 4)
    for i in range(layers):
        o = f"memory_attention.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _linear(f"{o}.self_attn.{proj}", d, d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _linear(f"{o}.cross_attn_image.{proj}", d, mem if proj in ("k_proj", "v_proj") else d)
        out += _linear(f"{o}.linear1", ffn, d) + _linear(f"{o}.linear2", d, ffn)
        for j in (1, 2, 3):
            out += _norm(f"{o}.norm{j}", d)
    out += _norm("memory_attention.norm", d)
    o = "memory_encoder.mask_downsampler.encoder"
    widths = [1, 4, 16, 64, 256]
    for j in range(4):  # conv (3x3, stride 2), LayerNorm2d, GELU
        out += _conv(f"{o}.{3 * j}", widths[j + 1], widths[j], 3) + _norm(f"{o}.{3 * j + 1}", widths[j + 1])
    out += _conv(f"{o}.12", d, d, 1)
    out += _conv("memory_encoder.pix_feat_proj", d, d, 1)
    for i in range(fuser_layers):
        o = f"memory_encoder.fuser.layers.{i}"
        out += [(f"{o}.gamma", (d,)), (f"{o}.dwconv.weight", (d, 1, 7, 7)), (f"{o}.dwconv.bias", (d,))]
        out += _norm(f"{o}.norm", d) + _linear(f"{o}.pwconv1", 4 * d, d) + _linear(f"{o}.pwconv2", d, 4 * d)
    out += _conv("memory_encoder.out_proj", mem, d, 1)
    for j in range(3):
        out += _linear(f"obj_ptr_proj.layers.{j}", d, d)
    out += _linear("obj_ptr_tpos_proj", mem, d)
    return out


class VideoTensors(nn.Module):
    """Holds `video_tensors()` as params named by their official keys (zeros at init); computes nothing."""

    @nn.compact
    def __call__(self) -> None:
        for key, shape in video_tensors():
            self.param(key, nn.initializers.zeros_init(), shape)
