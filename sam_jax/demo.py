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
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from sam_jax import sam_model_registry
from sam_jax.checkpoint import load_model
from sam_jax.prompts import make_prompts
from sam_jax.transforms import ResizeLongestSide, postprocess_masks, preprocess


def load_image(path: str | None) -> np.ndarray:
    if path is None:
        from skimage import data

        return data.chelsea()  # a 300 x 451 photo shipped with scikit-image
    return np.asarray(Image.open(path).convert("RGB"))


def overlay(image: np.ndarray, mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> Image.Image:
    """The image with the mask tinted blue and the prompt points drawn (green +, red -)."""
    out = image.astype(np.float32)
    color = np.array([30, 144, 255], np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * color
    img = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(3, round(max(image.shape[:2]) / 120))
    for (x, y), lab in zip(points, labels):
        fill = (0, 220, 0) if lab == 1 else (230, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    return img


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

    transform = ResizeLongestSide(model.image_size)
    resized = transform.apply_image(image)
    embeddings = model.encode(preprocess(jnp.asarray(resized)[None], model.config))
    prompts = make_prompts(
        batch_size=1,
        mask_size=model.config.low_res_mask_size,
        point_coords=transform.apply_coords(point, (h, w))[None],
        point_labels=labels[None],
    )
    low_res, iou = model.decode(embeddings, prompts, multimask_output=True)
    logits = postprocess_masks(low_res, resized.shape[:2], (h, w), model.image_size)
    best = int(jnp.argmax(iou[0]))
    mask = np.asarray(logits[0, best] > model.config.mask_threshold)
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "mask.png")
    overlay(image, mask, point, labels).save(out / "overlay.png")
    summary = {
        "model": model.config.name,
        "checkpoint": args.checkpoint,
        "image_size": [h, w],
        "point": point.tolist(),
        "scores": np.asarray(iou[0]).tolist(),
        "chosen_mask": best,
        "mask_area": int(mask.sum()),
        "seconds": round(elapsed, 2),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"scores {np.round(np.asarray(iou[0]), 3).tolist()}; mask {best} covers {mask.mean():.1%} of the image")
    print(f"wrote {out / 'mask.png'}, {out / 'overlay.png'}, {out / 'result.json'} in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
