"""The explicit key table between the official PyTorch SAM, Hugging Face SAM and sam-jax.

`key_table(config)` lists one `Row` per tensor: the official state-dict key, the
Hugging Face `SamModel` key, the Flax param path and the named transform that
turns the official layout into the Flax one. It is generated from the config
by walking the modules in the same order as the official code; no key is ever
derived by string substitution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from sam_jax.config import HieraConfig, SamConfig, TinyViTConfig

# ---------------------------------------------------------------------------
# Named layout transforms: official (PyTorch) layout -> Flax layout, and back.


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    return np.ascontiguousarray(x.T)


def linear_inv(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def conv(x: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight (O, I, kH, kW) -> Conv kernel (kH, kW, I, O)."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_inv(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def conv_transpose(x: np.ndarray) -> np.ndarray:
    """nn.ConvTranspose2d weight (in, out, kH, kW) -> ConvTranspose kernel (kH, kW, out, in).

    The Flax module uses `transpose_kernel=True`, which flips the spatial axes itself.
    """
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_transpose_inv(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


INVERSE: dict[Callable, Callable] = {
    identity: identity,
    linear: linear_inv,
    conv: conv_inv,
    conv_transpose: conv_transpose_inv,
}


@dataclasses.dataclass(frozen=True)
class Row:
    official: str  # official segment_anything state-dict key
    hf: str | None  # Hugging Face transformers SamModel key (None: the model has none, as TinyViT)
    flax: tuple[str, ...]  # path in the Flax params tree
    transform: Callable[[np.ndarray], np.ndarray]  # official layout -> Flax layout

    @property
    def inverse(self) -> Callable[[np.ndarray], np.ndarray]:
        return INVERSE[self.transform]


# ---------------------------------------------------------------------------
# Building blocks. Each takes (official prefix, HF prefix, Flax path prefix).

Path = tuple[str, ...]


def _linear(o: str, h: str, f: Path, bias: bool = True) -> Iterator[Row]:
    yield Row(f"{o}.weight", f"{h}.weight", (*f, "kernel"), linear)
    if bias:
        yield Row(f"{o}.bias", f"{h}.bias", (*f, "bias"), identity)


def _conv(o: str, h: str, f: Path, bias: bool = True, transform: Callable = conv) -> Iterator[Row]:
    yield Row(f"{o}.weight", f"{h}.weight", (*f, "kernel"), transform)
    if bias:
        yield Row(f"{o}.bias", f"{h}.bias", (*f, "bias"), identity)


def _norm(o: str, h: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", f"{h}.weight", (*f, "scale"), identity)
    yield Row(f"{o}.bias", f"{h}.bias", (*f, "bias"), identity)


def _embedding(o: str, h: str, f: Path) -> Iterator[Row]:
    yield Row(f"{o}.weight", f"{h}.weight", (*f, "embedding"), identity)


def _image_encoder(cfg: SamConfig) -> Iterator[Row]:
    enc = cfg.image_encoder
    o, h, f = "image_encoder", "vision_encoder", ("image_encoder",)
    yield from _conv(f"{o}.patch_embed.proj", f"{h}.patch_embed.projection", (*f, "patch_embed", "proj"))
    if enc.use_abs_pos:
        yield Row(f"{o}.pos_embed", f"{h}.pos_embed", (*f, "pos_embed"), identity)
    for i in range(enc.depth):
        ob, hb, fb = f"{o}.blocks.{i}", f"{h}.layers.{i}", (*f, f"blocks_{i}")
        yield from _norm(f"{ob}.norm1", f"{hb}.layer_norm1", (*fb, "norm1"))
        yield from _linear(f"{ob}.attn.qkv", f"{hb}.attn.qkv", (*fb, "attn", "qkv"), bias=enc.qkv_bias)
        yield from _linear(f"{ob}.attn.proj", f"{hb}.attn.proj", (*fb, "attn", "proj"))
        if enc.use_rel_pos:
            for axis in ("h", "w"):
                yield Row(
                    f"{ob}.attn.rel_pos_{axis}", f"{hb}.attn.rel_pos_{axis}", (*fb, "attn", f"rel_pos_{axis}"), identity
                )
        yield from _norm(f"{ob}.norm2", f"{hb}.layer_norm2", (*fb, "norm2"))
        yield from _linear(f"{ob}.mlp.lin1", f"{hb}.mlp.lin1", (*fb, "mlp", "lin1"))
        yield from _linear(f"{ob}.mlp.lin2", f"{hb}.mlp.lin2", (*fb, "mlp", "lin2"))
    yield from _conv(f"{o}.neck.0", f"{h}.neck.conv1", (*f, "neck_0"), bias=False)
    yield from _norm(f"{o}.neck.1", f"{h}.neck.layer_norm1", (*f, "neck_1"))
    yield from _conv(f"{o}.neck.2", f"{h}.neck.conv2", (*f, "neck_2"), bias=False)
    yield from _norm(f"{o}.neck.3", f"{h}.neck.layer_norm2", (*f, "neck_3"))


def _prompt_encoder(cfg: SamConfig, o: str = "prompt_encoder") -> Iterator[Row]:
    """The prompt encoder under the official prefix `o` (SAM 2: `sam_prompt_encoder`)."""
    h, f = "prompt_encoder", ("prompt_encoder",)
    yield Row(
        f"{o}.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
        (*f, "pe_layer", "positional_encoding_gaussian_matrix"),
        identity,
    )
    for i in range(4):
        yield from _embedding(f"{o}.point_embeddings.{i}", f"{h}.point_embed.{i}", (*f, f"point_embeddings_{i}"))
    yield from _embedding(f"{o}.not_a_point_embed", f"{h}.not_a_point_embed", (*f, "not_a_point_embed"))
    yield from _conv(f"{o}.mask_downscaling.0", f"{h}.mask_embed.conv1", (*f, "mask_downscaling_0"))
    yield from _norm(f"{o}.mask_downscaling.1", f"{h}.mask_embed.layer_norm1", (*f, "mask_downscaling_1"))
    yield from _conv(f"{o}.mask_downscaling.3", f"{h}.mask_embed.conv2", (*f, "mask_downscaling_3"))
    yield from _norm(f"{o}.mask_downscaling.4", f"{h}.mask_embed.layer_norm2", (*f, "mask_downscaling_4"))
    yield from _conv(f"{o}.mask_downscaling.6", f"{h}.mask_embed.conv3", (*f, "mask_downscaling_6"))
    yield from _embedding(f"{o}.no_mask_embed", f"{h}.no_mask_embed", (*f, "no_mask_embed"))
    if cfg.prompt_encoder.text_embed_dim is not None:  # sam-jax's text prompts: no official counterpart
        for i in range(2):
            yield from _linear(f"{o}.text_proj.{i}", f"{h}.text_proj.{i}", (*f, f"text_proj_{i}"))
        yield from _embedding(f"{o}.text_embed", f"{h}.text_embed", (*f, "text_embed"))


def _attention(o: str, h: str, f: Path) -> Iterator[Row]:
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        yield from _linear(f"{o}.{proj}", f"{h}.{proj}", (*f, proj))


def _mlp(o: str, h: str, f: Path, num_layers: int) -> Iterator[Row]:
    """The decoder `MLP`; HF names its layers proj_in, layers.0 .. layers.{n-3}, proj_out."""
    for j in range(num_layers):
        hf_name = "proj_in" if j == 0 else "proj_out" if j == num_layers - 1 else f"layers.{j - 1}"
        yield from _linear(f"{o}.layers.{j}", f"{h}.{hf_name}", (*f, f"layers_{j}"))


def _mask_decoder(cfg: SamConfig, o: str = "mask_decoder", mlp: tuple[str, str] = ("lin1", "lin2")) -> Iterator[Row]:
    """The mask decoder under the official prefix `o`, its transformer's MLP layers named `mlp`
    (SAM 2: `sam_mask_decoder`, ("layers.0", "layers.1"))."""
    dec = cfg.mask_decoder
    h, f = "mask_decoder", ("mask_decoder",)
    yield from _embedding(f"{o}.iou_token", f"{h}.iou_token", (*f, "iou_token"))
    yield from _embedding(f"{o}.mask_tokens", f"{h}.mask_tokens", (*f, "mask_tokens"))
    if cfg.prompt_encoder.text_embed_dim is not None:  # sam-jax's text prompts: no official counterpart
        yield from _embedding(f"{o}.text_mask_tokens", f"{h}.text_mask_tokens", (*f, "text_mask_tokens"))
    ot, ht, ft = f"{o}.transformer", f"{h}.transformer", (*f, "transformer")
    for i in range(dec.transformer_depth):
        ol, hl, fl = f"{ot}.layers.{i}", f"{ht}.layers.{i}", (*ft, f"layers_{i}")
        yield from _attention(f"{ol}.self_attn", f"{hl}.self_attn", (*fl, "self_attn"))
        yield from _norm(f"{ol}.norm1", f"{hl}.layer_norm1", (*fl, "norm1"))
        yield from _attention(
            f"{ol}.cross_attn_token_to_image", f"{hl}.cross_attn_token_to_image", (*fl, "cross_attn_token_to_image")
        )
        yield from _norm(f"{ol}.norm2", f"{hl}.layer_norm2", (*fl, "norm2"))
        yield from _linear(f"{ol}.mlp.{mlp[0]}", f"{hl}.mlp.lin1", (*fl, "mlp", "lin1"))
        yield from _linear(f"{ol}.mlp.{mlp[1]}", f"{hl}.mlp.lin2", (*fl, "mlp", "lin2"))
        yield from _norm(f"{ol}.norm3", f"{hl}.layer_norm3", (*fl, "norm3"))
        yield from _norm(f"{ol}.norm4", f"{hl}.layer_norm4", (*fl, "norm4"))
        yield from _attention(
            f"{ol}.cross_attn_image_to_token", f"{hl}.cross_attn_image_to_token", (*fl, "cross_attn_image_to_token")
        )
    yield from _attention(
        f"{ot}.final_attn_token_to_image", f"{ht}.final_attn_token_to_image", (*ft, "final_attn_token_to_image")
    )
    yield from _norm(f"{ot}.norm_final_attn", f"{ht}.layer_norm_final_attn", (*ft, "norm_final_attn"))
    yield from _conv(
        f"{o}.output_upscaling.0", f"{h}.upscale_conv1", (*f, "output_upscaling_0"), transform=conv_transpose
    )
    yield from _norm(f"{o}.output_upscaling.1", f"{h}.upscale_layer_norm", (*f, "output_upscaling_1"))
    yield from _conv(
        f"{o}.output_upscaling.3", f"{h}.upscale_conv2", (*f, "output_upscaling_3"), transform=conv_transpose
    )
    for i in range(dec.num_multimask_outputs + 1):
        yield from _mlp(
            f"{o}.output_hypernetworks_mlps.{i}",
            f"{h}.output_hypernetworks_mlps.{i}",
            (*f, f"output_hypernetworks_mlps_{i}"),
            3,
        )
    yield from _mlp(
        f"{o}.iou_prediction_head", f"{h}.iou_prediction_head", (*f, "iou_prediction_head"), dec.iou_head_depth
    )


def key_table(config: SamConfig) -> list[Row]:
    """Every tensor of a SAM with this config, in the official module order (MobileSAM's TinyViT
    encoder: `keys_tiny_vit`; HQ-SAM's decoder additions: `keys_hq`; SAM 2.1: `keys_sam2`)."""
    if isinstance(config.image_encoder, HieraConfig):  # SAM 2.1
        from sam_jax.convert.keys_sam2 import sam2_rows

        return sam2_rows(config)
    tiny_vit = isinstance(config.image_encoder, TinyViTConfig)
    if not tiny_vit and config.image_encoder.high_res_channels:
        raise ValueError(
            f"the {config.name} model has high-res features (image_encoder.high_res_channels="
            f"{config.image_encoder.high_res_channels}), which the official SAM does not have: it cannot be "
            "converted to or from official checkpoints (save_params / load_model keep it whole)"
        )
    if not tiny_vit and config.image_encoder.conv_stem:
        raise ValueError(
            f"the {config.name} model has a convolutional stem "
            f"(image_encoder.conv_stem={config.image_encoder.conv_stem}) "
            "instead of the official patch projection: it cannot be converted to or from official checkpoints "
            "(save_params / load_model keep it whole)"
        )
    if config.mask_decoder.click_map_sigmas:
        raise ValueError(
            f"the {config.name} model has click maps "
            f"(mask_decoder.click_map_sigmas={config.mask_decoder.click_map_sigmas}), "
            "which the official SAM does not have: it cannot be converted to or from official checkpoints "
            "(save_params / load_model keep it whole)"
        )
    from sam_jax.convert.keys_hq import hq_rows  # HQ-SAM's decoder additions (none for SAM)

    if tiny_vit:
        from sam_jax.convert.keys_tiny_vit import tiny_vit_rows

        return [*tiny_vit_rows(config), *_prompt_encoder(config), *_mask_decoder(config), *hq_rows(config)]
    return [*_image_encoder(config), *_prompt_encoder(config), *_mask_decoder(config), *hq_rows(config)]


def ignored_buffers(config: SamConfig) -> list[str]:
    """Official keys of buffers that inference never reads and sam-jax does not keep (TinyViT's
    BatchNorm `num_batches_tracked`): accepted on load, written as 0 on export."""
    if isinstance(config.image_encoder, TinyViTConfig):
        from sam_jax.convert.keys_tiny_vit import tiny_vit_buffers

        return tiny_vit_buffers(config)
    return []
