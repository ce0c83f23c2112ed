"""The step's memory options (decoder remat, mask chunks) keep its loss and gradients; the
compiled-memory bench (`bench.train_scale`) runs on the tiny model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench import train_scale


def _tiny_batch(b: int = 2, k: int = 4):
    from sam_jax.train.step import TrainBatch

    rng = np.random.default_rng(0)
    masks = np.zeros((b, k, 64, 64), bool)
    for i in range(b):
        for j in range(k):
            y, x = rng.integers(0, 40, 2)
            h, w = rng.integers(8, 24, 2)
            masks[i, j, y : y + h, x : x + w] = True
    valid = np.ones((b, k), bool)
    valid[-1, -1] = False  # a padding slot
    return TrainBatch(
        images=jax.random.normal(jax.random.key(1), (b, 256, 256, 3)),
        masks=jnp.asarray(masks),
        valid=jnp.asarray(valid),
        ids=jnp.arange(b, dtype=jnp.int32),
    )


def test_decoder_remat_and_mask_chunks_keep_loss_and_gradients():
    """The decoder's part of the step (`interactive_loss`, given the embeddings: the options touch
    nothing else), with and without the options: same loss, metrics and gradients (params and
    embeddings)."""
    from sam_jax.embeddings import ImageEmbeddings
    from sam_jax.model import init_params
    from sam_jax.train.step import interactive_loss
    from sam_jax.train.trainer import model_config

    batch = _tiny_batch()
    results = []
    for remat, chunk in ((False, 0), (True, 2)):
        cfg = train_scale.recipe("tiny", remat_decoder=remat, mask_chunk=chunk, point_iters=2, no_point_iters=1)
        mc = model_config(cfg)
        params = init_params(mc, jax.random.key(0))
        e = mc.embedding_size
        emb = ImageEmbeddings(jax.random.normal(jax.random.key(3), (2, e, e, mc.prompt_embed_dim)))
        f = functools.partial(interactive_loss, model_config=mc, cfg=cfg.loss)
        grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        (loss, metrics), grads = jax.jit(grad)(params, emb, batch, jax.random.key(2))
        results.append((loss, metrics, grads))
    (loss0, m0, g0), (loss1, m1, g1) = results
    assert np.isfinite(float(loss0)) and float(loss0) > 0
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m0.keys()
    for name in m0:
        np.testing.assert_allclose(m1[name], m0[name], rtol=1e-5, atol=1e-6, err_msg=name)
    flat0, flat1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)
    assert any(float(jnp.abs(g).max()) > 0 for _, g in flat0)
    for (path, a), b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bench_on_tiny():
    """The compiled memory analysis without and with decoder remat (less temp memory with), and
    `--run`: the recipe's step runs (finite loss, two timed steps), its time split into the
    encoder's and the interactive loop's, with the FLOPs and MFU of each."""
    rows = {}
    cfg = {
        r: train_scale.recipe("tiny", remat_decoder=r, masks=4, point_iters=2, no_point_iters=1) for r in (False, True)
    }
    rows[False] = train_scale.analyze_step(cfg[False], per_chip_batch=1, fsdp=1)
    run = train_scale.run_step(cfg[True], steps=2)
    rows[True] = run["compiled_memory"]
    for row in rows.values():
        assert row["argument"] > 0 and row["temp"] > 0
        assert row["peak"] == row["argument"] + row["output"] - row["alias"] + row["temp"]
    assert rows[False]["step_flops_raw"] > 0
    assert rows[True]["temp"] < rows[False]["temp"]
    assert train_scale.fits({1: 10, 2: 14}, 30) == 6  # 6 + 4 b <= 30

    assert np.isfinite(run["loss"]) and len(run["step_s"]) == 2 and run["images_per_s"] > 0
    split = run["flop_split"]
    assert run["step_flops"] == split["encoder_fwd_bwd"] + split["loop_fwd_bwd"] > 0
    assert split["loop_fwd_bwd"] == split["first_decode_fwd_bwd"] + 3 * split["iteration_fwd_bwd"]
    assert run["mfu"] > 0 and run["peak_memory_bytes"] > 0
    p = run["profile"]
    assert p["encoder_fwd_bwd_s"] > 0 and p["loop_fwd_bwd_s"] > 0 and p["encoder_mfu"] > 0 and p["loop_mfu"] > 0


def test_projection_from_the_flop_split():
    results = {
        "flops": [
            {"model": m, "dtype": "bfloat16", "encoder_fwd_bwd": e, "loop_fwd_bwd": 1e12}
            for m, e in (("vit_b", 1e12), ("vit_h", 3e12))
        ]
    }
    table = train_scale.projection(results, {"0.50": 0.5}).splitlines()
    # H100 at 50%: 494.5 TFLOP/s over 2 and 4 TFLOP an image; 90k x 256 images x 4 TFLOP at that rate
    assert table[2] == f"| H100, 0.50 | 247.25 | 123.62 | {90_000 * 256 * 4e12 / 494.5e12 / 3600:,.0f} |"
    assert table[-1] == "| the paper: 256 A100 x 68 h | | | 17,408 |"
