"""SAM 2.1's image encoder, ours against the official, float32, one 1024-px image, same process:

    python -m bench.sam2_encoder [--size t|s|b+|l] [--runs 7]

What `SAM2ImagePredictor.set_image` computes from the normalized input (official: `forward_image` +
`_prepare_backbone_features` + `no_mem_embed`, `torch.no_grad`; ours: `SamModel.encode`, jitted),
every official tensor random and converted by `convert/keys_hiera.py`. After one warm-up call each,
the two run in turn `--runs` times; prints the medians and the largest differences.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PRESETS = {"t": "hiera_tiny", "s": "hiera_small", "b+": "hiera_base_plus", "l": "hiera_large"}
YAML = "configs/sam2.1/sam2.1_hiera_{}.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="t", choices=sorted(PRESETS))
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from sam2.build_sam import build_sam2

    from bench.official import randomize_, state_dict_numpy
    from sam_jax import config as configs
    from sam_jax.convert.keys_hiera import hiera_rows
    from sam_jax.model import SamModel, abstract_params

    enc = getattr(configs, PRESETS[args.size])()
    config = configs.SamConfig(name=f"sam2.1_hiera_{args.size}", image_encoder=enc, prompt_embed_dim=enc.d_model)
    ref = randomize_(build_sam2(YAML.format(args.size), ckpt_path=None, device="cpu"), seed=0)
    with torch.no_grad():  # the zero-initialized embeddings that randomize_ scales as weights
        for name in ("image_encoder.trunk.pos_embed_window", "no_mem_embed"):
            t = ref.get_parameter(name)
            t.copy_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    sd = state_dict_numpy(ref)
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(config))
    for row in hiera_rows(config):
        node = params
        for part in row.flax[:-1]:
            node = node[part]
        node[row.flax[-1]] = row.transform(sd[row.official])
    model = SamModel(config, params)

    x = np.random.default_rng(0).normal(size=(1, enc.img_size, enc.img_size, 3)).astype(np.float32)
    xj, xt = jnp.asarray(x), torch.from_numpy(x).permute(0, 3, 1, 2)

    def official():
        with torch.no_grad():
            out = ref.forward_image(xt)
            _, feats, _, sizes = ref._prepare_backbone_features(out)
            feats[-1] = feats[-1] + ref.no_mem_embed
            return [f.permute(1, 0, 2).reshape(1, *s, -1).numpy() for f, s in zip(feats, sizes)]  # NHWC

    def ours():
        return jax.block_until_ready(model.encode(xj))

    t0 = time.perf_counter()
    ours()
    print(f"ours: first call (compile + run) {time.perf_counter() - t0:.1f} s")
    official()
    times: dict[str, list[float]] = {"ours": [], "official": []}
    for _ in range(args.runs):
        for name, fn in (("ours", ours), ("official", official)):
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "ours":
                mine = result
            else:
                theirs = result
    pairs = (("embedding", mine.embedding, theirs[2]), ("s1", mine.high_res[0], theirs[1]))
    pairs += (("s0", mine.high_res[1], theirs[0]),)
    diffs = {k: float(np.abs(np.asarray(a) - b).max()) for k, a, b in pairs}
    print(
        f"sam2.1_hiera_{args.size}, float32, 1 x {enc.img_size} px, {jax.devices()[0].platform}, "
        f"torch threads {torch.get_num_threads()}; largest differences {diffs}"
    )
    for name, ts in times.items():
        print(f"{name:>8}: median {np.median(ts) * 1e3:.0f} ms over {len(ts)} runs {[round(t * 1e3) for t in ts]}")


if __name__ == "__main__":
    main()
