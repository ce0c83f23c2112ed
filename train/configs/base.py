"""The SAM recipe (Kirillov et al. 2023, appendix A) as defaults; recipes override what they change."""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "vit_b"  # a sam_jax.config name
    # Fields of that model's SamConfig to change, nested ({"image_encoder": {"depth": 2}}): a recipe's own variant.
    c.model_overrides = ml_collections.ConfigDict()
    c.dtype = "float32"  # compute dtype; params stay float32 ("bfloat16" on accelerators)
    c.seed = 0
    c.steps = 180_000  # ViT-B/L: 180k iterations at batch 128 (ViT-H: 90k at 256)
    c.batch_size = 128  # images per step, over all devices
    c.drop_path_rate = 0.6  # stochastic depth in the ViT: 0.6 (B), 0.4 (L, H)
    c.remat = False  # recompute encoder blocks in the backward pass (less memory, ~1/3 more compute)
    c.init = (
        "scratch"  # "scratch" | "checkpoint:PATH" (any form load_model reads) | "encoder:PATH" (image encoder only)
    )

    c.data = ml_collections.ConfigDict()
    c.data.train_dir = ""  # SA-1B layout (NAME.jpg + NAME.json), a COCO instances .json, or images/ + masks/
    c.data.eval_dir = ""
    c.data.masks_per_image = 64  # the paper samples at most 64 masks per GPU
    c.data.max_mask_fraction = 0.9  # masks covering more than 90% of the image are dropped
    c.data.train_images = ""  # a COCO .json train_dir: its images' folder (default: the JSON's folder)
    c.data.cache_records = False  # keep decoded records in memory (small data sets: no decoding after epoch 1)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 8e-4  # ViT-B and ViT-H; ViT-L uses 4e-4
    c.optim.warmup_steps = 250
    c.optim.decay_steps = (120_000, 173_333)  # x0.1 at 2/3 and ~96% of training (60k and 86,666 of 90k for ViT-H)
    c.optim.decay_factor = 0.1
    c.optim.cosine_decay_end = 0  # > 0: instead of the step decays, a cosine decay to 0 at this step
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.1
    c.optim.layer_decay = 0.6  # layer-wise lr decay: 0.6 (B), 0.8 (L, H)
    c.optim.grad_clip = 1.0
    c.optim.freeze_image_encoder = False  # True: fine-tune the prompt encoder and decoder only
    c.optim.grad_accum_steps = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.focal_weight = 20.0  # focal : dice = 20 : 1
    c.loss.dice_weight = 1.0
    c.loss.iou_weight = 1.0
    # The focal loss's class weight (on foreground pixels; background gets 1 - alpha; < 0: none)
    # and focusing exponent, as in Lin et al. 2017 and SAM 2's training.
    c.loss.focal_alpha = 0.25
    c.loss.focal_gamma = 2.0
    # Side of the grid the mask losses are computed on: 0 = the decoder's low-res output (256
    # for 1024 px input); up to the input size, the logits upsampled bilinearly as at inference
    # (SAM 2's training computes its losses at the input size; costs memory at 1024 px).
    c.loss.mask_size = 0
    c.loss.num_point_iters = 8  # error-region points after the first prompt
    c.loss.num_no_point_iters = 2  # iterations with no new point (one random, one last)
    c.loss.points_per_iter = 1  # points a point iteration adds: 1 (the paper), or 1 to k drawn per row
    c.loss.box_prob = 0.5  # first prompt: a noisy box or a foreground point
    # The first decode's trained output for a box: False, the paper's (a box is one prompt, so
    # the best of the 3 multimask outputs); True, SAM 2's training (a box is 2 points, so the
    # single output 0, which the official predictor returns for a box).
    c.loss.box_single_output = False
    c.loss.text_prob = 0.5  # with text prompts on: the fraction of captioned masks whose first prompt is their text
    # Caption mode: weight of a dense loss on the encoder's output alone, each token's kind
    # among its image's captions (train.step.dense_text_loss). 0: none, the paper's losses only.
    c.loss.dense_text_weight = 0.0
    # Memory of the interactive loop (train.step.simulate_and_loss; same loss and gradients either
    # way; bench/train_scale.py measures them). remat_decoder: recompute each decoder pass in the
    # backward pass instead of storing its activations for all 11 iterations x 64 masks (vit_b,
    # float32, batch 1, encoder remat: compiled temp memory 151 -> 38 GB; one more decoder forward).
    c.loss.remat_decoder = True
    # mask_chunk: simulate at most this many masks of an image at a time (the largest divisor of
    # data.masks_per_image not above it; 0: all at once), so one decoder pass's backward holds one
    # chunk's activations (vit_b as above: 38 -> 16 GB with 8). Same FLOPs, smaller decoder batches.
    c.loss.mask_chunk = 8

    # Text prompts (paper, section 7.5; off by default; sam_jax/train/text.py). "image" (the
    # paper's): the CLIP image embedding of a crop around a large mask is its prompt. "caption":
    # an annotation's `category` becomes `template.format(category)`, whose CLIP text embedding
    # is the prompt, for the union of the image's masks of that category.
    c.text = ml_collections.ConfigDict()
    c.text.mode = ""  # "" (no text path), "image" or "caption"
    c.text.clip = ""  # a Hugging Face CLIP folder (config.json, model.safetensors, tokenizer.json)
    c.text.captions = ""  # comma-separated categories to prompt by text ("": every category of data.train_dir)
    c.text.template = "{}"  # category -> text, e.g. "a photo of a {}"
    c.text.min_mask_area = 100 * 100  # image mode: masks at least this large (pixels) are prompted by their crop

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every = 50
    c.eval_every = 0  # held-out evaluation every N steps (0: only at the end); needs data.eval_dir
    c.eval_images = 50  # at most this many held-out images per evaluation (0: all)
    c.on_nonfinite = "stop"  # "stop" with a clear message, or "skip" the update and go on
    # `sam-jax train` / `engine` on the CPU backend: keep freed memory in the process (glibc's
    # mallopt), so XLA:CPU's per-step scratch buffers are reused, not faulted in afresh
    # (sam_jax/host_memory.py; a step of the demo recipe: 0.103 s against 0.14 s).
    c.retain_host_memory = True
    return c
