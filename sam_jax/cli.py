"""The `sam-jax` command line: parse, call the library, print. Errors are one line and exit 1."""

from __future__ import annotations

import argparse
import sys

from sam_jax.config import CONFIGS


def _convert(args: argparse.Namespace) -> None:
    from sam_jax.checkpoint import convert_checkpoint

    config = convert_checkpoint(args.input, args.output, args.model_type)
    print(f"converted {args.input} ({config.name}) -> {args.output}")


def _export(args: argparse.Namespace) -> None:
    from sam_jax.checkpoint import export_safetensors, load_model

    model = load_model(args.input)
    export_safetensors(model.params, model.config, args.output)
    print(f"exported {args.input} ({model.config.name}) -> {args.output} (official key names)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-jax", description="Segment Anything in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="official .pth or HF/official .safetensors -> sam-jax checkpoint directory")
    p.add_argument("input", help="sam_vit_*.pth, or model.safetensors (official or Hugging Face key names)")
    p.add_argument("output", help="new checkpoint directory (must not exist)")
    p.add_argument("--model-type", default="auto", choices=["auto", *CONFIGS], help="default: inferred from shapes")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="any checkpoint -> .safetensors with the official key names")
    p.add_argument("input", help="sam-jax checkpoint directory (or any checkpoint `convert` reads)")
    p.add_argument("output", help="output .safetensors file")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sam_jax.convert.errors import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"sam-jax: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
