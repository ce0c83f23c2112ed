"""Low-rank adapters (LoRA, Hu et al. 2021) as a transform of the param tree: a frozen base plus a
low-rank delta on chosen dense kernels.

    spec = LoraSpec(rank=8, alpha=8.0, targets=DEFAULT_TARGETS)
    params = spec.add(params, jax.random.key(0))     # params["lora"] added beside the base
    plain = merge_adapters(params, spec.scale)        # W + (alpha / rank) * A @ B, no "lora": a plain SAM tree

`params["lora"]` mirrors the paths of the adapted modules: a target kernel
`params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]` (in, out) gets
`params["lora"]["image_encoder"]["blocks_0"]["attn"]["qkv"]` = {"a": (in, r), "b": (r, out)}, with
`a` random (scaled by 1 / sqrt(in)) and `b` zero, so the adapted model starts as the base model.

The top-level modules that hold adapters (the image encoder, by default) are the frozen base:
`merge_adapters` stops their gradient (their weight gradients are never computed) and the
optimizer gives them zero updates (`optim.trainable_labels`); the adapters and every other
module (prompt encoder, mask decoder) train. The model, the predictor and an export only ever
see merged params, so a fine-tuned model is a plain SAM checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

LORA = "lora"  # the params key of the adapters
# The image encoder's attention projections: qkv (dim, 3 dim) and proj (dim, dim) of every block, wherever the
# encoder keeps its blocks (the ViT's `blocks_i`, TinyViT's `layers_j/blocks_i`, Hiera's `trunk/blocks_i`).
DEFAULT_TARGETS = ("image_encoder/*blocks_*/attn/qkv", "image_encoder/*blocks_*/attn/proj")


class LoraError(ValueError):
    """An adapter config that cannot apply to the model (a rank below 1, targets matching no kernel)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (the delta is scaled by alpha / r) and the target modules: glob patterns over
    module paths joined by "/" ("image_encoder/blocks_*/attn/qkv"), each naming modules with a 2-D kernel."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"lora.rank={self.rank!r} must be a positive integer")
        if not self.targets:
            raise LoraError("lora.targets is empty: name at least one module, e.g. image_encoder/blocks_*/attn/qkv")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def target_modules(self, params: Any) -> list[tuple[str, ...]]:
        """The module paths (tuples of names) whose "kernel" is 2-D and matches a target, in tree order."""
        found = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            names = tuple(str(getattr(k, "key", k)) for k in path)
            if names[-1] == "kernel" and len(leaf.shape) == 2 and names[0] != LORA:
                module = "/".join(names[:-1])
                if any(fnmatch.fnmatchcase(module, t) for t in self.targets):
                    found.append(names[:-1])
        if not found:
            raise LoraError(f"lora.targets {self.targets} match no 2-D kernel of the model")
        return found

    def adapter_shapes(self, params: Any) -> dict:
        """{module path: ((in, r), (r, out))} of every target of `params` (arrays or shapes)."""
        shapes = {}
        for path in self.target_modules(params):
            din, dout = _get(params, path)["kernel"].shape
            shapes[path] = ((din, self.rank), (self.rank, dout))
        return shapes

    def abstract(self, params: Any) -> Any:
        """`params` (shapes) with the adapters' shapes (`jax.ShapeDtypeStruct`, float32) added under "lora"."""
        tree: dict = {}
        for path, (a, b) in self.adapter_shapes(params).items():
            _set(tree, path, {"a": jax.ShapeDtypeStruct(a, jnp.float32), "b": jax.ShapeDtypeStruct(b, jnp.float32)})
        return {**params, LORA: tree}

    def add(self, params: Any, rng: jax.Array) -> Any:
        """`params` with fresh adapters under "lora": a ~ N(0, 1 / in), b = 0 (the delta starts at zero)."""
        tree: dict = {}
        for i, (path, (a, b)) in enumerate(self.adapter_shapes(params).items()):
            a_init = jax.random.normal(jax.random.fold_in(rng, i), a, jnp.float32) / jnp.sqrt(a[0])
            _set(tree, path, {"a": a_init, "b": jnp.zeros(b, jnp.float32)})
        return {**params, LORA: tree}


def has_adapters(params: Any) -> bool:
    return isinstance(params, dict) and LORA in params


def frozen_modules(params: Any) -> set[str]:
    """The top-level modules that hold adapters: the frozen base of a LoRA fine-tune (empty without one)."""
    return set(params[LORA]) if has_adapters(params) else set()


def merge_adapters(params: Any, scale: float) -> Any:
    """Params with adapters -> plain params: each adapted kernel W (in, out) becomes
    W + scale * a @ b, the "lora" entry is dropped; the base modules holding adapters get no
    gradient (they are frozen). Params without adapters are returned as they are."""
    if not has_adapters(params):
        return params
    adapters = params[LORA]
    merged = {k: jax.lax.stop_gradient(v) if k in adapters else v for k, v in params.items() if k != LORA}
    for names, ab in _adapter_leaves(adapters):
        module = _get(merged, names)
        kernel = module["kernel"]
        delta = scale * jnp.matmul(ab["a"], ab["b"], precision=jax.lax.Precision.HIGHEST)
        _set(merged, names, {**module, "kernel": kernel + delta.astype(kernel.dtype)})
    return merged


def _adapter_leaves(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """[(module path, {"a", "b"})] of an adapters tree."""
    if set(tree) == {"a", "b"} and not isinstance(tree["a"], dict):
        return [(prefix, tree)]
    out = []
    for name, sub in tree.items():
        out.extend(_adapter_leaves(sub, (*prefix, name)))
    return out


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set `tree[path] = value`, copying (not mutating) the dicts along the path that exist."""
    *parents, last = path
    node = tree
    for name in parents:
        node[name] = dict(node.get(name, {}))
        node = node[name]
    node[last] = value


def lora_spec(cfg: Any) -> LoraSpec | None:
    """The adapters a training config asks for: its `lora` section (rank, alpha, targets), None
    without one or at rank 0."""
    section = cfg.get("lora") if hasattr(cfg, "get") else None
    if section is None or section.get("rank", 0) == 0:
        return None
    targets = section.get("targets", DEFAULT_TARGETS)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return LoraSpec(rank=section.rank, alpha=float(section.get("alpha", section.rank)), targets=tuple(targets))
