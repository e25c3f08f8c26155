"""Calibration-based methods (GPTQ, Wanda, structured pruning) on every decoder family: tiny
random Qwen3, Gemma 3 and Phi-3 configs (read from transformers' configs), and the
mixture-of-experts Mixtral and Qwen3-MoE, whose experts are calibrated on their routed tokens."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import models
from jaxinfer.loading.hf_config import config_from_hf
from jaxinfer.model import Model, pad_batch
from jaxinfer.paths import get, map_leaves
from jaxinfer.quant import Int4Weight
from jaxinfer.quant.calibration import collect_hessians, embed_tokens, layer_params
from jaxinfer.quant.gptq import gptq_quantize
from jaxinfer.sparse import prune_structured, sparsify, structured_norms, wanda_sparsify
from models.moe import MoE

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
HF_CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24),
    "phi3": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0),
}
GS = 16


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def family(request):
    """(model with random params, calibration windows, layer-0 Hessians per site)."""
    config = config_from_hf(HF_CONFIGS[request.param]().to_dict(), f"{request.param}.json")
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
    if config.norm_plus_one:  # Gemma: random (1 + w) norms, so the sites see them
        params = jax.tree.map(lambda a: a, params)
        for name in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm"):
            params["layers"][name] = 0.3 * jax.random.normal(jax.random.key(1),
                                                             params["layers"][name].shape)
    model = Model(config=config, params=params, tokenizer=None, source=request.param)
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.integers(-3, 4, (8, 32)), axis=1) + rng.integers(0, 97, (8, 1))
    calib = (walk % config.vocab_size).tolist()
    return model, calib, collect_hessians(model, calib)[0]


def _projections(config):
    site_of = {}
    for site, ps in models.input_sites(config).items():
        for p in ps:
            site_of["layers/" + p] = site
    return site_of


def _error(w, q, h):
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (h @ d)))


def test_gptq_beats_rtn_on_layer0(family):
    """Layer 0 sees the float model's inputs either way: GPTQ's output error on them is below
    round-to-nearest's for every projection."""
    model, calib, h0 = family
    q = gptq_quantize(model, calib, group_size=GS, sequential=False, progress=False)
    lp = layer_params(model.params, 0)
    for path, site in _projections(model.config).items():
        leaf = get(q, path)
        assert isinstance(leaf, Int4Weight), path
        w = get(lp, path.removeprefix("layers/"))
        rtn = Int4Weight.from_float(jnp.asarray(w), GS).dequantize()
        assert _error(w, leaf.layer(0).dequantize(), h0[site]) < _error(w, rtn, h0[site]), path


def test_wanda_beats_magnitude_on_layer0(family):
    model, calib, h0 = family
    out = wanda_sparsify(model, calib, sparsity=0.5, progress=False)
    magnitude = sparsify(model.params, method="magnitude", sparsity=0.5)
    for path, site in _projections(model.config).items():
        w = np.asarray(get(out, path))
        assert ((w == 0).sum(-2) == w.shape[-2] // 2).all(), path
        w0 = np.asarray(get(model.params, path)[0], np.float64)
        d_wanda, d_mag = w0 - w[0], w0 - np.asarray(get(magnitude, path)[0])
        h = h0[site]
        assert np.sum(d_wanda * (h @ d_wanda)) < np.sum(d_mag * (h @ d_mag)), path


def test_structured_pruning_of_zeroed_channels_and_heads_keeps_outputs(family):
    """Zero a quarter of each layer's FFN channels (down rows) and one query head per KV group
    (o rows): structured pruning removes exactly those, and the logits do not change."""
    model, calib, _ = family
    c = model.config
    p = jax.tree.map(np.array, model.params)
    rng = np.random.default_rng(4)
    g = c.n_heads // c.n_kv_heads
    for layer in range(c.n_layers):
        p["layers"]["mlp"]["down"][layer, rng.choice(c.d_ff, c.d_ff // 4, replace=False)] = 0
        for k in range(c.n_kv_heads):
            h = k * g + int(rng.integers(g))
            p["layers"]["attn"]["o"][layer, h * c.head_dim:(h + 1) * c.head_dim] = 0
    zeroed = Model(config=c, params=p, tokenizer=None)
    small = prune_structured(zeroed, ffn_sparsity=0.25, head_sparsity=0.5)
    assert (small.config.d_ff, small.config.n_heads) == (c.d_ff * 3 // 4, c.n_heads // 2)
    tokens = np.asarray(calib[:2])
    np.testing.assert_allclose(small.logits(tokens), zeroed.logits(tokens), atol=1e-5)
    norms = structured_norms(model, calib, progress=False)
    assert norms[0]["down_in"].shape == (c.d_ff,)
    calibrated = prune_structured(model, ffn_sparsity=0.25, head_sparsity=0.5, norms=norms)
    assert np.all(np.isfinite(calibrated.logits(tokens)))


# ----------------------------------------------------------------------------- MoE

MOE_COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2)
MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**MOE_COMMON, intermediate_size=96,
                                                  num_local_experts=4),
    # q/k norms, the top-k weights not renormalised
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **MOE_COMMON, intermediate_size=128, moe_intermediate_size=96, head_dim=16,
        num_experts=4, norm_topk_prob=False),
}


def _moe_model(name: str):
    """Random numpy params (no init program to compile): weights N(0, 0.1^2), the router's
    N(0, 1) (routing spread over the experts), norms 1 + N(0, 0.1^2)."""
    config = config_from_hf(MOE_CONFIGS[name]().to_dict(), f"{name}.json")
    rng = np.random.default_rng(0)

    def init(path, leaf):
        scale = 1.0 if path.endswith("router") else 0.1
        w = rng.normal(0, scale, leaf.shape).astype(np.float32)
        return w + 1 if "norm" in path else w

    params = map_leaves(init, models.abstract_params(config))
    return Model(config=config, params=params, tokenizer=None, source=name)


def _calib(vocab: int) -> list[list[int]]:
    """8 random-walk windows of 32 tokens, the last one 20 (ragged: padding left out)."""
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.integers(-3, 4, (8, 32)), axis=1) + rng.integers(0, vocab, (8, 1))
    calib = (walk % vocab).tolist()
    calib[-1] = calib[-1][:20]
    return calib


@functools.partial(jax.jit, static_argnums=0)
def _captured_moe_input(config, lp, x, positions):
    """The input [B, T, D] the layer (params lp) hands its MoE, captured from the model's own
    MoE call (flax method interception)."""
    seen = []

    def grab(next_fun, args, kwargs, context):
        if isinstance(context.module, MoE) and context.method_name == "__call__":
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        models.apply_layer(config, lp, x, positions, 0)
    return seen[0]


def _moe_input(config, params, calib) -> np.ndarray:
    """Layer 0's MoE input on the real tokens [n, D]."""
    tokens, positions = pad_batch(calib, config)
    x = embed_tokens(config, params, tokens, positions)
    seen = _captured_moe_input(config, layer_params(params, 0), x, jnp.asarray(positions))
    return np.asarray(seen, np.float64)[positions >= 0]


def _reference_hessians(config, params, calib):
    """numpy: layer 0's routed-token mask [n, E] (softmax, top k) and per-expert mean x x^T of
    the MoE input [E, D, D] and of each expert's hidden activation [E, F, F]."""
    x = _moe_input(config, params, calib)
    lp = jax.tree.map(lambda a: np.asarray(a, np.float64), layer_params(params, 0))["moe"]
    logits = x @ lp["router"]
    top = np.argsort(-logits, axis=-1)[:, :config.n_experts_per_token]
    routed = np.zeros(logits.shape, bool)
    np.put_along_axis(routed, top, True, axis=-1)
    h_in, h_down = [], []
    for e in range(config.n_experts):
        xe = x[routed[:, e]]
        g = xe @ lp["gate"][e]
        he = g / (1 + np.exp(-g)) * (xe @ lp["up"][e])  # SwiGLU
        n = max(len(xe), 1)
        h_in.append(xe.T @ xe / n)
        h_down.append(he.T @ he / n)
    return routed, {"mlp_in": np.stack(h_in), "down_in": np.stack(h_down)}


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def moe(request):
    """(model, calibration windows, layer-0 Hessians per site, tokens per expert [E])."""
    model = _moe_model(request.param)
    calib = _calib(model.config.vocab_size)
    routed, _ = _reference_hessians(model.config, model.params, calib)
    return model, calib, collect_hessians(model, calib)[0], routed.sum(0)


EXPERT_PATHS = {"layers/moe/gate": "mlp_in", "layers/moe/up": "mlp_in",
                "layers/moe/down": "down_in"}
_dequantize = jax.jit(lambda leaf: leaf.dequantize(jnp.float32))


def _expert_errors(w0, q0, h0, tokens):
    """{(path, expert): error of w0[path][e] - q0[path][e] (layer-0 experts [E, in, out]) on
    the expert's layer-0 Hessian} for every expert projection and every expert that a token
    reached (the attention projections are the dense tests')."""
    out = {}
    for path, site in EXPERT_PATHS.items():
        w, q = np.asarray(w0[path], np.float64), np.asarray(q0[path], np.float64)
        for e in np.flatnonzero(tokens):
            out[path, e] = _error(w[e], q[e], h0[site][e])
    return out


def test_moe_hessians_are_per_expert_over_routed_tokens(moe):
    model, calib, h0, tokens = moe
    routed, want = _reference_hessians(model.config, model.params, calib)
    assert tokens.sum() == 2 * sum(map(len, calib)) and tokens.min() > 0
    for site, ref in want.items():
        assert h0[site].shape == ref.shape
        np.testing.assert_allclose(h0[site], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_moe_gptq_beats_rtn_per_expert_and_generates(moe):
    """Layer 0 (float inputs either way): GPTQ's output error over each expert's routed tokens
    is below round-to-nearest's, for every expert of gate, up and down."""
    model, calib, h0, tokens = moe
    q = gptq_quantize(model, calib, group_size=GS, sequential=False, progress=False)
    w0 = {path: get(model.params, path)[0] for path in EXPERT_PATHS}
    gptq = {path: _dequantize(get(q, path))[0] for path in EXPERT_PATHS}
    rtn = {path: _dequantize(Int4Weight.from_float(jnp.asarray(w), GS))
           for path, w in w0.items()}
    rtn_err = _expert_errors(w0, rtn, h0, tokens)
    for key, err in _expert_errors(w0, gptq, h0, tokens).items():
        assert err < rtn_err[key], key
    quantized = Model(config=model.config, params=q, tokenizer=None)
    assert np.all(np.isfinite(quantized.logits(np.asarray(calib[:2]))))


def test_moe_wanda_beats_magnitude_per_expert_and_generates(moe):
    model, calib, h0, tokens = moe
    out = wanda_sparsify(model, calib, sparsity=0.5, progress=False)
    magnitude = sparsify(model.params, method="magnitude", sparsity=0.5)
    w = np.asarray(get(out, "layers/moe/down"))
    assert ((w == 0).sum(-2) == w.shape[-2] // 2).all()
    first = lambda p: {path: get(p, path)[0] for path in EXPERT_PATHS}  # noqa: E731
    mag_err = _expert_errors(first(model.params), first(magnitude), h0, tokens)
    for key, err in _expert_errors(first(model.params), first(out), h0, tokens).items():
        assert err < mag_err[key], key
    pruned = Model(config=model.config, params=out, tokenizer=None)
    assert np.all(np.isfinite(pruned.logits(np.asarray(calib[:2]))))


def test_moe_structured_pruning_per_expert():
    """Zero a quarter of each expert's channels (its own down rows): structured pruning removes
    exactly those, and the logits do not change; the calibrated score runs too. (Mixtral only:
    the code is the same for Qwen3-MoE, and each config's compile costs seconds.)"""
    model = _moe_model("mixtral")
    calib = _calib(model.config.vocab_size)
    c = model.config
    p = jax.tree.map(np.array, model.params)
    rng = np.random.default_rng(4)
    for layer in range(c.n_layers):
        for e in range(c.n_experts):
            p["layers"]["moe"]["down"][layer, e, rng.choice(c.d_ff, c.d_ff // 4, replace=False)] = 0
    zeroed = Model(config=c, params=p, tokenizer=None)
    small = prune_structured(zeroed, ffn_sparsity=0.25)
    assert small.params["layers"]["moe"]["gate"].shape == (c.n_layers, c.n_experts, c.d_model,
                                                           c.d_ff * 3 // 4)
    assert not (np.asarray(small.params["layers"]["moe"]["down"]) == 0).all(-1).any()
    tokens = np.asarray(calib[:2])
    np.testing.assert_allclose(small.logits(tokens), zeroed.logits(tokens), atol=1e-5)
    norms = structured_norms(model, calib, progress=False)
    assert norms[0]["down_in"].shape == (c.n_experts, c.d_ff)
    calibrated = prune_structured(model, ffn_sparsity=0.25, norms=norms)
    assert np.all(np.isfinite(calibrated.logits(tokens)))


def test_moe_expert_without_tokens_falls_back_with_a_warning():
    """Expert 3 never routed (a positive embedding feature its router column weighs -100): GPTQ
    stores it round-to-nearest and Wanda prunes it by magnitude, each with a warning and the
    expert named in stats."""
    model = _moe_model("mixtral")
    p = jax.tree.map(np.array, model.params)
    p["embed"][:, 0] = 1.0
    p["layers"]["moe"]["router"][:, 0, :3] = 0.0
    p["layers"]["moe"]["router"][:, 0, 3] = -100.0
    model = Model(config=model.config, params=p, tokenizer=None)
    calib = _calib(model.config.vocab_size)
    unrouted = {f"{layer}/{site}": [3] for layer in range(2) for site in ("mlp_in", "down_in")}
    stats: dict = {}
    with pytest.warns(UserWarning, match=r"experts \[3\] received no calibration token; "
                                         "round-to-nearest"):
        q = gptq_quantize(model, calib, group_size=GS, sequential=False, progress=False,
                          stats=stats)
    assert stats["unrouted"] == unrouted
    for path in ("layers/moe/gate", "layers/moe/up", "layers/moe/down"):
        rtn = Int4Weight.from_float(jnp.asarray(get(p, path)[:, 3]), GS)
        got = jax.tree.map(lambda a: a[:, 3], get(q, path))
        np.testing.assert_array_equal(got.values, rtn.values)
        np.testing.assert_array_equal(got.scales, rtn.scales)
    stats = {}
    with pytest.warns(UserWarning, match="magnitude pruning"):
        out = wanda_sparsify(model, calib, sparsity=0.5, progress=False, stats=stats)
    assert stats["unrouted"] == unrouted
    magnitude = sparsify(p, method="magnitude", sparsity=0.5)
    for path in ("layers/moe/gate", "layers/moe/up", "layers/moe/down"):
        np.testing.assert_array_equal(get(out, path)[:, 3], get(magnitude, path)[:, 3])
        assert not np.array_equal(get(out, path)[:, 0], get(magnitude, path)[:, 0])
