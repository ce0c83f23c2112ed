"""The image encoder's training options: drop path (stochastic depth) and block rematerialization."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.config import ImageEncoderConfig, SamConfig, tiny
from sam_jax.model import SamModel, abstract_params, encode, init_params
from sam_jax.modeling.common import LayerNorm, MLPBlock
from sam_jax.modeling.image_encoder import Attention, Block

# The embedding array (no high-res features here); one compile per (config, rng or None).
_encode = jax.jit(lambda *a, **kw: encode(*a, **kw).embedding, static_argnames="config")


def with_encoder(config: SamConfig, **changes) -> SamConfig:
    return dataclasses.replace(config, image_encoder=dataclasses.replace(config.image_encoder, **changes))


@pytest.fixture(scope="module")
def setup():
    """The tiny config, its params (the same tree for every option, see below) and a batch of 2 images."""
    config = tiny()
    params = init_params(config, jax.random.key(0))
    s = config.image_size
    images = jax.random.normal(jax.random.key(1), (2, s, s, 3), jnp.float32)
    return config, params, images, _encode(params, images, config=config)


def test_config_fields_rates_and_round_trip():
    enc = ImageEncoderConfig()
    assert enc.drop_path_rate == 0.0 and enc.remat is False
    assert tiny().image_encoder.drop_path_rates == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(
        with_encoder(tiny(), drop_path_rate=0.6).image_encoder.drop_path_rates, [0.0, 0.2, 0.4, 0.6]
    )
    with pytest.raises(ValueError, match="drop_path_rate"):
        ImageEncoderConfig(drop_path_rate=1.0)

    config = with_encoder(tiny(), drop_path_rate=0.4, remat=True)
    d = config.to_dict()
    assert d["image_encoder"]["drop_path_rate"] == 0.4 and d["image_encoder"]["remat"] is True
    assert SamConfig.from_dict(d) == config
    # A dict written before these fields existed loads with the defaults.
    old = tiny().to_dict()
    del old["image_encoder"]["drop_path_rate"], old["image_encoder"]["remat"]
    assert SamConfig.from_dict(old) == tiny()


def test_deterministic_without_rng_or_rate(setup):
    config, params, images, ref = setup
    dp = with_encoder(config, drop_path_rate=0.5)
    # A drop path rate without an rng (inference, SamModel) changes nothing, bit for bit.
    np.testing.assert_array_equal(_encode(params, images, config=dp), ref)
    np.testing.assert_array_equal(SamModel(dp, params).encode(images).embedding, ref)
    # An rng at rate 0 changes nothing either.
    np.testing.assert_array_equal(_encode(params, images, config=config, drop_path_rng=jax.random.key(7)), ref)


def test_drop_path_depends_on_the_key_only(setup):
    config, params, images, ref = setup
    dp = with_encoder(config, drop_path_rate=0.5)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y1 = _encode(params, images, config=dp, drop_path_rng=k1)
    assert y1.shape == ref.shape and y1.dtype == jnp.float32
    assert not np.array_equal(y1, ref)
    np.testing.assert_array_equal(_encode(params, images, config=dp, drop_path_rng=k1), y1)
    assert not np.array_equal(_encode(params, images, config=dp, drop_path_rng=k2), y1)


def test_block_drop_path_is_per_sample_and_rescaled():
    """With identical samples, each output is one of the 4 (attention kept?, MLP kept?) outcomes, all 4 seen.

    Kept branches are scaled by 1 / (1 - rate); a dropped one adds nothing. 32
    samples at rate 0.5 show every outcome (a key missing one has probability ~4e-4).
    """
    rate, heads, hw = 0.5, 2, (4, 4)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, *hw, 16)), (32, *hw, 16))
    block = Block(heads, input_size=hw, drop_path=rate)

    @jax.jit
    def run(x):
        params = block.init(jax.random.key(1), x[:1])["params"]
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # rel_pos != 0
        out = block.apply({"params": params}, x, False, rngs={"drop_path": jax.random.key(3)})
        det = block.apply({"params": params}, x[:1])

        def ln(name, v):
            return LayerNorm(1e-6).apply({"params": params[name]}, v)

        x0 = x[:1]
        attn = Attention(heads, input_size=hw).apply({"params": params["attn"]}, ln("norm1", x0))

        def mlp(v):
            return MLPBlock(64).apply({"params": params["mlp"]}, ln("norm2", v))

        outcomes = []  # attention (dropped, kept) x MLP (dropped, kept)
        for after_attn in (x0, x0 + attn / (1 - rate)):
            outcomes += [after_attn, after_attn + mlp(after_attn) / (1 - rate)]
        return out, det, x0 + attn + mlp(x0 + attn), outcomes

    out, det, expected_det, outcomes = run(x)
    np.testing.assert_allclose(det, expected_det, rtol=1e-5, atol=1e-5)  # the decomposition is right
    seen = set()
    for i in range(x.shape[0]):
        match = [j for j, o in enumerate(outcomes) if np.allclose(out[i], o[0], rtol=1e-5, atol=1e-5)]
        assert len(match) == 1, f"sample {i} matches outcomes {match}"
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}


def test_remat_same_params_outputs_and_gradients(setup):
    config, params, images, ref = setup
    remat = with_encoder(config, remat=True)
    # Same param tree: names (blocks_i/...), shapes, dtypes and logical axes.
    plain_tree, remat_tree = abstract_params(config, boxed=True), abstract_params(remat, boxed=True)
    assert jax.tree.structure(remat_tree) == jax.tree.structure(plain_tree)
    assert jax.tree.leaves(remat_tree) == jax.tree.leaves(plain_tree)
    assert "blocks_0" in remat_tree["image_encoder"] and "attn" in remat_tree["image_encoder"]["blocks_0"]
    np.testing.assert_array_equal(_encode(params, images, config=remat), ref)
    jaxpr = str(jax.make_jaxpr(lambda p: encode(p, images, config=remat))(params))
    assert jaxpr.count("remat") == config.image_encoder.depth  # one remat (jax.checkpoint) per block

    # Gradients with drop path active: the recomputed forward pass draws the same masks.
    key = jax.random.key(5)

    def value_and_grad(cfg):
        loss = lambda p: jnp.mean(encode(p, images, config=cfg, drop_path_rng=key).embedding ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    dp = with_encoder(config, drop_path_rate=0.5)
    (l0, g0), (l1, g1) = value_and_grad(dp), value_and_grad(with_encoder(dp, remat=True))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)  # the two programs may round differently
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g0, g1)
    assert float(jnp.abs(g0["image_encoder"]["blocks_3"]["mlp"]["lin1"]["kernel"]).max()) > 0
