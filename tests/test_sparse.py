"""Pruning transforms: exact sparsity, N:M compression, structured pruning, checkpoints, errors.

Tiny random models (Llama and GPT-2) only, except the CLI test on the real SmolLM2 GGUF.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxinfer.bench import english_text
from jaxinfer.errors import InputError
from jaxinfer.loading import load_quantized, save_quantized
from jaxinfer.model import Model
from jaxinfer.quant import Int8Weight, NMSparseWeight, quantize
from jaxinfer.quant.calibration import collect_hessians
from jaxinfer.sparse import (
    compress_nm,
    prune_structured,
    sparsify,
    sparsity_report,
    structured_norms,
    wanda_sparsify,
)
from jaxinfer.sparse.masks import nm_mask, unstructured_mask
from jaxinfer.sparse.recipes import PruneSettings, check_prune_args, prune_model

CONFIG = models.LlamaConfig.tiny(d_model=32, n_heads=6, n_kv_heads=2, head_dim=8, d_ff=64,
                                 n_layers=2, qkv_bias=True, mlp_bias=True)
PROJ = ("layers/attn/q", "layers/attn/k", "layers/attn/v", "layers/attn/o", "layers/mlp/gate",
        "layers/mlp/up", "layers/mlp/down")


GPT2 = models.GPT2Config.tiny()  # D 32, F 128
GPT2_PROJ = ("layers/attn/qkv", "layers/attn/o", "layers/mlp/fc", "layers/mlp/proj")


def get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, models.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def gpt2():
    """A tiny random GPT-2 whose LayerNorm gains vary per feature (log-normal), as the inputs of
    real models' projections do, so that input norms matter to pruning."""
    params = jax.tree.map(np.array, models.init_params(GPT2, jax.random.key(0)))
    rng = np.random.default_rng(7)
    for name in ("ln1_scale", "ln2_scale"):
        params["layers"][name] = np.exp(rng.normal(size=(2, GPT2.d_model))).astype(np.float32)
    return Model(config=GPT2, params=params, tokenizer=None, source="tiny-gpt2")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 12))


# ----------------------------------------------------------------------------- masks


def test_unstructured_mask_removes_exactly_the_lowest_per_column():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 20, 7)).astype(np.float32)
    keep = unstructured_mask(scores, 8)
    assert (keep.sum(axis=-2) == 12).all()
    # every removed score is below every kept score of its column
    removed_max = np.where(keep, -np.inf, scores).max(axis=-2)
    kept_min = np.where(keep, scores, np.inf).min(axis=-2)
    assert (removed_max < kept_min).all()


def test_nm_mask_keeps_n_highest_of_every_group():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 16, 5)).astype(np.float32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        keep = nm_mask(scores, n, m)
        g = keep.reshape(2, 16 // m, m, 5)
        assert (g.sum(axis=-2) == n).all()
        sg = scores.reshape(2, 16 // m, m, 5)
        kept_min = np.where(g, sg, np.inf).min(-2)
        removed_max = np.where(g, -np.inf, sg).max(-2)
        assert (kept_min > removed_max).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.25, 0.75])
def test_magnitude_hits_sparsity_exactly_per_column(params, sparsity):
    out, masks = sparsify(params, method="magnitude", sparsity=sparsity, return_masks=True)
    assert set(masks) == set(PROJ)
    for path in PROJ:
        w = np.asarray(get(out, path))
        n_in = w.shape[-2]
        zeros = (w == 0).sum(axis=-2)
        assert (zeros == round(sparsity * n_in)).all(), path
        assert w.dtype == np.float32
        # kept weights are untouched, removed ones are the smallest in magnitude
        orig = np.asarray(get(params, path))
        np.testing.assert_array_equal(w[masks[path]], orig[masks[path]])
        kept_min = np.where(masks[path], np.abs(orig), np.inf).min(-2)
        removed_max = np.where(masks[path], -np.inf, np.abs(orig)).max(-2)
        assert (kept_min >= removed_max).all()
    # embeddings, norms and biases are left alone
    np.testing.assert_array_equal(out["embed"], params["embed"])
    np.testing.assert_array_equal(get(out, "layers/attn/q_bias"), get(params, "layers/attn/q_bias"))


def test_wanda_score_uses_input_norms(params):
    path = "layers/mlp/down"
    w = np.asarray(get(params, path))
    norms = np.ones(w.shape[:-1], np.float32)
    norms[:, :8] = 1000.0  # the first 8 inputs are loud: Wanda keeps all their weights
    out = sparsify(params, path, method="wanda", sparsity=0.5, norms={path: norms})
    pruned = np.asarray(get(out, path))
    assert (pruned[:, :8] != 0).all()
    assert ((pruned == 0).sum(-2) == w.shape[-2] // 2).all()
    mag = np.asarray(get(sparsify(params, path, method="magnitude", sparsity=0.5), path))
    assert not np.array_equal(mag == 0, pruned == 0)


def test_wanda_sparsify_calibrated_layer_by_layer(params):
    model = Model(config=CONFIG, params=params, tokenizer=None)
    calib = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (4, 16))
    out, masks = wanda_sparsify(model, calib, sparsity=0.5, progress=False, return_masks=True)
    for path in PROJ:
        w = np.asarray(get(out, path))
        assert ((w == 0).sum(-2) == w.shape[-2] // 2).all()
        np.testing.assert_array_equal(w != 0, masks[path])
    nm = wanda_sparsify(model, calib, n=2, m=4, progress=False)
    q = np.asarray(get(nm, "layers/attn/q")).reshape(2, 8, 4, -1)
    assert ((q != 0).sum(-2) == 2).all()


def test_wanda_sparsify_gpt2_beats_magnitude_on_calibration_inputs(gpt2):
    """GPT-2 (fused qkv): exact sparsity per column, and on layer 0 (whose inputs are the same
    for every pruning) Wanda's error on the calibration inputs is below magnitude pruning's:
    per column for the diag(H) part it minimises, and in total ||X W - X W'||^2."""
    calib = np.random.default_rng(2).integers(0, GPT2.vocab_size, (4, 16))
    out, masks = wanda_sparsify(gpt2, calib, sparsity=0.5, progress=False, return_masks=True)
    assert set(masks) == set(GPT2_PROJ)
    magnitude = sparsify(gpt2.params, method="magnitude", sparsity=0.5)
    hessians = collect_hessians(gpt2, calib)[0]
    site_of = {p: s for s, ps in models.input_sites(GPT2).items() for p in ps}
    for path in GPT2_PROJ:
        w = np.asarray(get(out, path))
        assert ((w == 0).sum(-2) == w.shape[-2] // 2).all(), path
        np.testing.assert_array_equal(w != 0, masks[path])
        h = hessians[site_of[path.removeprefix("layers/")]]
        w0 = np.asarray(get(gpt2.params, path)[0], np.float64)
        d_wanda, d_mag = w0 - w[0], w0 - np.asarray(get(magnitude, path)[0])
        diag = np.diag(h)[:, None]
        assert np.all((d_wanda ** 2 * diag).sum(0) <= (d_mag ** 2 * diag).sum(0) * (1 + 1e-5)), path
        e_wanda, e_mag = np.sum(d_wanda * (h @ d_wanda)), np.sum(d_mag * (h @ d_mag))
        assert e_wanda < e_mag, (path, e_wanda, e_mag)
    nm = wanda_sparsify(gpt2, calib, n=2, m=4, progress=False)
    qkv = np.asarray(get(nm, "layers/attn/qkv")).reshape(2, 8, 4, -1)
    assert ((qkv != 0).sum(-2) == 2).all()


# ----------------------------------------------------------------------------- N:M storage


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_compressed_nm_matmul_equals_dense_masked_matmul(params, n, m):
    pruned = sparsify(params, method="nm", n=n, m=m)
    compressed = compress_nm(pruned, n, m)
    rng = np.random.default_rng(3)
    for path in PROJ:
        dense = np.asarray(get(pruned, path))
        leaf = get(compressed, path)
        assert isinstance(leaf, NMSparseWeight) and leaf.shape == dense.shape
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), dense)
        x = rng.normal(size=(dense.shape[0], 3, dense.shape[1])).astype(np.float32)
        np.testing.assert_allclose(leaf.matmul(jnp.asarray(x)), x @ dense, atol=1e-5)
        x1 = x[0]
        np.testing.assert_allclose(jax.jit(lambda lf, v: lf.matmul(v))(leaf.layer(1), x1),
                                   x1 @ dense[1], atol=1e-5)
        # values + 4-bit indices: N/M of the floats plus half a byte per kept weight
        assert leaf.nbytes == dense.size * n // m * 4 + dense.size * n // m // 2


def test_compressed_model_forward_equals_masked_dense(params, tokens):
    pruned = sparsify(params, method="nm", n=2, m=4)
    compressed = compress_nm(pruned, 2, 4)
    dense = Model(config=CONFIG, params=pruned, tokenizer=None).logits(tokens)
    comp = Model(config=CONFIG, params=compressed, tokenizer=None).logits(tokens)
    np.testing.assert_allclose(comp, dense, atol=1e-4)
    assert sparsity_report(compressed)["layers/mlp/up"] == 0.5


def test_nm_plus_int8_composes(params, tokens):
    compressed = compress_nm(sparsify(params, method="nm", n=2, m=4), 2, 4)
    q = quantize(compressed, [("layers/**", "int8"), ("embed", "int8")])
    leaf = q["layers"]["mlp"]["down"]
    assert isinstance(leaf, NMSparseWeight) and leaf.values.dtype == jnp.int8
    assert isinstance(q["embed"], Int8Weight)
    dense = np.asarray(compressed["layers"]["mlp"]["down"].dequantize())
    deq = np.asarray(leaf.dequantize())
    assert ((deq == 0) == (dense == 0)).mean() > 0.999  # pattern kept (tiny values may round to 0)
    step = np.abs(dense).max(-2, keepdims=True) / 127
    assert (np.abs(deq - dense) <= step / 2 + 1e-7).all()
    ref = Model(config=CONFIG, params=compressed, tokenizer=None).logits(tokens)
    got = Model(config=CONFIG, params=q, tokenizer=None).logits(tokens)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(InputError, match="already quantized"):
        quantize(compressed, [("layers/mlp/down", "int4")])


def test_compress_refuses_a_dense_matrix(params):
    with pytest.raises(InputError, match="not 2:4 sparse"):
        compress_nm(params, 2, 4)


# ----------------------------------------------------------------------------- structured


def _zero_some(params, rng):
    """Copy of params with 16 FFN channels and one query head per KV group zeroed per layer
    (down rows / o rows: they contribute nothing). Returns (params, zeroed channels, heads)."""
    p = jax.tree.map(np.array, params)
    chans, heads = [], []
    for layer in range(CONFIG.n_layers):
        c = rng.choice(CONFIG.d_ff, 16, replace=False)
        p["layers"]["mlp"]["down"][layer, c, :] = 0
        hs = [g * 3 + int(rng.integers(3)) for g in range(CONFIG.n_kv_heads)]
        for h in hs:
            p["layers"]["attn"]["o"][layer, h * 8:(h + 1) * 8, :] = 0
        chans.append(set(c.tolist()))
        heads.append(hs)
    return p, chans, heads


def test_structured_removing_zero_channels_and_heads_keeps_outputs(params, tokens):
    p, _, _ = _zero_some(params, np.random.default_rng(4))
    model = Model(config=CONFIG, params=p, tokenizer=None)
    small = prune_structured(model, ffn_sparsity=0.25, head_sparsity=1 / 3)
    assert small.config.d_ff == 48 and small.config.n_heads == 4
    assert small.config.n_kv_heads == 2 and small.config.head_dim == 8
    assert get(small.params, "layers/attn/q").shape == (2, 32, 32)
    assert get(small.params, "layers/attn/q_bias").shape == (2, 32)
    assert get(small.params, "layers/mlp/down").shape == (2, 48, 32)
    np.testing.assert_allclose(small.logits(tokens), model.logits(tokens), atol=1e-5)


def test_structured_heads_respect_gqa_groups(params, tokens):
    """Removing a head that is NOT zero changes outputs, but every group keeps its heads and
    k/v are untouched; the calibrated score runs too."""
    model = Model(config=CONFIG, params=params, tokenizer=None)
    calib = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (2, 16))
    norms = structured_norms(model, calib, progress=False)
    assert norms[0]["down_in"].shape == (64,) and norms[0]["o_in"].shape == (48,)
    small = prune_structured(model, head_sparsity=1 / 3, norms=norms)
    assert small.config.n_heads == 4 and small.config.d_ff == 64
    np.testing.assert_array_equal(get(small.params, "layers/attn/k"), get(params, "layers/attn/k"))
    assert small.logits(tokens).shape == (2, 12, CONFIG.vocab_size)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_sparsity=0.9), "would remove all 3 heads of each KV group"),
    (dict(ffn_sparsity=0.999), "would remove all 64 FFN channels"),
    (dict(ffn_sparsity=0.001), "removes nothing"),
    (dict(ffn_sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(head_sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
])
def test_structured_bad_inputs(params, kwargs, message):
    model = Model(config=CONFIG, params=params, tokenizer=None)
    with pytest.raises(InputError, match=message):
        prune_structured(model, **kwargs)


def test_structured_gpt2_removes_ffn_channels(gpt2, tokens):
    """GPT-2's FFN channels (fc columns and bias, proj rows) go like Llama's: channels whose
    proj rows are zero leave the outputs as they are; the calibrated score runs too."""
    p = jax.tree.map(np.array, gpt2.params)
    rng = np.random.default_rng(4)
    for layer in range(GPT2.n_layers):
        p["layers"]["mlp"]["proj"][layer, rng.choice(GPT2.d_ff, 32, replace=False), :] = 0
    model = dataclasses.replace(gpt2, params=p)
    small = prune_structured(model, ffn_sparsity=0.25)
    assert small.config == dataclasses.replace(GPT2, d_ff=96)
    assert get(small.params, "layers/mlp/fc").shape == (2, 32, 96)
    assert get(small.params, "layers/mlp/fc_bias").shape == (2, 96)
    assert get(small.params, "layers/mlp/proj").shape == (2, 96, 32)
    np.testing.assert_array_equal(get(small.params, "layers/attn/qkv"), p["layers"]["attn"]["qkv"])
    np.testing.assert_allclose(small.logits(tokens), model.logits(tokens), atol=1e-5)
    norms = structured_norms(gpt2, np.random.default_rng(5).integers(0, 128, (2, 16)),
                             progress=False)
    assert norms[0]["down_in"].shape == (128,)
    calibrated = prune_structured(gpt2, ffn_sparsity=0.5, norms=norms)
    assert calibrated.config.d_ff == 64 and calibrated.logits(tokens).shape == (2, 12, 128)


def test_structured_refuses_gpt2_heads(gpt2):
    with pytest.raises(InputError, match="head pruning does not apply to the gpt2 family: its q, "
                                         "k and v are one fused projection"):
        prune_structured(gpt2, ffn_sparsity=0.5, head_sparsity=0.5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="magnitude", sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(method="magnitude", sparsity=-0.5), r"sparsity must be a number in \[0, 1\)"),
    (dict(method="nm", n=4, m=4), "N:M needs integers 1 <= N < M"),
    (dict(method="nm", n=2, m=5), "M=5 does not divide the input dimension 32"),
    (dict(method="wanda", sparsity=0.5), "needs input-feature norms"),
    (dict(method="random", sparsity=0.5), "unknown pruning method"),
])
def test_sparsify_bad_inputs(params, kwargs, message):
    with pytest.raises(InputError, match=message):
        sparsify(params, **kwargs)


def test_sparsify_refuses_quantized_and_unknown_patterns(params):
    with pytest.raises(InputError, match="prune before quantizing"):
        sparsify(quantize(params, scheme="int8"), method="magnitude", sparsity=0.5)
    with pytest.raises(InputError, match="match no weight matrix"):
        sparsify(params, ["layers/nothing"], method="magnitude", sparsity=0.5)


@pytest.mark.parametrize("settings, has_text, message", [
    (PruneSettings(method="wanda"), False, "needs calibration text"),
    (PruneSettings(method="nm", score="wanda"), False, "needs calibration text"),
    (PruneSettings(method="magnitude", recover_steps=5), False, "needs text to distil on"),
    (PruneSettings(method="nm", n=3, m=2), True, "N:M needs integers"),
    (PruneSettings(method="magnitude", head_sparsity=0.5), True, "structured only"),
    (PruneSettings(method="magnitude", quant="int4"), True, "int8"),
])
def test_prune_settings_checked_before_work(settings, has_text, message):
    with pytest.raises(InputError, match=message):
        check_prune_args(settings, has_text)


# ----------------------------------------------------------------------------- checkpoints


def _round_trip(model, path, tokens):
    save_quantized(model, path)
    loaded = load_quantized(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.logits(tokens), model.logits(tokens))
    return loaded


def test_pruned_checkpoints_reload_with_identical_logits(params, tokens, tmp_path):
    base = Model(config=CONFIG, params=params, tokenizer=None)
    magnitude, _ = prune_model(base, PruneSettings(method="magnitude", sparsity=0.5),
                               progress=False)
    _round_trip(magnitude, tmp_path / "magnitude", tokens)
    nm, report = prune_model(base, PruneSettings(method="nm", score="magnitude", quant="int8"),
                             progress=False)
    assert isinstance(nm.params["layers"]["mlp"]["up"], NMSparseWeight)
    assert report["weight_bytes"] < base.weight_bytes / 3
    loaded = _round_trip(nm, tmp_path / "nm-int8", tokens)
    assert isinstance(loaded.params["layers"]["mlp"]["up"], NMSparseWeight)
    structured, report = prune_model(base, PruneSettings(method="structured", sparsity=0.5),
                                     progress=False)
    assert report["d_ff"] == [64, 32]
    loaded = _round_trip(structured, tmp_path / "structured", tokens)
    assert loaded.config.d_ff == 32


# ----------------------------------------------------------------------------- CLI


def test_cli_prune_saves_a_checkpoint_generate_loads(capsys, tmp_path, smollm2_gguf_path):
    from jaxinfer.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(english_text()[:20_000], encoding="utf-8")
    out = tmp_path / "s25"
    code = main(["prune", "--model", str(smollm2_gguf_path), "--method", "structured",
                 "--sparsity", "0.25", "--calibration-file", str(text), "--calibration-samples",
                 "2", "--calibration-len", "64", "--json", "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["d_ff"] == [1536, 1152] and report["score"] == "wanda"
    code = main(["generate", "--model", str(out), "--no-compile-cache", "--prompt", "Hi", "--chat",
                 "--max-new-tokens", "4", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "magnitude", "--sparsity", "1.5"], "sparsity must be a number in [0, 1)"),
    (["--method", "nm", "--n", "4", "--m", "4"], "N:M needs integers 1 <= N < M"),
    (["--method", "wanda"], "needs calibration text"),
    (["--method", "structured", "--calibration-file", "CALIB", "--calibration-samples", "999"],
     "calibration text is too short"),
    # shape checks come before calibration (the short text would fail later)
    (["--method", "structured", "--head-sparsity", "0.9", "--calibration-file", "CALIB"],
     "would remove all 3 heads of each KV group"),
])
def test_cli_prune_bad_inputs(capsys, tmp_path, smollm2_gguf_path, extra, message):
    from jaxinfer.cli import main

    calib = tmp_path / "short.txt"
    calib.write_text("A short text. " * 20, encoding="utf-8")
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    out = tmp_path / "out"
    code = main(["prune", "--model", str(smollm2_gguf_path), *extra, "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()
