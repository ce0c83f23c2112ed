"""Model configurations: frozen dataclasses, one registry of named variants.

The official hyperparameters come from `segment_anything/build_sam.py` (vit_b, vit_l, vit_h)
and `mobile_sam/build_sam.py` (vit_t, MobileSAM's TinyViT encoder), with HQ-SAM's decoder
from `segment_anything_hq/build_sam.py` (vit_*_hq; vit_tiny_hq on the TinyViT). `tiny`
is a small model with the same structure (windowed + global attention, a
non-trivial window padding) for the tests.

Parameters are always float32; `dtype` is the compute dtype only, so a float32
checkpoint runs in bfloat16 with `dataclasses.replace(config, dtype="bfloat16")`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

ATTENTION_IMPLS = ("chunked", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    """`ImageEncoderViT` hyperparameters (its output width is `SamConfig.prompt_embed_dim`)."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    # Training only (no effect on inference or on the params):
    # stochastic depth on both residual branches of every block, the rate rising
    # linearly from 0 (first block) to `drop_path_rate` (last block), as in
    # timm/MAE; the paper uses 0.6/0.4/0.4 for B/L/H. Applied only when
    # `model.encode` gets a `drop_path_rng`.
    drop_path_rate: float = 0.0
    # Rematerialize each block (`nn.remat`): its activations are recomputed in
    # the backward pass instead of stored. Same params, same outputs.
    remat: bool = False
    # The attention kernel (`modeling.image_encoder.Attention.impl`), same result each:
    # "chunked" (query chunks; fastest on CPUs), "cudnn" (cuDNN flash attention with the
    # relative positions folded into q and k; NVIDIA GPUs, bfloat16/float16 compute) or
    # "xla" (that formulation through XLA, any backend).
    attention: str = "chunked"
    # "chunked": queries per chunk of a global block (whole grid rows; at least one row).
    attention_query_block: int = 64
    # High-resolution features for the mask decoder's upscaling, as SAM 2's
    # (`use_high_res_features_in_sam`), where a plain ViT has no early stages to take them
    # from: a pixel stem of two convolutions, `high_res_channels` wide at the mask
    # logits' resolution (stride patch/4) and twice that at twice the grid's (stride patch/2),
    # each projected to the upscaling's width and added in it (`modeling.image_encoder.
    # HighResFeatures`). 0: none, the official SAM.
    high_res_channels: int = 0
    # A convolutional stem instead of the patch projection (Xiao et al. 2021, "Early
    # convolutions help transformers see better"): 3x3 convolutions of these widths, each
    # followed by LayerNorm and GELU, the first log2(patch_size) of stride 2 and the rest of
    # stride 1, then a 1x1 projection to `embed_dim` (`modeling.image_encoder.ConvStem`).
    # (): the patch projection, the official SAM. Its overlapping receptive fields (63 px for
    # six layers at stride 8) see the corners and curves that tell shapes apart, which a ViT
    # trained from scratch learns far more slowly (docs/text-training.md).
    conv_stem: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.conv_stem:
            strides = self.patch_size.bit_length() - 1
            if self.patch_size != 1 << strides or len(self.conv_stem) < strides or min(self.conv_stem) < 1:
                raise ValueError(
                    f"conv_stem {self.conv_stem!r} needs a power-of-two patch_size and at least log2(patch_size) "
                    f"positive widths (patch_size {self.patch_size}: {strides} stride-2 convolutions)"
                )
        if self.high_res_channels < 0 or (self.high_res_channels and self.patch_size % 4):
            raise ValueError(
                f"high_res_channels must be >= 0, and needs a patch_size divisible by 4; "
                f"got {self.high_res_channels!r} with patch_size {self.patch_size}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """The per-block drop path rates: linspace(0, drop_path_rate, depth)."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depth))

    @property
    def grid_size(self) -> int:
        """Side of the patch grid (64 for the official 1024 / 16)."""
        return self.img_size // self.patch_size

    @property
    def interm_dim(self) -> int:
        """Width of HQ-SAM's early features (`ImageEmbeddings.interm`): the first global-attention
        block's output, `embed_dim` wide."""
        return self.embed_dim


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
    """`TinyViT` hyperparameters: MobileSAM's image encoder (`modeling.tiny_vit`; official
    `mobile_sam/modeling/tiny_vit_sam.py`). Its output width is `SamConfig.prompt_embed_dim`.

    Stage 0 is convolutional (MBConv blocks), stages 1.. windowed attention; each stage but the
    last ends in a patch merging to the next stage's width with stride `merge_strides[i]`. The
    official code takes stride 1 where the next width is 320, 448 or 576 (the last merging of
    its models), 2 elsewhere; here the strides are data."""

    img_size: int = 1024
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 (convolutional) has none; its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # stage 0's is unused
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    # Outputs of the ImageNet classifier of TinyViT's pretraining: in MobileSAM's checkpoints,
    # never used by SAM; kept so that checkpoints round-trip (0: no `head`).
    num_classes: int = 1000
    # Training only: stochastic depth on every block's residual branches, the rate rising
    # linearly from 0 (first block) to `drop_path_rate` (last block), as officially.
    drop_path_rate: float = 0.0
    # Rematerialize each block (`nn.remat`): same params, same outputs.
    remat: bool = False

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        lengths = {"depths": self.depths, "num_heads": self.num_heads, "window_sizes": self.window_sizes}
        wrong = [f"{k} has {len(v)}" for k, v in lengths.items() if len(v) != n]
        if len(self.merge_strides) != n - 1:
            wrong.append(f"merge_strides has {len(self.merge_strides)} (one per stage but the last)")
        if n < 2 or wrong:
            raise ValueError(f"TinyViTConfig: {n} stages in embed_dims (at least 2), but {', '.join(wrong)}")
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if heads < 1 or dim % heads:
                raise ValueError(f"TinyViTConfig: width {dim} is not divisible into {heads} heads")
        if self.img_size % self.stride:
            raise ValueError(
                f"TinyViTConfig: img_size {self.img_size} is not a multiple of the total stride {self.stride}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell: 4 (the stem) times the merging strides (16 for vit_t)."""
        return 4 * int(np.prod(self.merge_strides))

    @property
    def grid_size(self) -> int:
        """Side of the embedding grid (64 for vit_t)."""
        return self.img_size // self.stride

    @property
    def depth(self) -> int:
        """Blocks in all stages."""
        return sum(self.depths)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """The per-block drop path rates, all stages in order: linspace(0, drop_path_rate, depth)."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depth))

    @property
    def high_res_channels(self) -> int:
        """TinyViT gives the mask decoder no high-res features (`ImageEncoderConfig.high_res_channels`)."""
        return 0

    @property
    def interm_dim(self) -> int:
        """Width of Light HQ-SAM's early features (`ImageEmbeddings.interm`): the output of stage 1
        (`layers_1`, after its patch merging), `embed_dims[2]` wide (160 for vit_tiny_hq)."""
        return self.embed_dims[min(2, len(self.embed_dims) - 1)]

    @property
    def interm_on_grid(self) -> bool:
        """Whether stage 1's output lies on the embedding grid (no stride-2 merging after it), as Light
        HQ-SAM's fusion of the two needs."""
        return int(np.prod(self.merge_strides[2:])) == 1


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """SAM 2's image encoder (`modeling.hiera`): the Hiera trunk and the FPN neck of the official
    `sam2.modeling.backbones` (`hieradet.Hiera`, `image_encoder.FpnNeck`, `ImageEncoder`), with
    SAM 2.1's hyperparameters from `sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml` (the
    presets `hiera_tiny()` .. `hiera_large()`). The defaults are `Hiera`'s and `FpnNeck`'s own.

    The trunk: a 7x7 stride-4 patch embedding, then `stages` of `MultiScaleBlock`s; the first
    block of each of the first `q_pool` later stages max-pools its queries (stride `q_stride`),
    halving the grid, and widens the stream by `dim_mul` and the heads by `head_mul`. Blocks attend
    within windows of `window_spec[stage]` (the first block of a stage still uses the previous
    stage's window), except the `global_att_blocks` (indices over all blocks), which attend over
    the whole grid. The neck projects each stage's output to `d_model` (1x1 convolutions), adds
    top-down features (`fpn_interp_model` upsampling x2) on `fpn_top_down_levels`, and drops the
    `scalp` lowest-resolution levels. Of the three levels left, the lowest-resolution one is the
    image embedding (`grid_size`), the two others the mask decoder's high-res features."""

    img_size: int = 1024
    # Trunk (`hieradet.Hiera`).
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (2, 3, 16, 3)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    global_att_blocks: tuple[int, ...] = (12, 16, 20)
    mlp_ratio: float = 4.0  # `MultiScaleBlock`'s default (Hiera does not pass one)
    # Neck (`FpnNeck`, 1x1 lateral convolutions, "sum" fusion) and `ImageEncoder.scalp`.
    d_model: int = 256
    backbone_channel_list: tuple[int, ...] = (768, 384, 192, 96)  # the trunk's widths, lowest resolution first
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"  # or "bilinear"
    scalp: int = 1
    # Training only: stochastic depth on both residual branches of every block, the rate rising
    # linearly from 0 (first block) to `drop_path_rate` (last block), as officially.
    drop_path_rate: float = 0.0
    # Rematerialize each block (`nn.remat`): same params, same outputs.
    remat: bool = False

    def __post_init__(self) -> None:
        n = len(self.stages)

        def fail(why: str) -> None:
            raise ValueError(f"HieraConfig: {why}")

        if n < 1 or min(self.stages) < 1:
            fail(f"stages {self.stages!r} must be at least one stage of at least one block")
        if len(self.window_spec) != n:
            fail(f"window_spec has {len(self.window_spec)} entries for {n} stages")
        if not 0 <= self.q_pool <= n - 1:
            fail(f"q_pool {self.q_pool} must be in [0, {n - 1}] (the stage transitions)")
        if len(self.q_stride) != 2 or self.q_stride[0] != self.q_stride[1] or self.q_stride[0] < 1:
            fail(f"q_stride {self.q_stride!r} must be a square stride (s, s)")
        if any(not 0 <= i < self.depth for i in self.global_att_blocks):
            fail(f"global_att_blocks {self.global_att_blocks!r} must index the {self.depth} blocks")
        for i, (dim, dim_out, heads, _, pool) in enumerate(self.block_specs):
            if heads < 1 or dim_out % heads:
                fail(f"block {i}: width {dim_out} is not divisible into {heads} heads")
            if pool and dim == dim_out:
                fail(f"block {i} pools its queries but keeps width {dim} (dim_mul 1): the official block needs both")
        if tuple(self.backbone_channel_list) != self.channel_list:
            fail(
                f"backbone_channel_list {self.backbone_channel_list!r} must be the trunk's stage widths, lowest "
                f"resolution first: {self.channel_list!r}"
            )
        if self.fpn_interp_model not in ("nearest", "bilinear"):
            fail(f"fpn_interp_model must be 'nearest' or 'bilinear', got {self.fpn_interp_model!r}")
        if n - self.scalp != 3:
            fail(
                f"{n} stages less scalp {self.scalp} must leave 3 feature levels (SAM 2's image embedding and "
                "its two high-res features)"
            )
        if self.img_size % (4 * self.q_stride[0] ** self.q_pool):
            fail(f"img_size {self.img_size} must be a multiple of 4 * q_stride ** q_pool")
        sizes = self.level_sizes
        for i, (_, _, _, window, pool) in enumerate(self.block_specs):
            if not pool:
                continue
            h = sizes[self.q_pool_blocks.index(i)]  # the grid the block takes (its stage's previous level)
            if window == 0 or window // pool == 0:
                fail(f"block {i} pools its queries with global attention or windows under {pool} (official: fails)")
            if -(-h // window) != -(-(h // pool) // (window // pool)):
                fail(
                    f"block {i} pools its queries in windows of {window} on a {h} grid: the {-(-h // window)} windows "
                    f"per side do not tile the pooled {h // pool} grid in windows of {window // pool} (official: fails)"
                )
        if (self.img_size // 4) % self.window_spec[0]:
            fail(f"the first grid ({self.img_size // 4}) must be a multiple of window_spec[0] (tiled pos embed)")
        for i in self.fpn_top_down_levels:
            if i + 1 < n and sizes[i] != 2 * sizes[i + 1]:
                fail(f"fpn_top_down_levels: level {i} ({sizes[i]}) is not twice level {i + 1} ({sizes[i + 1]})")
        if sizes[0] != 4 * sizes[2] or sizes[1] != 2 * sizes[2]:
            fail(f"the 3 kept levels must be at 4x, 2x and 1x the embedding's grid, got sizes {sizes[:3]}")
        if self.d_model % 8:
            fail(f"d_model {self.d_model} must be divisible by 8 (conv_s0 projects to d_model / 8)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")

    @property
    def depth(self) -> int:
        """Blocks in all stages."""
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """The index of each stage's last block (the blocks whose outputs the neck takes)."""
        return tuple(int(e) - 1 for e in np.cumsum(self.stages))

    @property
    def q_pool_blocks(self) -> tuple[int, ...]:
        """The blocks that pool their queries: the first block of each of stages 1..q_pool."""
        return tuple(e + 1 for e in self.stage_ends[:-1])[: self.q_pool]

    @property
    def block_specs(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """Per block, as `Hiera.__init__` builds them: (dim, dim_out, num_heads, window_size
        (0: global attention), q_stride (0: no pooling))."""
        specs, dim, heads, stage = [], self.embed_dim, self.num_heads, 1
        ends = self.stage_ends
        for i in range(self.depth):
            dim_out = dim
            window = 0 if i in self.global_att_blocks else self.window_spec[stage - 1]  # lags a block
            if i - 1 in ends:
                dim_out = int(dim * self.dim_mul)
                heads = int(heads * self.head_mul)
                stage += 1
            specs.append((dim, dim_out, heads, window, self.q_stride[0] if i in self.q_pool_blocks else 0))
            dim = dim_out
        return tuple(specs)

    @property
    def channel_list(self) -> tuple[int, ...]:
        """The trunk's stage widths, lowest resolution first (`Hiera.channel_list`)."""
        specs = self.block_specs
        return tuple(specs[e][1] for e in self.stage_ends[::-1])

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """The grid side of each stage's output (= FPN level), highest resolution first."""
        size, sizes = self.img_size // 4, []
        for i in range(len(self.stages)):
            if i in range(1, self.q_pool + 1):
                size //= self.q_stride[0]
            sizes.append(size)
        return tuple(sizes)

    @property
    def grid_size(self) -> int:
        """Side of the image embedding's grid, the lowest-resolution level kept (64 for 1024 px)."""
        return self.level_sizes[len(self.stages) - 1 - self.scalp]

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """The per-block drop path rates: linspace(0, drop_path_rate, depth)."""
        return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depth))

    @property
    def high_res_channels(self) -> int:
        """SAM 2 gives the mask decoder high-res features (`ImageEmbeddings.high_res`): the two
        higher FPN levels, `d_model` wide, which `conv_s1` / `conv_s0` project."""
        return self.d_model


def _hiera(
    embed_dim: int, heads: int, stages: tuple[int, ...], global_att_blocks: tuple[int, ...], **kw
) -> HieraConfig:
    widths = [embed_dim * 2**i for i in range(len(stages))]
    return HieraConfig(
        embed_dim=embed_dim,
        num_heads=heads,
        stages=stages,
        global_att_blocks=global_att_blocks,
        backbone_channel_list=tuple(widths[::-1]),
        **kw,
    )


def hiera_tiny() -> HieraConfig:
    """SAM 2.1 Hiera-T (`configs/sam2.1/sam2.1_hiera_t.yaml`)."""
    return _hiera(96, 1, (1, 2, 7, 2), (5, 7, 9), window_pos_embed_bkg_spatial_size=(7, 7))


def hiera_small() -> HieraConfig:
    """SAM 2.1 Hiera-S (`configs/sam2.1/sam2.1_hiera_s.yaml`)."""
    return _hiera(96, 1, (1, 2, 11, 2), (7, 10, 13), window_pos_embed_bkg_spatial_size=(7, 7))


def hiera_base_plus() -> HieraConfig:
    """SAM 2.1 Hiera-B+ (`configs/sam2.1/sam2.1_hiera_b+.yaml`: Hiera's default stages, windows and
    global blocks, a 14 x 14 background pos embed)."""
    return _hiera(112, 2, (2, 3, 16, 3), (12, 16, 20))


def hiera_large() -> HieraConfig:
    """SAM 2.1 Hiera-L (`configs/sam2.1/sam2.1_hiera_l.yaml`)."""
    return _hiera(
        144, 2, (2, 6, 36, 4), (23, 33, 43), window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)
    )


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
    mask_in_chans: int = 16
    # Std of the random spatial frequencies at init (`PositionEmbeddingRandom(scale=...)`;
    # the official models use 1.0). A loaded checkpoint brings its own frozen matrix.
    pe_scale: float = 1.0
    # Width of the CLIP embeddings taken as text prompts (the CLIP model's `projection_dim`:
    # 768 for ViT-L/14@336, 512 for ViT-B/32); None: no text path (the official models).
    text_embed_dim: int | None = None
    # SAM 2 (`SAM2ImagePredictor`): a box reaches the encoder as two points (labels 2 and 3, first in
    # the row), so a row with any point or box corner carries the padding point (label -1, the "not a
    # point" token); SAM's encoder pads only a row of points without a box. False: the official SAM.
    box_corners_as_points: bool = False

    def __post_init__(self) -> None:
        if self.text_embed_dim is not None and self.text_embed_dim < 1:
            raise ValueError(f"text_embed_dim must be a positive width or None, got {self.text_embed_dim!r}")


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    # Click maps (not in the official SAM): Gaussians of these widths (std, in model-input
    # pixels) around the row's positive points and around its negative points and an
    # inside-the-box map, at the mask logits' resolution (`prompt_encoder.click_maps`). Each mask
    # token also gives, through a zero-initialised linear layer, one weight per map, and its
    # logits gain their weighted sum: a learned radial profile around the clicks, which the
    # 4-channel upscaled features of a small decoder cannot draw (docs/demo-recipe.md). ():
    # none, the official SAM.
    click_map_sigmas: tuple[float, ...] = ()
    # HQ-SAM (Ke et al. 2023, `segment_anything_hq`'s `MaskDecoderHQ`): an HQ output token after the
    # mask tokens, whose mask is drawn from the upscaled features refined by two convolutions plus
    # the fusion of the embedding and the encoder's early features (the encoder then returns
    # `ImageEmbeddings.interm`, `interm_dim` wide: the ViT's first global-attention block's output,
    # TinyViT's stage-1 output). The decoder returns one mask: the SAM mask (mask 0, or
    # the best of masks 1.. by predicted IoU with multimask output) plus the HQ mask, or the HQ mask
    # alone (`hq_token_only`). False: the official SAM.
    hq_token: bool = False
    # SAM 2 (`sam2/modeling/sam/mask_decoder.py`), each False (SAM's decoder) by default:
    # an object-score token first in the token list (before the IoU token), whose output gives each
    # row's object score logit through `pred_obj_score_head`, a linear layer or, with
    # `pred_obj_scores_mlp`, a 3-layer ReLU MLP (without the token the logit is 10: always an object);
    pred_obj_scores: bool = False
    pred_obj_scores_mlp: bool = False
    # a sigmoid on the IoU head's outputs (predicted IoUs in [0, 1]);
    iou_prediction_use_sigmoid: bool = False
    # with multimask_output=False at inference, mask 0 is replaced by the best of masks 1.. (highest
    # predicted IoU) when it is unstable: the IoU of its pixels with logits > delta and > -delta below thresh.
    dynamic_multimask_via_stability: bool = False
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98

    def __post_init__(self) -> None:
        if self.pred_obj_scores_mlp and not self.pred_obj_scores:
            raise ValueError("pred_obj_scores_mlp needs the object-score token (pred_obj_scores=True)")
        if self.hq_token and (self.pred_obj_scores or self.dynamic_multimask_via_stability):
            raise ValueError("the HQ-SAM decoder (hq_token) takes none of SAM 2's decoder options")
        if any(not s > 0 for s in self.click_map_sigmas):
            raise ValueError(f"click_map_sigmas must be positive widths in pixels, got {self.click_map_sigmas!r}")
        if self.hq_token and self.click_map_sigmas:
            raise ValueError("a decoder with the HQ token (hq_token=True) takes no click maps (click_map_sigmas)")

    @property
    def num_click_maps(self) -> int:
        """Channels of `prompt_encoder.click_maps`: 2 per width and the box (0: none)."""
        return 2 * len(self.click_map_sigmas) + 1 if self.click_map_sigmas else 0


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """The whole model. `dtype` is the compute dtype (params stay float32)."""

    name: str = "vit_b"
    # The ViT of SAM, MobileSAM's TinyViT, or SAM 2's Hiera (with its FPN neck).
    image_encoder: ImageEncoderConfig | TinyViTConfig | HieraConfig = ImageEncoderConfig()
    prompt_encoder: PromptEncoderConfig = PromptEncoderConfig()
    mask_decoder: MaskDecoderConfig = MaskDecoderConfig()
    prompt_embed_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    dtype: str = "float32"
    # SAM 2's video-only tensors (memory attention, memory encoder, object pointers, ...: the
    # `modeling.sam2_video` list), kept unused as params so that a converted SAM 2.1 checkpoint
    # exports whole. False: none (SAM).
    video_tensors: bool = False

    def __post_init__(self) -> None:
        enc = self.image_encoder
        if self.mask_decoder.hq_token and not isinstance(enc, (ImageEncoderConfig, TinyViTConfig)):
            raise ValueError(f"{self.name}: the HQ-SAM decoder (hq_token) takes a ViT's or a TinyViT's early features")
        if self.mask_decoder.hq_token and isinstance(enc, TinyViTConfig) and not enc.interm_on_grid:
            raise ValueError(
                f"{self.name}: the HQ-SAM decoder (hq_token) fuses TinyViT's stage-1 output with the embedding, "
                f"but merge_strides {enc.merge_strides} downsample after stage 1"
            )
        if isinstance(enc, HieraConfig) and enc.d_model != self.prompt_embed_dim:
            raise ValueError(
                f"{self.name}: the Hiera encoder's neck width (image_encoder.d_model {enc.d_model}) must be the "
                f"decoder's (prompt_embed_dim {self.prompt_embed_dim})"
            )

    @property
    def image_size(self) -> int:
        """Side of the square, padded model input (1024 for the official models)."""
        return self.image_encoder.img_size

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_encoder.grid_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits and of a mask prompt (256 officially)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamConfig:
        d = dict(d)
        enc = dict(d.pop("image_encoder"))
        if "stages" in enc:  # SAM 2's Hiera
            tuples = {f.name for f in dataclasses.fields(HieraConfig) if "tuple" in str(f.type)}
            image_encoder = HieraConfig(**{k: tuple(v) if k in tuples else v for k, v in enc.items()})
        elif "embed_dims" in enc:  # a TinyViT (MobileSAM)
            tuples = ("embed_dims", "depths", "num_heads", "window_sizes", "merge_strides")
            image_encoder = TinyViTConfig(**{k: tuple(v) if k in tuples else v for k, v in enc.items()})
        else:
            enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
            if "conv_stem" in enc:
                enc["conv_stem"] = tuple(enc["conv_stem"])
            image_encoder = ImageEncoderConfig(**enc)
        dec = dict(d.pop("mask_decoder"))
        if "click_map_sigmas" in dec:
            dec["click_map_sigmas"] = tuple(dec["click_map_sigmas"])
        return cls(
            image_encoder=image_encoder,
            prompt_encoder=PromptEncoderConfig(**d.pop("prompt_encoder")),
            mask_decoder=MaskDecoderConfig(**dec),
            pixel_mean=tuple(d.pop("pixel_mean")),
            pixel_std=tuple(d.pop("pixel_std")),
            **d,
        )


def vit_b() -> SamConfig:
    return SamConfig(name="vit_b")


def vit_l() -> SamConfig:
    return SamConfig(
        name="vit_l",
        image_encoder=ImageEncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    )


def vit_h() -> SamConfig:
    return SamConfig(
        name="vit_h",
        image_encoder=ImageEncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    )


def vit_t() -> SamConfig:
    """MobileSAM: the TinyViT-5M image encoder with SAM's prompt encoder and mask decoder."""
    return SamConfig(name="vit_t", image_encoder=TinyViTConfig())


def _hq(config: SamConfig) -> SamConfig:
    """HQ-SAM on `config`'s encoder: its mask decoder with the HQ token (`MaskDecoderConfig.hq_token`)."""
    return dataclasses.replace(
        config, name=f"{config.name}_hq", mask_decoder=dataclasses.replace(config.mask_decoder, hq_token=True)
    )


def vit_b_hq() -> SamConfig:
    """HQ-SAM ViT-B (`segment_anything_hq`'s vit_b; its `sam_hq_vit_b.pth`)."""
    return _hq(vit_b())


def vit_l_hq() -> SamConfig:
    return _hq(vit_l())


def vit_h_hq() -> SamConfig:
    return _hq(vit_h())


def vit_tiny_hq() -> SamConfig:
    """Light HQ-SAM (`segment_anything_hq`'s vit_tiny, its `sam_hq_vit_tiny.pth`): MobileSAM's TinyViT
    with the HQ decoder, which fuses TinyViT's stage-1 output (160 wide)."""
    return dataclasses.replace(_hq(vit_t()), name="vit_tiny_hq")


def _sam2(name: str, image_encoder: HieraConfig) -> SamConfig:
    """SAM 2.1 for images on a Hiera encoder: SAM's prompt encoder and mask decoder with SAM 2's options
    as `build_sam2` sets them (object-score token with its MLP head, sigmoid IoU head, dynamic multimask
    via stability, boxes given as points), and the video-only tensors carried along."""
    return SamConfig(
        name=name,
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoderConfig(box_corners_as_points=True),
        mask_decoder=MaskDecoderConfig(
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            iou_prediction_use_sigmoid=True,
            dynamic_multimask_via_stability=True,
        ),
        video_tensors=True,
    )


def sam2_1_hiera_tiny() -> SamConfig:
    """SAM 2.1 Hiera-T (`sam2.1_hiera_tiny.pt`, `configs/sam2.1/sam2.1_hiera_t.yaml`)."""
    return _sam2("sam2.1_hiera_tiny", hiera_tiny())


def sam2_1_hiera_small() -> SamConfig:
    """SAM 2.1 Hiera-S (`sam2.1_hiera_small.pt`)."""
    return _sam2("sam2.1_hiera_small", hiera_small())


def sam2_1_hiera_base_plus() -> SamConfig:
    """SAM 2.1 Hiera-B+ (`sam2.1_hiera_base_plus.pt`)."""
    return _sam2("sam2.1_hiera_base_plus", hiera_base_plus())


def sam2_1_hiera_large() -> SamConfig:
    """SAM 2.1 Hiera-L (`sam2.1_hiera_large.pt`)."""
    return _sam2("sam2.1_hiera_large", hiera_large())


def tiny() -> SamConfig:
    """A small SAM for tests: 256 px input, 16x16 grid, windows of 6 (padded to 18)."""
    return SamConfig(
        name="tiny",
        image_encoder=ImageEncoderConfig(
            img_size=256,
            embed_dim=64,
            depth=4,
            num_heads=4,
            window_size=6,
            global_attn_indexes=(1, 3),
        ),
        prompt_encoder=PromptEncoderConfig(mask_in_chans=16),
        mask_decoder=MaskDecoderConfig(
            iou_head_hidden_dim=32,
            transformer_mlp_dim=64,
            transformer_num_heads=4,
        ),
        prompt_embed_dim=32,
    )


def with_overrides(config: SamConfig, overrides: Mapping[str, Any]) -> SamConfig:
    """`config` with nested fields replaced: {"name": ..., "image_encoder": {"patch_size": 8}, ...}.

    How a training recipe defines its model variant (a registry name plus overrides). Lists become
    tuples; an unknown field raises ValueError naming it."""
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"model override {key!r}: {type(config).__name__} has no such field")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"model override {key!r} must be a mapping of its fields, got {value!r}")
            value = with_overrides(current, value)
        elif isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


CONFIGS = {
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "vit_t": vit_t,
    "vit_b_hq": vit_b_hq,
    "vit_l_hq": vit_l_hq,
    "vit_h_hq": vit_h_hq,
    "vit_tiny_hq": vit_tiny_hq,
    "sam2.1_hiera_tiny": sam2_1_hiera_tiny,
    "sam2.1_hiera_small": sam2_1_hiera_small,
    "sam2.1_hiera_base_plus": sam2_1_hiera_base_plus,
    "sam2.1_hiera_large": sam2_1_hiera_large,
    "tiny": tiny,
}


def get_config(name: str) -> SamConfig:
    try:
        return CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; expected one of {sorted(CONFIGS)}") from None
