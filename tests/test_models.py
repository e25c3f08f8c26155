"""Model-level golden tests: cached decode equals the full forward; shapes of big presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models

forward = jax.jit(models.forward, static_argnums=0)

CONFIGS = {
    "llama_gqa_window": models.LlamaConfig.tiny(sliding_windows=(3, None), qkv_bias=True),
    "llama_mqa": models.LlamaConfig.tiny(n_kv_heads=1, tie_embeddings=True),
    "gpt2": models.GPT2Config.tiny(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    config = CONFIGS[name]
    params = models.init_params(config, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    full, _ = models.forward(config, params, tokens, positions)
    cache = models.init_cache(config, 2, 16)
    step, cache = forward(config, params, tokens[:, :5], positions[:, :5], cache)
    np.testing.assert_allclose(step, full[:, :5], atol=1e-5)
    for t in range(5, 11):  # one token at a time
        step, cache = forward(config, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                     cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)
    assert list(np.asarray(cache.end)) == [11, 11]


def test_right_padded_rows_in_cache_match_unpadded():
    """A row padded on the right (positions -1 after its tokens) decodes exactly like the same
    row alone, and its padding takes no cache slot (the next token overwrites it)."""
    config = CONFIGS["llama_gqa_window"]
    params = models.init_params(config, jax.random.key(3))
    row = jnp.array([[5, 9, 2, 7]])
    alone, _ = models.forward(config, params, row, jnp.arange(4)[None])
    cache = models.init_cache(config, 1, 12)
    out, cache = forward(config, params, jnp.array([[5, 9, 2, 0, 0]]),
                         jnp.array([[0, 1, 2, -1, -1]]), cache)
    np.testing.assert_allclose(out[:, :3], alone[:, :3], atol=1e-5)
    assert int(cache.end[0]) == 3
    last, _ = models.forward(config, params, jnp.array([[5, 9, 2, 7, 0]]),
                             jnp.array([[0, 1, 2, 3, -1]]), models.init_cache(config, 1, 12),
                             last_only=True)  # the last real token, not the last column
    out, cache = forward(config, params, row[:, 3:], jnp.array([[3]]), cache)
    np.testing.assert_allclose(out[:, 0], alone[:, 3], atol=1e-5)
    np.testing.assert_allclose(last[:, 0], alone[:, 3], atol=1e-5)
    assert int(cache.end[0]) == 4 and cache.pos[0, :5].tolist() == [0, 1, 2, 3, -1]


def test_presets_have_expected_shapes_without_allocating():
    smol = models.abstract_params(models.LlamaConfig.smollm2_135m())
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(smol))
    assert 134_000_000 < n < 135_000_000  # SmolLM2-135M: 134.5M parameters
    big = models.abstract_params(models.LlamaConfig.llama3_8b())
    assert big["layers"]["attn"]["k"].shape == (32, 4096, 1024)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(big))
    assert 8.0e9 < n < 8.1e9  # Llama 3.1 8B: 8.03B parameters
    axes = models.logical_axes(models.LlamaConfig.llama3_8b())
    assert axes["layers"]["mlp"]["down"] == ("layers", "mlp", "embed")


def test_mock_model_output_computable_by_hand():
    """Zero layers' contribution + identity-like head: logits are embed @ embed^T of the norm."""
    config = models.LlamaConfig.tiny(n_layers=1, tie_embeddings=True, vocab_size=4, d_model=4,
                                     n_heads=1, n_kv_heads=1, head_dim=4, d_ff=4)
    params = jax.tree.map(jnp.zeros_like, models.init_params(config, jax.random.key(0)))
    params["embed"] = jnp.eye(4) * 2.0
    params["final_norm"] = jnp.ones(4)
    logits, _ = models.forward(config, params, jnp.array([[2]]), jnp.array([[0]]))
    # The residual stream stays x = 2 e_2 (mean square 1); RMSNorm gives 2 e_2 / sqrt(1 + eps);
    # the tied head multiplies by embed^T = 2 I.
    expected = np.array([0.0, 0.0, 4.0 / np.sqrt(1.0 + 1e-5), 0.0])
    np.testing.assert_allclose(logits[0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama_gqa_window", "gpt2"])
def test_int8_kv_cache_close_to_float(name):
    config = CONFIGS[name]
    params = models.init_params(config, jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    full, _ = models.forward(config, params, tokens, positions)
    cache = models.init_cache(config, 2, 16, jnp.int8)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == (2, 2, config.n_kv_heads, 16)
    out, cache = forward(config, params, tokens[:, :6], positions[:, :6], cache)
    steps = [out]
    for t in range(6, 9):
        out, cache = forward(config, params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(out)
    got = jnp.concatenate(steps, axis=1)
    err = float(jnp.abs(got - full).max())
    assert 0 < err < 2e-2 * float(jnp.abs(full).max()), err  # quantized, but close
    # Layer 0's stored keys [B, K, H, S] (same inputs in both runs) dequantize to within half
    # a step (one scale per slot and head).
    assert cache.k.shape == (2, 2, config.n_kv_heads, config.head_dim, 16)
    k_deq = cache.k[0].astype(jnp.float32) * cache.k_scale[0][..., None, :]
    fcache = models.init_cache(config, 2, 16)
    _, fcache = forward(config, params, tokens, positions, fcache)
    half_step = cache.k_scale[0][..., None, :] / 2 + 1e-6
    diff = jnp.abs(k_deq - fcache.k[0])[..., :9]
    assert bool(jnp.all(diff <= half_step[..., :9]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unstacked_layers_equal_stacked(name):
    """One weight buffer per layer (models.unstack_layers) is the same model as nn.scan over
    stacked weights, with and without a cache."""
    config = CONFIGS[name]
    params = models.init_params(config, jax.random.key(1))
    per_layer = models.unstack_layers(params)
    assert isinstance(per_layer["layers"], tuple) and len(per_layer["layers"]) == config.n_layers
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    np.testing.assert_allclose(forward(config, per_layer, tokens, positions)[0],
                               forward(config, params, tokens, positions)[0], atol=1e-5)
    a = forward(config, params, tokens, positions, models.init_cache(config, 2, 8))[1]
    b = forward(config, per_layer, tokens, positions, models.init_cache(config, 2, 8))[1]
    np.testing.assert_allclose(a.k, b.k, atol=1e-5)
    np.testing.assert_allclose(a.v, b.v, atol=1e-5)
    # Per-layer cache buffers (what generation uses with per-layer weights): same contents,
    # and a decode step on top of them gives the same logits.
    for kind in ("float", "int8"):
        dtype = jnp.int8 if kind == "int8" else jnp.float32
        stacked = models.init_cache(config, 2, 9, dtype)
        split = models.init_cache(config, 2, 9, dtype, per_layer=True)
        assert split.per_layer and split.max_len == stacked.max_len == 9
        la, a = forward(config, params, tokens, positions, stacked)
        lb, b = forward(config, per_layer, tokens, positions, split)
        np.testing.assert_allclose(la, lb, atol=1e-5)
        for name in ("k", "v", "k_scale", "v_scale"):
            if getattr(a, name) is not None:
                np.testing.assert_allclose(getattr(a, name), np.stack(getattr(b, name)),
                                           atol=1e-5)
        nxt, npos = tokens[:, :1], jnp.full((2, 1), 7)
        np.testing.assert_allclose(forward(config, params, nxt, npos, a)[0],
                                   forward(config, per_layer, nxt, npos, b)[0], atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_api_composes_to_forward(name):
    """embed -> apply_layer for every layer -> head is forward without a cache, ragged rows
    (right padding at position -1) and the sliding window included."""
    config = CONFIGS[name]
    params = models.init_params(config, jax.random.key(6))
    tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, config.vocab_size)
    positions = jnp.array([list(range(9)), list(range(6)) + [-1] * 3])
    want, _ = forward(config, params, tokens, positions)
    x = models.embed(config, params, tokens, positions)
    assert x.shape == (2, 9, config.d_model)
    for layer, lp in enumerate(models.unstack_layers(params)["layers"]):
        x = jax.jit(models.apply_layer, static_argnums=0)(config, lp, x, positions,
                                                          jnp.int32(layer))
    got = models.head(config, params, x)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The window is the layer's own: layer 0 of the windowed Llama differs from a full layer.
    x0 = models.embed(config, params, tokens, positions)
    lp0 = models.unstack_layers(params)["layers"][0]
    y0 = models.apply_layer(config, lp0, x0, positions, 0)
    if name == "llama_gqa_window":
        full = dataclasses.replace(config, sliding_windows=None)
        assert np.abs(np.asarray(y0 - models.apply_layer(full, lp0, x0, positions, 0))).max() > 1e-4


def test_input_sites_name_projections_of_every_family():
    for config in CONFIGS.values():
        sites = models.input_sites(config)
        assert list(sites) == ["attn_in", "o_in", "mlp_in", "down_in"]
        lp = models.unstack_layers(models.init_params(config, jax.random.key(0)))["layers"][0]
        for projections in sites.values():
            dims = {lp[p.split("/")[0]][p.split("/")[1]].shape[0] for p in projections}
            assert len(dims) == 1  # the projections of one site share their input width
    assert models.input_sites(CONFIGS["gpt2"])["attn_in"] == ("attn/qkv",)
    with pytest.raises(TypeError, match="unknown model config"):
        models.input_sites(object())


def test_declared_axes_agree_across_families():
    """Every family declares a shared weight path with the same axes (weight_axes checks it),
    and the lazy per-path lookup gives what the whole table gives."""
    table = models.weight_axes()
    assert table["embed"] == ("vocab", "embed") and table["layers/attn/q"][-1] == "heads"
    for path, ax in table.items():
        assert models.declared_axes(path) == ax
    assert models.declared_axes("layers/no_such_weight") is None
