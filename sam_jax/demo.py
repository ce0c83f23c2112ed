"""`make demo`: build a model, segment a photo with a point prompt, write the mask and an overlay.

    python -m sam_jax.demo [--checkpoint CKPT] [--model-type vit_b] [--image PATH] [--point X,Y] [--out DIR]

Without a checkpoint the model has random weights (no official weights can be
downloaded here), so the mask shows the pipeline working end to end, not a
meaningful segmentation; pass a converted or official checkpoint for real masks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from sam_jax import sam_model_registry
from sam_jax.checkpoint import load_model
from sam_jax.predictor import SamPredictor
from sam_jax.visualize import overlay


def load_image(path: str | None) -> np.ndarray:
    if path is None:
        from skimage import data

        return data.chelsea()  # a 300 x 451 photo shipped with scikit-image
    return np.asarray(Image.open(path).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="official .pth, .safetensors or sam-jax directory (variant inferred)")
    ap.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"], help="without a checkpoint")
    ap.add_argument("--image", default=None, help="an RGB image (default: scikit-image's cat photo)")
    ap.add_argument("--point", default=None, help="X,Y of a foreground point (default: the image centre)")
    ap.add_argument("--out", default="demo_out")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.checkpoint:  # any variant the checkpoint holds
        model = load_model(args.checkpoint)
    else:
        model = sam_model_registry[args.model_type]()
    weights = args.checkpoint or "random weights (no checkpoint given)"
    print(f"model {model.config.name}: {weights}; JAX {jax.__version__} on {jax.devices()[0].platform}")

    image = load_image(args.image)
    h, w = image.shape[:2]
    point = np.array([[float(v) for v in args.point.split(",")]] if args.point else [[w / 2, h / 2]], np.float32)
    labels = np.array([1], np.int32)

    predictor = SamPredictor(model)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=labels, multimask_output=True)
    best = int(np.argmax(scores))
    mask = masks[best]
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "mask.png")
    overlay(image, [mask], points=point, labels=labels).save(out / "overlay.png")
    summary = {
        "model": model.config.name,
        "checkpoint": args.checkpoint,
        "image_size": [h, w],
        "point": point.tolist(),
        "scores": scores.tolist(),
        "chosen_mask": best,
        "mask_area": int(mask.sum()),
        "seconds": round(elapsed, 2),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"scores {np.round(scores, 3).tolist()}; mask {best} covers {mask.mean():.1%} of the image")
    print(f"wrote {out / 'mask.png'}, {out / 'overlay.png'}, {out / 'result.json'} in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
