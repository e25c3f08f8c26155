"""Calibration-based methods (GPTQ, Wanda, structured pruning) on every decoder family: tiny
random Qwen3, Gemma 3 and Phi-3 configs (read from transformers' configs), and the clear error
for mixture-of-experts layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import models
from jaxinfer.errors import InputError
from jaxinfer.loading.hf_config import config_from_hf
from jaxinfer.model import Model
from jaxinfer.paths import get
from jaxinfer.quant import Int4Weight
from jaxinfer.quant.calibration import collect_hessians, layer_params
from jaxinfer.quant.gptq import gptq_quantize
from jaxinfer.sparse import prune_structured, sparsify, structured_norms, wanda_sparsify

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


def test_moe_layers_are_refused_with_one_clear_error():
    """Before any work (the params are shapes only)."""
    config = models.LlamaConfig.tiny(n_experts=4, n_experts_per_token=2)
    model = Model(config=config, params=models.abstract_params(config), tokenizer=None)
    calib = [[1, 2, 3, 4]]
    for run in (lambda: gptq_quantize(model, calib, group_size=GS, progress=False),
                lambda: wanda_sparsify(model, calib, sparsity=0.5, progress=False),
                lambda: prune_structured(model, ffn_sparsity=0.25)):
        with pytest.raises(InputError, match="mixture-of-experts"):
            run()
