"""The `make demo` recipe: the `tiny_p8` model (8-px patches) on the synthetic shapes.

`shapes_tiny` with a finer grid and a schedule for 10 minutes on 2 CPU cores (`make demo`: ~9
minutes of training, ~9.5 in all; 531 s and 9 min 28 s wall on 2026-11-28):
- `tiny_p8`: 32x32 tokens, 128x128 mask logits, a decoder of 2 heads (1-click +0.016 to +0.025
  over three seeds, 2026-11-27), high-res features from a pixel stem (SAM 2's
  `use_high_res_features_in_sam`; at equal time, 1-click +0.007 to +0.054 over three seeds,
  2026-11-27). On
  the 16-px grid of `tiny`, shapes under ~150 px (a quarter of the held-out masks) stay near
  0.3 IoU; the best binary targets on its 64x64 logits reach only mIoU 0.80
  (`train.evaluate.grid_ceiling`), 0.89 on 128x128.
- click maps in the decoder (`tiny_p8`'s `click_map_sigmas`): Gaussians of 4 to 64 px around
  the clicks and the box's inside, weighed by each mask token into its logits. On seed 0,
  1-click 0.752 on the demo's 100 held-out images (0.753 over 400; 0.744 and 0.729 without),
  5 clicks 0.816 (0.720), box 0.779 (0.705); seed 1: 0.693 (0.695), box 0.767 (0.620). A step
  costs ~4% more where `make demo`'s glibc tunable lets a thread's heap keep the step's 68 MiB
  scratch block (~17% without: 662 s of training against 531 s, 2026-11-28;
  sam_jax/host_memory.py, docs/demo-recipe.md).
- focal:dice at 20:5 (the paper's 20:1 leaves every mask background for the first ~250
  steps of a run this short), one correction point and no point-free iteration.
  (`loss.points_per_iter` 2, up to 2 points in that iteration, over three seeds: 5 clicks
  +0.024, box +0.018, but 1 click -0.011, 2026-11-27; docs/demo-recipe.md.)
- focal alpha 0.75, foreground pixels weighted 3:1 against the background (0.25, the
  focal-loss paper's and SAM 2's, weights them 1:3): with 0.25 the model predicts no
  foreground for the first ~300 steps, the focal term driving every logit into the sigmoid's
  flat tail where dice has no gradient. 1-click +0.038 after 1200 steps, +0.008 / +0.014
  after 3400 (two seeds); box -0.004 / -0.018 (2026-11-27).
- A box trains the single output 0, the one a box gets at inference, as in SAM 2's training
  (`loss.box_single_output`; with the paper's rule the high-res model drew poor box masks).
- Batches of 2 images (x 4 masks), lr 2e-3: in a fixed time, what counts is how many examples
  the model sees, and a small batch sees them in more updates. A step costs ~0.12 s here in a
  run (0.103 s best; ~0.16 s before `make demo` and `sam-jax train` kept freed host memory),
  against 0.61 for 8 images. 4000 steps (8000 images) give held-out 1-click 0.744, box 0.705
  in 505 s (100 held-out images, 2026-11-27; 3000 steps: 0.729, box 0.666; 3000 steps with
  4 decoder heads: 0.717, box 0.654; without the high-res features and the box rule, 3400
  steps gave 0.663, and 0.649 with focal alpha 0.25; 950 steps of 8 images at lr 4e-3 gave
  0.672 on the 20 images where this batch gave 0.698).
- `make demo` runs it data parallel over the 2 cores as 2 CPU devices (the Makefile sets
  `--xla_force_host_platform_device_count=2`), one image per device.

Measured: README, "Measured: the demo recipe"; every run: docs/demo-recipe.md.
"""

from __future__ import annotations

from sam_jax.train.configs import shapes_tiny


def get_config():
    c = shapes_tiny.get_config()
    c.model = "tiny_p8"
    c.batch_size = 2  # x 4 masks (shapes_tiny): 8 prompt rows a step
    c.steps = 4000  # ~500 s of training in `make demo` (~0.12 s a step on 2 CPU devices)
    c.optim.lr = 2e-3
    c.optim.decay_steps = (3200, 3760)  # x0.1 at 80% and 94%
    c.loss.dice_weight = 5.0
    c.loss.focal_alpha = 0.75  # foreground pixels weighted 3:1 (base.py's 0.25: 1:3); see the docstring
    c.loss.box_single_output = True  # a box trains output 0, the one it gets at inference (SAM 2)
    c.loss.num_point_iters = 1
    c.loss.num_no_point_iters = 0
    c.data.cache_records = True  # 400 images: ~160 MB decoded; the 2 cores go to the step
    c.checkpoint.every = 1000  # a save costs the 2 cores a few steps' time
    c.log_every = 50
    return c
