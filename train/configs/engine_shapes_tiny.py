"""The data engine (`sam-jax engine --config train/configs/engine_shapes_tiny.py`) on the
synthetic shapes with the `tiny` model: the training recipe of shapes_tiny.py plus an
`engine` section. Three folders made with `sam-jax make-shapes`, for example:

    sam-jax make-shapes data/labeled --n 40 --seed 0
    sam-jax make-shapes data/unlabeled --n 200 --seed 1   # its JSONs only score the pseudo-labels
    sam-jax make-shapes data/eval --n 20 --seed 2
    sam-jax engine --config train/configs/engine_shapes_tiny.py --workdir work/engine \
        --config.engine.labeled_dir=data/labeled --config.engine.unlabeled_dir=data/unlabeled \
        --config.engine.eval_dir=data/eval

Each round trains `engine.steps_per_round` steps from the previous round's model with a
fresh optimizer, so the optimizer schedule below is per round.
"""

from __future__ import annotations

import ml_collections

from sam_jax.train.configs import shapes_tiny


def get_config():
    c = shapes_tiny.get_config()
    # The trainer's schedule restarts each round (fresh optimizer): warmup, then decays
    # late in the round. `steps` and `data.train_dir` are set by the engine per round.
    c.optim.warmup_steps = 20
    c.optim.decay_steps = (150, 180)  # of steps_per_round = 200

    e = c.engine = ml_collections.ConfigDict()
    e.rounds = 3
    e.labeled_dir = ""  # SA-1B layout (NAME.jpg + NAME.json): the human labels
    e.unlabeled_dir = ""  # images to pseudo-label; JSONs there are only used to score the pseudo-labels
    e.unlabeled_gt_dir = ""  # optional: ground truth of the unlabeled images (NAME.json), for scoring only
    e.eval_dir = ""  # held-out SA-1B-layout folder, never trained on
    e.steps_per_round = 200  # training steps per round, from the previous round's model
    e.labeled_oversample = 2  # copies of each labeled record in a round's training folder
    e.max_unlabeled_images = 0  # 0: the whole pool each round

    # Automatic mask generation (the paper's fully automatic stage: a 32x32 grid plus 2x2 and
    # 4x4 zoomed crops with 16x16 and 8x8 grids, i.e. points_per_side 32, crop_n_layers 2,
    # crop_n_points_downscale_factor 2; a 16x16 grid on the whole image suffices for 192x256 shapes).
    e.points_per_side = 16
    e.points_per_batch = 64
    e.pred_iou_thresh = 0.88  # the paper keeps predicted IoU >= 88.0
    e.stability_score_thresh = 0.95  # and stability >= 95.0 (masks thresholded at logits -1 and +1)
    e.stability_score_offset = 1.0
    e.box_nms_thresh = 0.7
    e.crop_n_layers = 0
    e.crop_nms_thresh = 0.7
    e.crop_n_points_downscale_factor = 1
    e.min_mask_region_area = 100  # holes and islands under 100 px removed
    # Area bounds on the kept masks, in pixels of the original image.
    e.min_area = 0
    e.max_area_fraction = 0.95  # masks covering 95% of the image or more are dropped

    # Held-out evaluation after each round (`sam_jax.train.evaluate`).
    e.eval_clicks = 3  # the table shows mIoU after click 1 and after the last click
    e.eval_max_images = 0  # 0: the whole folder
    return c
