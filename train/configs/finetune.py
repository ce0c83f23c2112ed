"""Fine-tuning a released SAM on one's own annotations (`sam-jax finetune`, `train.finetune`):

    sam-jax finetune --checkpoint sam_vit_b.pth --train instances.json --workdir ft [--mode decoder|lora|full]

The model (and its initial params) come from the checkpoint; `finetune` fills in `model`,
`model_overrides`, `init` and the data paths, then applies the mode's settings (`mode`). Every
other value is the paper's recipe (base.py) scaled to a fine-tune: a small learning rate, a short
warmup, no step decays.
"""

from __future__ import annotations

import ml_collections

from sam_jax.train.configs import base
from sam_jax.train.lora import DEFAULT_TARGETS


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    # decoder: the image encoder frozen, each training image encoded once and its embeddings cached
    # under the work directory; prompt encoder and mask decoder train on the cached embeddings.
    # lora: low-rank adapters on the frozen encoder (`lora` below) plus the prompt encoder and decoder.
    # full: every parameter trains (drop path and layer decay as the paper's, remat and dtype options).
    # An HQ-SAM checkpoint trains its HQ layers alone in decoder and full mode, SAM frozen (lora is refused);
    # `model` may name a SAM checkpoint's HQ variant (model=vit_b_hq on vit_b): HQ-SAM with new HQ layers.
    c.mode = "decoder"
    c.steps = 1000
    c.batch_size = 4  # images per step; each brings up to data.masks_per_image masks
    c.data.masks_per_image = 32  # the paper's 64 per GPU needs more memory than a fine-tune usually has
    c.data.include_crowd = False  # COCO crowd annotations (iscrowd 1) are left out of the targets
    # The held-out set without --val: a fixed-seed split of TRAIN, this fraction of its images (at
    # least 1, at most eval_images); the rest trains.
    c.val_fraction = 0.1
    c.val_seed = 0
    # Full mode only: -1 takes the paper's value for the checkpoint's model (drop path 0.6 for
    # ViT-B, 0.4 for ViT-L/H; layer decay 0.6 for ViT-B, 0.8 for ViT-L/H). The other modes do not
    # train the encoder's blocks: no drop path, no layer decay.
    c.drop_path_rate = -1.0
    c.optim.layer_decay = -1.0
    c.optim.lr = 1e-4  # an eighth of the paper's pretraining rate: the weights start trained
    c.optim.warmup_steps = -1  # -1: 5% of the steps
    c.optim.decay_steps = ()
    c.optim.weight_decay = 0.01
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 8.0  # the delta is scaled by alpha / rank
    c.lora.targets = DEFAULT_TARGETS  # glob patterns over module paths ("image_encoder/*blocks_*/attn/qkv")
    c.eval_every = 250  # held-out scores every this many steps (also before training and at the end)
    c.eval_images = 50
    c.checkpoint.every = 250
    c.log_every = 10
    return c
