"""The `sam-jax` command line: parse, call the library, print. Errors are one line and exit 1
(argument errors: one line and exit 2)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sam_jax.config import CONFIGS
from sam_jax.files import IMAGE_SUFFIXES, read_image, write_json


class CliError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sam-jax" / "jax-compilation-cache"


def enable_compilation_cache(directory: str | None) -> None:
    """JAX's persistent compilation cache, so a second run does not compile again."""
    if directory == "":
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(directory) if directory else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        # JAX opens a cache directory once, at the first compile that uses it: reopen it, so that
        # this directory takes effect in a process that used another (a notebook, a test run).
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid point {text!r}: expected X,Y or X,Y,LABEL (LABEL 1 or 0)") from None
    if label not in (0, 1) or not (np.isfinite(x) and np.isfinite(y)):
        raise argparse.ArgumentTypeError(
            f"invalid point {text!r}: finite X,Y and LABEL 1 (foreground) or 0 (background)"
        )
    return x, y, label


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
        if len(values) != 4:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid box {text!r}: expected X0,Y0,X1,Y1") from None
    return values  # type: ignore[return-value]


def collect_images(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise CliError(f"{p}: no such file or directory")
    return paths


def _load(args: argparse.Namespace):
    from sam_jax.checkpoint import load_model
    from sam_jax.host_memory import retain_on_cpu

    enable_compilation_cache(args.cache_dir)
    retain_on_cpu()  # a model is about to run: reuse XLA:CPU's scratch memory (host_memory.py)
    return load_model(args.checkpoint, dtype=args.dtype)


# ----------------------------------------------------------------------------- commands


def _convert(args: argparse.Namespace) -> None:
    from sam_jax.checkpoint import convert_checkpoint

    config = convert_checkpoint(args.input, args.output, args.model_type)
    print(f"converted {args.input} ({config.name}) -> {args.output}")


def _export(args: argparse.Namespace) -> None:
    from sam_jax.checkpoint import export_checkpoint, load_model

    model = load_model(args.input)
    export_checkpoint(model.params, model.config, args.output)
    print(f"exported {args.input} ({model.config.name}) -> {args.output} (official key names)")


def _segment(args: argparse.Namespace) -> None:
    from PIL import Image

    from sam_jax.predictor import SamPredictor
    from sam_jax.visualize import mask_colors, overlay

    texts = args.text
    if not args.point and args.box is None and not texts:
        raise CliError("give at least one --point X,Y[,LABEL], a --box X0,Y0,X1,Y1 or a --text TEXT")
    if texts and args.clip is None:
        raise CliError(
            "--text needs --clip FOLDER: the Hugging Face CLIP folder (config.json, model.safetensors, "
            "tokenizer.json) the checkpoint was trained with"
        )
    if args.clip is not None and not texts:
        raise CliError("--clip is only used with --text")
    image_path = Path(args.image)
    image = read_image(image_path)
    model = _load(args)
    text_encoder = None
    if texts:
        if model.config.prompt_encoder.text_embed_dim is None:
            raise CliError(f"--text: {args.checkpoint} has no text projection: it was not trained with text prompts")
        from sam_jax.text import TextEncoder

        text_encoder = TextEncoder.from_folder(args.clip)
    predictor = SamPredictor(model, text_encoder=text_encoder)
    predictor.set_image(image)
    points = np.array([p[:2] for p in args.point], np.float32) if args.point else None
    labels = np.array([p[2] for p in args.point], np.int32) if args.point else None
    box = np.array(args.box, np.float32) if args.box is not None else None
    # One prompt per --text, each with the points and box; without --text (or with one), one prompt.
    n = max(len(texts), 1)
    kwargs = dict(point_coords=points, point_labels=labels, box=box)
    if n > 1:
        kwargs = {k: None if v is None else np.repeat(v[None], n, axis=0) for k, v in kwargs.items()}
    text = None if not texts else texts[0] if n == 1 else list(texts)
    masks, scores, _ = predictor.predict(**kwargs, text=text, multimask_output=args.multimask)
    if n == 1:
        masks, scores = masks[None], scores[None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = image_path.stem
    files = [
        [f"{stem}_mask{i}.png" if n == 1 else f"{stem}_text{j}_mask{i}.png" for i in range(masks.shape[1])]
        for j in range(n)
    ]
    for j in range(n):
        for mask, name in zip(masks[j], files[j]):
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)
    best = [int(np.argmax(s)) for s in scores]
    overlay(
        image, [masks[j][best[j]] for j in range(n)], colors=mask_colors(n), points=points, labels=labels, box=box
    ).save(out / f"{stem}_overlay.png")

    def per_prompt(values: list) -> Any:  # one prompt: as without --text; several: one entry per --text
        return values[0] if n == 1 else values

    write_json(
        out / f"{stem}_scores.json",
        {
            "image": str(image_path),
            "size": list(image.shape[:2]),
            "points": None if points is None else points.tolist(),
            "labels": None if labels is None else labels.tolist(),
            "box": None if box is None else box.tolist(),
            "text": list(texts) if texts else None,
            "scores": per_prompt([[float(v) for v in s] for s in scores]),
            "masks": per_prompt(files),
            "best": per_prompt(best),
        },
    )
    for j in range(n):
        what = f"{len(masks[j])} mask(s)" + (f" for {texts[j]!r}" if texts else "")
        print(f"{image_path}: {what}, scores {[round(float(v), 3) for v in scores[j]]} -> {out}")


def _auto(args: argparse.Namespace) -> None:
    from pycocotools import mask as mask_utils
    from tqdm import tqdm

    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
    from sam_jax.visualize import mask_colors, overlay

    paths = collect_images(args.inputs)
    generator = SamAutomaticMaskGenerator(
        _load(args),
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        output_mode="coco_rle",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() and not args.quiet
    for image_id, path in enumerate(tqdm(paths, desc="images", unit="img", disable=not show or len(paths) == 1)):
        image = read_image(path)
        bar = tqdm(desc=path.name, unit="batch", disable=not show or len(paths) > 1)

        def progress(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        records = generator.generate(image, progress=progress)
        bar.close()
        annotations = [{"id": i, **r} for i, r in enumerate(records)]
        h, w = image.shape[:2]
        write_json(
            out / f"{path.stem}.json",
            {
                "image": {"image_id": image_id, "file_name": path.name, "height": h, "width": w},
                "annotations": annotations,
            },
        )
        ordered = sorted(records, key=lambda r: -r["area"])
        masks = (mask_utils.decode(r["segmentation"]).view(bool) for r in ordered)  # one mask in memory at a time
        overlay(image, masks, colors=mask_colors(len(ordered))).save(out / f"{path.stem}_overlay.png")
        if not show:
            print(f"{path}: {len(records)} masks -> {out / (path.stem + '.json')}")


def _pretrain_kinds(args: argparse.Namespace) -> None:
    from sam_jax.train.pretrain import pretrain_kinds
    from sam_jax.train.text import dataset_categories
    from sam_jax.train.trainer import load_config_file, recipe_model

    if args.categories:
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    else:
        categories = sorted({c for d in args.data for c in dataset_categories(d)})
    if not categories:
        raise CliError(f"{', '.join(args.data)}: no annotation has a 'category'; name them with --categories")
    result = pretrain_kinds(
        args.data,
        args.out,
        categories=categories,
        config=recipe_model(load_config_file(args.recipe)),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        heldout_dir=args.heldout,
        eval_every=args.log_every,
    )
    print(
        f"wrote {args.out} ({result['steps']} steps, {result['seconds']:.0f} s); "
        f"train with --config.init=encoder:{args.out}"
    )


def _make_shapes(args: argparse.Namespace) -> None:
    from sam_jax.train.shapes import CATEGORIES, SIZE_RANGE, make_shapes

    if args.n < 1:
        raise CliError(f"--n must be >= 1, got {args.n}")
    lo = SIZE_RANGE[0] if args.min_size is None else args.min_size
    hi = SIZE_RANGE[1] if args.max_size is None else args.max_size
    kinds = CATEGORIES if args.categories is None else tuple(k.strip() for k in args.categories.split(",") if k.strip())
    make_shapes(
        args.out,
        args.n,
        seed=args.seed,
        image_size=(args.height, args.width),
        size_range=(lo, hi),
        categories=kinds,
        colour_by_category=args.colour_by_category,
    )
    print(f"wrote {args.n} images with masks (SA-1B layout) to {args.out}")


def _training_config(args: argparse.Namespace, overrides: list[str]):
    """The config file of --config with the --config.KEY=VALUE overrides; enables the compilation
    cache and, with `retain_host_memory` on the CPU backend, keeps freed host memory (host_memory.py)."""
    from sam_jax.host_memory import retain_on_cpu
    from sam_jax.train.trainer import apply_overrides, load_config_file

    cfg = apply_overrides(load_config_file(args.config), overrides)
    enable_compilation_cache(args.cache_dir)
    if cfg.retain_host_memory:
        retain_on_cpu()
    return cfg


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from sam_jax.train.sharding import initialize_distributed
    from sam_jax.train.trainer import Trainer

    processes = (args.coordinator, args.num_processes, args.process_id)
    if None in processes and any(a is not None for a in processes):
        raise CliError("--coordinator, --num-processes and --process-id go together: give all three or none")
    initialize_distributed(*processes)  # before anything touches a device
    cfg = _training_config(args, overrides)
    trainer = Trainer(cfg, args.workdir, quiet=args.quiet)
    try:
        last = trainer.train()
    finally:
        trainer.close()
    loss = f"last logged loss {last['loss']:.4f}" if "loss" in last else "no loss logged"
    print(f"trained to step {trainer.step} ({loss}); model -> {trainer.workdir / 'model'}")


def _finetune(args: argparse.Namespace, overrides: list[str]) -> None:
    from sam_jax.host_memory import retain_on_cpu
    from sam_jax.train.finetune import check_arguments, finetune, format_report

    check_arguments(args.mode, args.steps)  # before anything loads
    enable_compilation_cache(args.cache_dir)
    retain_on_cpu()
    report = finetune(
        args.checkpoint,
        args.train,
        args.workdir,
        train_images=args.train_images,
        val=args.val,
        val_images=args.val_images,
        mode=args.mode,
        steps=args.steps,
        overrides=overrides,
        quiet=args.quiet,
    )
    if args.quiet:  # otherwise printed with the progress
        print(format_report(report["before"], report["after"]))


def _engine(args: argparse.Namespace, overrides: list[str]) -> None:
    from sam_jax.train.engine import format_table, run_engine

    rows = run_engine(_training_config(args, overrides), args.workdir, quiet=args.quiet)
    if args.quiet:  # otherwise the table was printed after each round
        print(format_table(rows))
    print(f"data engine: {len(rows)} round(s) in {Path(args.workdir).absolute()} (round_*/report.json)")


def _eval(args: argparse.Namespace) -> None:
    from sam_jax.train.evaluate import evaluate, format_table

    categories = [c.strip() for c in (args.text_categories or "").split(",") if c.strip()]
    if args.text_categories is not None and not categories:
        raise CliError("--text-categories is empty: give comma-separated annotation categories, e.g. circle,triangle")
    if categories and args.clip is None:
        raise CliError(
            "--text-categories needs --clip FOLDER: the Hugging Face CLIP folder the checkpoint was trained with"
        )
    if args.clip is not None and not categories:
        raise CliError("--clip is only used with --text-categories")
    if categories and "{}" not in args.template:
        raise CliError(f"--template must contain {{}} (where the category goes), got {args.template!r}")
    model = _load(args)
    if categories and model.config.prompt_encoder.text_embed_dim is None:
        raise CliError(
            f"--text-categories: {args.checkpoint} has no text projection: it was not trained with text prompts"
        )
    results = evaluate(
        model.params,
        model.config,
        args.data,
        num_clicks=args.clicks,
        max_images=args.max_images,
        max_masks_per_image=args.max_masks,
    )
    print(format_table(results))
    if categories:
        from sam_jax.text import TextEncoder
        from sam_jax.train.text import embed_captions, evaluate_text

        captions = embed_captions(categories, args.template, TextEncoder.from_folder(args.clip))
        text = evaluate_text(model.params, model.config, args.data, captions, max_images=args.max_images)
        for c in categories:
            score = f"{text['per_category'][c]:.4f}" if c in text["per_category"] else "(no image has one)"
            print(f"text {args.template.format(c)!r:<24} {score}")
        print(
            f"text, all {text['num_queries']} queries  {text['miou_text']:.4f}  "
            f"(every query answered with all the shapes: {text['miou_all_shapes']:.4f})"
        )
        results["text"] = text
    if args.out:
        write_json(Path(args.out), results)


# ----------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="official .pth, .safetensors or sam-jax checkpoint directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype (params stay float32)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"JAX persistent compilation cache (default {default_cache_dir()}; '' disables it)",
    )


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="official .pth or HF/official .safetensors -> sam-jax checkpoint directory")
    p.add_argument("input", help="sam_vit_*.pth, or model.safetensors (official or Hugging Face key names)")
    p.add_argument("output", help="new checkpoint directory (must not exist)")
    p.add_argument("--model-type", default="auto", choices=["auto", *CONFIGS], help="default: inferred from shapes")
    p.set_defaults(func=_convert)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="any checkpoint -> .safetensors or .pt with the official key names")
    p.add_argument("input", help="sam-jax checkpoint directory (or any checkpoint `convert` reads)")
    p.add_argument(
        "output",
        help="output .safetensors file, or a PyTorch .pt / .pth file as the official builders load it "
        "(SAM 2.1: {'model': state_dict}, for build_sam2)",
    )
    p.set_defaults(func=_export)


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="masks for point / box / text prompts on one image")
    p.add_argument("image")
    _add_model_args(p)
    p.add_argument(
        "--point", action="append", type=parse_point, default=[], help="X,Y[,LABEL] (repeatable; LABEL 1 fg / 0 bg)"
    )
    p.add_argument("--box", type=parse_box, default=None, help="X0,Y0,X1,Y1")
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text prompt (repeatable: one prompt per --text, each with the points and box); "
        "needs --clip and a checkpoint trained with text",
    )
    p.add_argument(
        "--clip",
        default=None,
        metavar="FOLDER",
        help="the Hugging Face CLIP folder for --text (config.json, model.safetensors, tokenizer.json)",
    )
    p.add_argument("--multimask", action="store_true", help="three masks instead of one")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_segment)


def _add_auto(sub) -> None:
    p = sub.add_parser("auto", help="segment everything: SA-1B-style JSON (COCO RLE) + overlay per image")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-score-thresh", type=float, default=0.95)
    p.add_argument("--box-nms-thresh", type=float, default=0.7)
    p.add_argument("--crop-n-layers", type=int, default=0)
    p.add_argument("--min-mask-region-area", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_auto)


def _add_make_shapes(sub) -> None:
    p = sub.add_parser("make-shapes", help="a synthetic SA-1B-layout data set of shapes with exact masks")
    p.add_argument("out", help="output directory")
    p.add_argument("--n", type=int, default=100, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=256)
    p.add_argument(
        "--min-size", type=float, help="smallest shape extent, a fraction of the image's shorter side (default 0.04)"
    )
    p.add_argument(
        "--max-size", type=float, help="largest shape extent, a fraction of the image's shorter side (default 0.4)"
    )
    p.add_argument("--categories", help="comma-separated shape kinds to draw from (default: all 8, circle ... ring)")
    p.add_argument(
        "--colour-by-category",
        action="store_true",
        help="paint each kind one flat colour (a control for text prompts: a pixel shows its shape's kind)",
    )
    p.set_defaults(func=_make_shapes)


def _add_pretrain_kinds(sub) -> None:
    p = sub.add_parser(
        "pretrain-kinds",
        help="pretrain a model's image encoder to tell the annotations' categories apart in every token",
    )
    p.add_argument(
        "data", nargs="+", help="training folder(s) of NAME.jpg + NAME.json whose annotations carry a 'category'"
    )
    p.add_argument(
        "out",
        help="the checkpoint to write (new); train from it with --config.init=encoder:OUT. Checkpoints go to "
        "OUT.work: rerunning the same command resumes there",
    )
    p.add_argument("--categories", default=None, help="comma-separated categories (default: every category in DATA)")
    p.add_argument(
        "--recipe",
        default="shapes_text_p8",
        help="the training recipe (a name in sam_jax.train.configs or a config file) whose model to pretrain "
        "(default shapes_text_p8: tiny_p8_conv)",
    )
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--lr", type=float, default=2e-3, help="AdamW's peak learning rate (default 2e-3), then a stepwise cosine decay"
    )
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", default=None, help="a held-out folder: per-mask accuracy at each log")
    p.add_argument("--log-every", type=int, default=500, help="log, checkpoint and evaluate every N steps")
    p.set_defaults(func=_pretrain_kinds)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train (or resume) from a recipe; extra --config.KEY=VALUE override it. Ctrl-C or SIGTERM saves the step "
        "and stops; rerun the same command to resume",
    )
    p.add_argument(
        "--config",
        required=True,
        help="a recipe of sam_jax.train.configs by name (shapes_tiny, base, ...) or a config file with get_config()",
    )
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and the final model/ go here")
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache ('' disables it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="several processes: process 0's address (all three or none)",
    )
    p.add_argument("--num-processes", type=int, default=None, metavar="N", help="several processes: how many")
    p.add_argument(
        "--process-id", type=int, default=None, metavar="I", help="several processes: this one's index, 0 to N-1"
    )
    p.set_defaults(func=_train, takes_overrides=True)


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on your own masks (COCO instances, images/ + masks/, SA-1B); a before/after "
        "report; extra --config.KEY=VALUE override the recipe (train/configs/finetune.py); a rerun resumes",
    )
    p.add_argument("--checkpoint", required=True, help="official .pth, .safetensors or sam-jax checkpoint directory")
    p.add_argument("--train", required=True, help="a COCO instances .json, a folder with images/ and masks/, or SA-1B")
    p.add_argument("--train-images", default=None, help="the images of a COCO --train (default: the JSON's folder)")
    p.add_argument("--val", default=None, help="held-out data, as --train (default: a fixed-seed split of --train)")
    p.add_argument("--val-images", default=None, help="the images of a COCO --val (default: the JSON's folder)")
    p.add_argument("--workdir", required=True, help="embeddings, checkpoints, model/ and report.json go here")
    p.add_argument(
        "--mode",
        default="decoder",
        choices=["decoder", "lora", "full"],
        help="decoder: frozen encoder, cached embeddings (default); lora: adapters on the encoder; full: everything. "
        "An HQ-SAM checkpoint trains its HQ layers alone, SAM frozen, in decoder or full mode (lora is refused); "
        "--config.model=vit_b_hq (vit_l_hq, vit_h_hq, vit_tiny_hq for vit_t) trains a plain SAM checkpoint as HQ-SAM, "
        "its HQ layers new",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache ('' disables it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=_finetune, takes_overrides=True)


def _add_engine(sub) -> None:
    p = sub.add_parser(
        "engine", help="data engine rounds: pseudo-label, filter, train on labeled + pseudo, evaluate (resumes)"
    )
    p.add_argument(
        "--config", required=True, help="a recipe with an engine section, e.g. engine_shapes_tiny (or a config file)"
    )
    p.add_argument(
        "--workdir", required=True, help="round_*/ (pseudo-labels, training data, training, report.json) go here"
    )
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache ('' disables it)")
    p.add_argument("--quiet", action="store_true", help="only the table and a last line")
    p.set_defaults(func=_engine, takes_overrides=True)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="interactive-click and box mIoU on an SA-1B-layout folder")
    p.add_argument("data", help="folder of NAME.jpg + NAME.json")
    _add_model_args(p)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-masks", type=int, default=None, help="per image")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--text-categories",
        default=None,
        metavar="A,B,...",
        help="also score text prompts: each category's caption alone against all its masks in an image (needs --clip)",
    )
    p.add_argument("--clip", default=None, metavar="FOLDER", help="the Hugging Face CLIP folder for --text-categories")
    p.add_argument(
        "--template", default="{}", help="category -> caption, as the training config's text.template (default '{}')"
    )
    p.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sam-jax", description="Segment Anything in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_convert(sub)
    _add_export(sub)
    _add_segment(sub)
    _add_auto(sub)
    _add_make_shapes(sub)
    _add_pretrain_kinds(sub)
    _add_train(sub)
    _add_finetune(sub)
    _add_engine(sub)
    _add_eval(sub)
    return parser


def config_overrides(extra: list[str]) -> list[str] | None:
    """The `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments as KEY=VALUE; None if any is neither."""
    out: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--config.") or item == "--config.":
            return None
        if "=" in item:
            out.append(item.removeprefix("--config."))
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--config."):
            out.append(f"{item.removeprefix('--config.')}={extra[i + 1]}")
            i += 1
        else:
            return None
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "takes_overrides", False)
    overrides = config_overrides(extra) if takes_overrides else None
    if extra and overrides is None:
        hint = "; training options are --config.KEY=VALUE" if takes_overrides else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    from sam_jax.convert.errors import CheckpointError

    try:
        args.func(args, overrides or []) if takes_overrides else args.func(args)
    except (CliError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"sam-jax: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        trainer = sys.modules.get("sam_jax.train.trainer")  # imported only by the training commands
        if trainer is not None and isinstance(e, trainer.TrainingInterrupted):
            print(f"sam-jax: {e}", file=sys.stderr)
            return 130 if e.signal_name == "SIGINT" else 143  # 128 + the signal's number, as a shell reports it
        if trainer is not None and isinstance(e, trainer.TrainingError):
            print(f"sam-jax: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
