"""The training input pipeline on one CPU core: SA-1B-like records to training examples.

    python -m bench.input_pipeline                        # vit_b, 64 masks, a 2250x1500 record with 100 masks
    python -m bench.input_pipeline --images-per-s 10 40   # + grain workers per chip at those step rates

Writes one synthetic SA-1B record to a temporary folder: a 2250x1500 JPEG (quality 90) and 100
compressed-RLE masks of blob-shaped polygons (star-shaped, smoothly wobbling radius, some of two
parts), radii log-uniform from 8 px to 45% of the short side, so most masks are small and a few
cover a large part of the image. Then times, in this process pinned to one core, the record read
and `prepare_example` (`--config`, `--masks-per-image`, masks over 90% left out) two ways:

- `rle`: what training runs: the source's record (`load_record(decode_masks=False)`: the image
  decoded, the masks as `RleMasks`), then `prepare_example`, which decodes only the chosen masks
  at the pixels the resize samples;
- `full`: every mask decoded at full size by pycocotools into a C-ordered (M, H, W) bool array,
  then `prepare_example` on that array.

Both give the same examples (checked here, bit for bit). Each path runs `--repeats` times after
one warm-up; medians are reported, with the split: JPEG decode, JSON + RLE parse, RLE decode
(`full` only), image resize + normalise (`model_input`), and masks (areas, choice, resize, low-res
grid: the rest of `prepare_example`). Workers per chip: a chip that trains `images_per_s` images
a second needs that many records a second, so ceil(images_per_s / records_per_s_per_core)
grain workers (one core each) on its host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE = (1500, 2250)  # (H, W): an SA-1B image
NUM_MASKS = 100  # about SA-1B's average per image


def blob(rng: np.random.Generator, h: int, w: int) -> list[float]:
    """A star-shaped polygon [x0, y0, x1, y1, ...] inside an (h, w) image: an ellipse whose radius
    wobbles with a few smooth harmonics, radius log-uniform in [8, 0.45 * min(h, w)] pixels."""
    r = float(np.exp(rng.uniform(np.log(8), np.log(0.45 * min(h, w)))))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    n = int(rng.integers(12, 80))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    k = np.arange(1, 5)
    wobble = (rng.normal(0, 0.15, 4) / k)[None] * np.sin(k[None] * t[:, None] + rng.uniform(0, 2 * np.pi, 4)[None])
    radius = r * (1 + wobble.sum(1) + rng.normal(0, 0.03, n))
    x, y = radius * np.cos(t), radius * rng.uniform(0.4, 1.0) * np.sin(t)
    angle = rng.uniform(0, np.pi)
    xs = np.clip(cx + x * np.cos(angle) - y * np.sin(angle), 0, w)
    ys = np.clip(cy + x * np.sin(angle) + y * np.cos(angle), 0, h)
    return np.stack([xs, ys], 1).reshape(-1).tolist()


def write_record(
    folder: str | Path, size: tuple[int, int] = SIZE, num_masks: int = NUM_MASKS, seed: int = 0
) -> tuple[Path, Path]:
    """Write an SA-1B-like record `folder/sa_1.jpg` + `folder/sa_1.json` (see the module's
    docstring); -> (image path, JSON path)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255.0 / w, yy * 255.0 / h, np.full((h, w), 128.0)], -1)
    anns = []
    for i in range(num_masks):
        parts = [blob(rng, h, w) for _ in range(1 + int(rng.uniform() < 0.2))]
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
        anns.append(
            {
                "id": i,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
        )
        if i < 40:  # paint some of the shapes, so the JPEG has edges to code
            inside = mask_utils.decode(rle).astype(bool)
            image[inside] = 0.5 * image[inside] + 0.5 * rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_path, json_path = folder / "sa_1.jpg", folder / "sa_1.json"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(image_path, quality=90)
    info = {"image_id": 1, "file_name": image_path.name, "height": h, "width": w}
    json_path.write_text(json.dumps({"image": info, "annotations": anns}))
    return image_path, json_path


def full_decode(json_path: Path, h: int, w: int) -> np.ndarray:
    """Every mask of the record decoded by pycocotools: (M, H, W) bool, C order."""
    from pycocotools import mask as mask_utils

    rles = [a["segmentation"] for a in json.loads(json_path.read_text())["annotations"]]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).view(bool)


def time_paths(image_path: Path, json_path: Path, config_name: str, masks_per_image: int, repeats: int) -> dict:
    """-> {"rle": {...}, "full": {...}}: per path the median seconds of each part, "total_s" and
    "records_per_s"; the examples of both paths compared (`same_examples`)."""
    from sam_jax.config import get_config
    from sam_jax.files import read_image, read_json
    from sam_jax.train.data import model_input, prepare_example
    from sam_jax.train.sa1b import load_record

    config = get_config(config_name)
    kw = dict(masks_per_image=masks_per_image, max_mask_fraction=0.9)

    def timed(fn, *args, **kwargs) -> tuple[Any, float]:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.perf_counter() - t

    def run(path: str, seed: int) -> tuple[dict, dict]:
        parts: dict[str, float] = {}
        image, parts["jpeg_decode_s"] = timed(read_image, image_path)
        _, json_s = timed(read_json, json_path)
        record, load_s = timed(load_record, image_path, json_path, decode_masks=False)
        parts["json_rle_parse_s"] = max(load_s - parts["jpeg_decode_s"], json_s)
        total = load_s
        if path == "full":
            masks, parts["rle_decode_s"] = timed(full_decode, json_path, *image.shape[:2])
            record = {**record, "masks": masks}
            total += parts["rle_decode_s"]
        _, parts["resize_normalise_s"] = timed(model_input, record["image"], config)
        example, prepare_s = timed(prepare_example, record, config, **kw, rng=np.random.default_rng(seed))
        parts["masks_s"] = max(prepare_s - parts["resize_normalise_s"], 0.0)
        parts["total_s"] = total + prepare_s
        return parts, example

    out: dict[str, Any] = {}
    examples: dict[str, list] = {}
    for path in ("rle", "full"):
        run(path, 0)  # warm-up
        runs = [run(path, seed) for seed in range(repeats)]
        examples[path] = [ex for _, ex in runs]
        row = {k: float(np.median([p[k] for p, _ in runs])) for k in runs[0][0]}
        row["records_per_s"] = 1.0 / row["total_s"]
        out[path] = row
    out["same_examples"] = all(
        all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(examples["rle"], examples["full"])
    )
    return out


def workers_per_chip(images_per_s: float, records_per_s_per_core: float) -> int:
    """The grain workers (one core each) that feed a chip training `images_per_s` images a second."""
    return math.ceil(images_per_s / records_per_s_per_core)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="vit_b", help="model config (its image size and low-res mask size)")
    p.add_argument("--masks-per-image", type=int, default=64)
    p.add_argument("--num-masks", type=int, default=NUM_MASKS, help="masks in the synthetic record")
    p.add_argument("--size", default=f"{SIZE[1]}x{SIZE[0]}", help="WIDTHxHEIGHT of the synthetic record")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--images-per-s",
        type=float,
        nargs="+",
        default=[10.0, 40.0],
        help="a chip's training rates (images a second) to size the workers for (e.g. vit_h 10, vit_b 40 on an H100)",
    )
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        image_path, json_path = write_record(tmp, (h, w), args.num_masks)
        result = time_paths(image_path, json_path, args.config, args.masks_per_image, args.repeats)
        result["record"] = {
            "size": [h, w],
            "masks": args.num_masks,
            "jpeg_bytes": image_path.stat().st_size,
            "json_bytes": json_path.stat().st_size,
        }
    result["config"] = {"model": args.config, "masks_per_image": args.masks_per_image, "repeats": args.repeats}
    result["machine"] = {"processor": platform.processor() or platform.machine(), "numpy": np.__version__}
    result["workers_per_chip"] = {
        f"{rate:g}": {path: workers_per_chip(rate, result[path]["records_per_s"]) for path in ("rle", "full")}
        for rate in args.images_per_s
    }
    print(
        f"{w}x{h} JPEG ({result['record']['jpeg_bytes'] / 1e6:.2f} MB), {args.num_masks} RLE masks; "
        f"{args.config}, {args.masks_per_image} masks per example; one core, median of {args.repeats}"
    )
    keys = ["jpeg_decode_s", "json_rle_parse_s", "rle_decode_s", "resize_normalise_s", "masks_s", "total_s"]
    print(f"{'path':<6}" + "".join(f"{k[:-2]:>18}" for k in keys) + f"{'records/s':>11}")
    for path in ("rle", "full"):
        row = result[path]
        cells = "".join(f"{row[k] * 1e3:>16.1f}ms" if k in row else f"{'-':>18}" for k in keys)
        print(f"{path:<6}{cells}{row['records_per_s']:>11.2f}")
    print(f"same examples: {result['same_examples']}")
    for rate, n in result["workers_per_chip"].items():
        print(f"{rate} images/s per chip: {n['rle']} worker core(s) per chip ({n['full']} with every mask decoded)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    main()
