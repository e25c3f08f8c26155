"""GPTQ int4 (jaxinfer.quant.gptq) and its calibration (jaxinfer.quant.calibration).

Tiny random Llama and GPT-2 models only; the SmolLM2 perplexity comparison is a script, not a
test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxinfer.errors import InputError
from jaxinfer.model import Model, pad_batch
from jaxinfer.quant import Int4Weight, describe, weight_bytes
from jaxinfer.quant.calibration import (
    calibration_ids,
    collect_hessians,
    embed_tokens,
    layer_hessians,
    layer_params,
)
from jaxinfer.quant.gptq import gptq_matrix, gptq_quantize
from models.layers import layer_norm, rms_norm

CONFIG = models.LlamaConfig.tiny(d_model=64, head_dim=16, d_ff=128, n_layers=2, qkv_bias=True,
                                 sliding_windows=(None, 16))
SITES = models.input_sites(CONFIG)
PROJECTIONS = tuple(p for paths in SITES.values() for p in paths)
GS = 32


@pytest.fixture(scope="module")
def model():
    params = models.init_params(CONFIG, jax.random.key(0))
    return Model(config=CONFIG, params=params, tokenizer=None, source="tiny")


@pytest.fixture(scope="module")
def calib():
    # Token ids with some structure (a random walk), so inputs are correlated like text.
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.integers(-3, 4, (12, 48)), axis=1) + rng.integers(0, 128, (12, 1))
    return (walk % CONFIG.vocab_size).tolist()


@pytest.fixture(scope="module")
def hessians(model, calib):
    return collect_hessians(model, calib)


@pytest.fixture(scope="module", params=[True, False], ids=["sym", "asym"])
def quantized(request, model, calib):
    return request.param, gptq_quantize(model, calib, group_size=GS, symmetric=request.param,
                                        sequential=False, progress=False)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _site(path):
    return next(s for s, paths in SITES.items() if path in paths)


def _output_error(w, q, h):
    """||X W - X Q||^2 / tokens = trace(D^T H D) with D = W - Q, H = X^T X / tokens."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum(d * (h @ d)))


# ----------------------------------------------------------------------------- calibration


def test_hessian_of_first_site_is_gram_of_normed_embeddings(model, calib, hessians):
    tokens, positions = pad_batch(calib, CONFIG)
    x = embed_tokens(CONFIG, model.params, tokens, positions)
    xn = rms_norm(x, model.params["layers"]["attn_norm"][0], CONFIG.norm_eps)
    xn = np.asarray(xn, np.float64).reshape(-1, CONFIG.d_model)
    np.testing.assert_allclose(hessians[0]["attn_in"], xn.T @ xn / len(xn), rtol=1e-5,
                               atol=1e-6)
    want = {"attn_in": 64, "o_in": 64, "mlp_in": 64, "down_in": 128}
    assert all({s: h.shape[0] for s, h in hl.items()} == want for hl in hessians)


def test_ragged_windows_leave_padding_out(model):
    a, b = list(range(3, 40)), list(range(50, 71))
    lp = layer_params(model.params, 1)

    def run(windows):
        tokens, positions = pad_batch(windows, CONFIG)
        x = embed_tokens(CONFIG, model.params, tokens, positions)
        return layer_hessians(CONFIG, lp, x, positions, 1, batch_size=2)[0]

    both, ha, hb = run([a, b]), run([a]), run([b])
    for site in SITES:
        assert both[site].tokens == len(a) + len(b)
        np.testing.assert_allclose(both[site].h, ha[site].h + hb[site].h, rtol=1e-4,
                                   atol=1e-5 * np.abs(both[site].h).max())


def _tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers

    from jaxinfer.tokenizer import Tokenizer

    words = ["<unk>", "<s>", "the", "cat", "sat", "on", "mat"]
    backend = Backend(tm.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=(), unk_token_id=0,
                     chat_template=None, add_bos_token=False)


def test_calibration_ids_cut_consecutive_windows(model):
    m = Model(config=CONFIG, params=model.params, tokenizer=_tokenizer())
    text = " ".join(["the cat sat on the mat"] * 10)  # 60 tokens
    ids = calibration_ids(m, text, 3, 20)
    assert len(ids) == 3 and all(len(w) == 20 for w in ids)
    assert sum(ids, []) == m.tokenizer.encode(text)[:60]


def test_too_short_text_raises_input_error_naming_the_numbers(model):
    m = Model(config=CONFIG, params=model.params, tokenizer=_tokenizer())
    with pytest.raises(InputError, match=r"12 tokens.*4 samples x 8 tokens need 32"):
        calibration_ids(m, "the cat sat on the mat " * 2, 4, 8)
    with pytest.raises(InputError, match="n_samples"):
        calibration_ids(m, "the cat", 0, 8)
    with pytest.raises(InputError, match="no tokenizer"):
        calibration_ids(model, "the cat", 1, 1)


def test_family_without_sites_is_refused(calib):
    m = Model(config=object(), params=None, tokenizer=None)
    with pytest.raises(InputError, match="object declares none"):
        gptq_quantize(m, calib, progress=False)


def test_bad_arguments_raise_input_error(model, calib):
    with pytest.raises(InputError, match="group size"):
        gptq_quantize(model, calib, group_size=48, progress=False)  # 64 % 48 != 0
    with pytest.raises(InputError, match="damp"):
        gptq_quantize(model, calib, group_size=GS, damp=-1.0, progress=False)
    with pytest.raises(InputError, match="clip_search"):
        gptq_quantize(model, calib, group_size=GS, clip_search=-1, progress=False)
    with pytest.raises(InputError, match="token ids"):
        gptq_quantize(model, [[0, 1, 999]], group_size=GS, progress=False)


# ----------------------------------------------------------------------------- the algorithm


def test_diagonal_hessian_gives_round_to_nearest():
    """No correlation between inputs: nothing to compensate, GPTQ is RTN."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 40)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 128))
    for symmetric in (True, False):
        res = gptq_matrix(w, h, group_size=GS, symmetric=symmetric)
        rtn = Int4Weight.from_float(jnp.asarray(w), GS, symmetric)
        np.testing.assert_array_equal(res.q, np.asarray(rtn.unpacked()))
        np.testing.assert_array_equal(res.scales, np.asarray(rtn.scales))


def test_clip_search_never_increases_weighted_rounding_error():
    """With a diagonal H there is no error propagation, and each group's grid is the one with
    the least diag(H)-weighted error among the candidates, the whole range included."""
    rng = np.random.default_rng(2)
    w = rng.standard_t(4, (128, 24))
    hd = rng.uniform(0.5, 2.0, 128)
    for symmetric in (True, False):
        def err(res):
            d = np.square(w - res.dequantize(GS)) * hd[:, None]
            return d.reshape(-1, GS, 24).sum(axis=1)  # per group and column

        plain = gptq_matrix(w, np.diag(hd), group_size=GS, symmetric=symmetric)
        clipped = gptq_matrix(w, np.diag(hd), group_size=GS, symmetric=symmetric, clip_search=8)
        assert np.all(err(clipped) <= err(plain) * (1 + 1e-9))
        assert err(clipped).sum() < 0.99 * err(plain).sum()  # heavy tails: clipping pays


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_every_projection(model, hessians, symmetric, act_order):
    ratios = []
    for layer, hl in enumerate(hessians):
        lp = layer_params(model.params, layer)
        for path in PROJECTIONS:
            w = np.asarray(_get(lp, path), np.float64)
            h = hl[_site(path)]
            res = gptq_matrix(w, h, group_size=GS, symmetric=symmetric, act_order=act_order,
                              block_size=48)  # blocks across group boundaries on purpose
            rtn = Int4Weight.from_float(jnp.asarray(w, jnp.float32), GS, symmetric).dequantize()
            e_gptq, e_rtn = _output_error(w, res.dequantize(GS), h), _output_error(w, rtn, h)
            assert e_gptq < e_rtn, (layer, path, e_gptq, e_rtn)
            ratios.append(e_gptq / e_rtn)
    assert np.mean(ratios) < 0.85, ratios


def test_model_level_result_has_the_int4_grid(model, quantized):
    symmetric, q = quantized
    for path in PROJECTIONS:
        leaf = _get(q["layers"], path)
        w = _get(model.params["layers"], path)
        assert isinstance(leaf, Int4Weight) and leaf.shape == w.shape
        assert leaf.group_size == GS and leaf.symmetric == symmetric and leaf.dtype == "float32"
        leaf.validate()
        nib = np.asarray(leaf.unpacked()).astype(np.float64)
        assert nib.min() >= 0 and nib.max() <= 15
        s = np.repeat(np.asarray(leaf.scales, np.float64), GS, axis=-2)
        assert np.all(s >= 0)
        want = (nib - 8.0) * s if symmetric else (
            nib * s + np.repeat(np.asarray(leaf.mins, np.float64), GS, axis=-2))
        np.testing.assert_allclose(np.asarray(leaf.dequantize(), np.float64), want, rtol=1e-6,
                                   atol=1e-7)
        # Every group's grid covers its weights' range up to about one step (the error of
        # GPTQ's updates moves weights, but not far).
        step = np.max(s)
        assert np.max(np.abs(want - np.asarray(w))) < 4 * step
    # Unquantized leaves pass through untouched.
    assert q["embed"] is model.params["embed"]
    assert q["layers"]["attn"]["q_bias"] is model.params["layers"]["attn"]["q_bias"]
    assert describe(q)["layers/mlp/down"].startswith("int4")
    assert weight_bytes(q) < weight_bytes(model.params)


def test_model_level_layer0_matches_gptq_matrix(model, hessians, quantized):
    """Layer 0 sees the same inputs either way: the tree holds gptq_matrix's values, and its
    output error on the calibration inputs is below RTN's for every projection."""
    symmetric, q = quantized
    lp = layer_params(model.params, 0)
    merged = np.concatenate([np.asarray(_get(lp, p)) for p in SITES["attn_in"]], axis=1)
    res = gptq_matrix(merged, hessians[0]["attn_in"], group_size=GS, symmetric=symmetric)
    got = np.concatenate([np.asarray(_get(q["layers"], p).layer(0).unpacked())
                          for p in SITES["attn_in"]], axis=1)
    np.testing.assert_array_equal(got, res.q)
    for layer in range(CONFIG.n_layers):
        for path in PROJECTIONS:
            w = np.asarray(_get(layer_params(model.params, layer), path))
            h = hessians[layer][_site(path)]
            gq = _get(q["layers"], path).layer(layer).dequantize()
            rtn = Int4Weight.from_float(jnp.asarray(w), GS, symmetric).dequantize()
            assert _output_error(w, gq, h) < _output_error(w, rtn, h), (layer, path)


def test_forward_runs_on_gptq_params(model, calib, quantized):
    _, q = quantized
    tokens, positions = pad_batch(calib[:2], CONFIG)
    fwd = jax.jit(models.forward, static_argnums=0)
    lq = np.asarray(fwd(CONFIG, q, tokens, positions)[0])
    lf = np.asarray(fwd(CONFIG, model.params, tokens, positions)[0])
    assert lq.shape == lf.shape and np.all(np.isfinite(lq))
    assert np.abs(lq - lf).max() < 0.2 * np.abs(lf).max()


def test_sequential_gptq_act_order_runs(model, calib):
    q = gptq_quantize(model, calib[:4], group_size=GS, act_order=True, progress=False,
                      stats=(stats := {}))
    assert set(stats["loss"]) == {f"{l}/{SITES[s][0]}" for l in range(2) for s in SITES}
    tokens, positions = pad_batch(calib[:1], CONFIG)
    logits = models.forward(CONFIG, q, tokens, positions)[0]
    assert np.all(np.isfinite(np.asarray(logits)))


# ----------------------------------------------------------------------------- GPT-2


GPT2 = models.GPT2Config.tiny()  # D 32, F 128: fused qkv [D, 3D], o [D, D], fc, proj
GPT2_SITES = models.input_sites(GPT2)


@pytest.fixture(scope="module")
def gpt2(calib):
    params = models.init_params(GPT2, jax.random.key(3))
    model = Model(config=GPT2, params=params, tokenizer=None, source="tiny-gpt2")
    return model, collect_hessians(model, calib)


def test_gpt2_hessians_have_the_sites_widths(gpt2, calib):
    model, hessians = gpt2
    assert [{s: h.shape[0] for s, h in hl.items()} for hl in hessians] == [
        {"attn_in": 32, "o_in": 32, "mlp_in": 32, "down_in": 128}] * GPT2.n_layers
    # The first site is the Gram matrix of ln1(token + position embeddings).
    tokens, positions = pad_batch(calib, GPT2)
    x = embed_tokens(GPT2, model.params, tokens, positions)
    lp = layer_params(model.params, 0)
    xn = np.asarray(layer_norm(x, lp["ln1_scale"], lp["ln1_bias"], GPT2.norm_eps),
                    np.float64).reshape(-1, GPT2.d_model)
    np.testing.assert_allclose(hessians[0]["attn_in"], xn.T @ xn / len(xn), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gpt2_gptq_beats_rtn_on_every_projection(gpt2, calib, symmetric):
    """Model-level GPTQ on GPT-2 (fused qkv, biases): every projection becomes an Int4Weight
    whose output error on the calibration inputs is below round-to-nearest's, and the
    quantized model runs close to the float one."""
    model, hessians = gpt2
    q = gptq_quantize(model, calib, group_size=GS, symmetric=symmetric, sequential=False,
                      progress=False)
    ratios = []
    for site, paths in GPT2_SITES.items():
        (path,) = paths
        leaf = _get(q["layers"], path)
        assert isinstance(leaf, Int4Weight) and leaf.shape == _get(model.params["layers"], path).shape
        for layer in range(GPT2.n_layers):
            w = np.asarray(_get(layer_params(model.params, layer), path), np.float64)
            h = hessians[layer][site]
            rtn = Int4Weight.from_float(jnp.asarray(w, jnp.float32), GS, symmetric).dequantize()
            e_gptq = _output_error(w, leaf.layer(layer).dequantize(), h)
            e_rtn = _output_error(w, rtn, h)
            assert e_gptq < e_rtn, (layer, path, e_gptq, e_rtn)
            ratios.append(e_gptq / e_rtn)
    assert np.mean(ratios) < 0.7, ratios
    assert q["wpe"] is model.params["wpe"]
    assert q["layers"]["attn"]["qkv_bias"] is model.params["layers"]["attn"]["qkv_bias"]
    tokens, positions = pad_batch(calib[:2], GPT2)
    fwd = jax.jit(models.forward, static_argnums=0)
    lq = np.asarray(fwd(GPT2, q, tokens, positions)[0])
    lf = np.asarray(fwd(GPT2, model.params, tokens, positions)[0])
    assert np.all(np.isfinite(lq)) and np.abs(lq - lf).max() < 0.2 * np.abs(lf).max()
