"""SAM 2.1's image predictor, ours against the official one, in one process (float32, random weights):
`set_image` then `predict` (one click, multimask) on one photo, the median of warm runs.

    python -m bench.sam2_predict [--model sam2.1_hiera_tiny] [--runs 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _median_seconds(fn, runs: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    from skimage import data

    from bench.official import randomize_, state_dict_numpy
    from bench.official_sam2 import SAM2ImagePredictor as Official
    from bench.official_sam2 import build_official_sam2
    from sam_jax.config import get_config
    from sam_jax.convert.state_dict import to_flax
    from sam_jax.model import SamModel
    from sam_jax.sam2_predictor import SAM2ImagePredictor

    photo = data.chelsea()  # 451 x 300
    h, w = photo.shape[:2]
    click = dict(point_coords=np.array([[0.4 * w, 0.5 * h]]), point_labels=np.array([1]))
    ref = randomize_(build_official_sam2(args.model), seed=0)
    config = get_config(args.model)
    ours = SAM2ImagePredictor(SamModel(config, to_flax(state_dict_numpy(ref), config)))
    official = Official(ref)

    def run_ours():
        ours.set_image(photo)
        ours.predict(**click)

    def run_official():
        with torch.inference_mode():
            official.set_image(photo)
            official.predict(**click)

    result = {"sam_jax_s": _median_seconds(run_ours, args.runs), "official_s": _median_seconds(run_official, args.runs)}
    print(f"{args.model} set_image + predict, {w}x{h} photo, float32: {result}")
    return result


if __name__ == "__main__":
    main()
