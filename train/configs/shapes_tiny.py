"""The small recipe of the tests, the data engine and the text demo: the `tiny` model (16-px
tokens) on the synthetic shapes. `make demo` trains `shapes_p8` (8-px tokens) instead.

A few minutes on 2 CPU cores. Everything not set here is the paper's recipe (base.py),
scaled down: fewer interactive iterations, a short schedule, no layer decay on 4 blocks.
"""

from __future__ import annotations

from sam_jax.train.configs import base


def get_config():
    c = base.get_config()
    c.model = "tiny"
    c.drop_path_rate = 0.0  # 4 blocks trained for minutes: nothing to regularize
    c.steps = 1200  # about 9 minutes on 2 CPU cores
    c.batch_size = 8
    c.data.masks_per_image = 4  # masks of an image decoded together (64 in the paper)
    c.data.train_dir = ""  # set by the caller (the demo generates the shapes)
    c.optim.lr = 2e-3  # a small model trained from scratch for a few hundred steps
    c.optim.warmup_steps = 20
    c.optim.decay_steps = (950, 1125)
    c.optim.weight_decay = 0.01
    c.optim.layer_decay = 1.0
    c.loss.num_point_iters = 2  # 8 in the paper
    c.loss.num_no_point_iters = 1
    c.loss.remat_decoder = False  # a small model's decoder passes fit in memory: no recomputation
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.log_every = 20
    return c
