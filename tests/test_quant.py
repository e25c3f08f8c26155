"""Tests for jaxinfer.quant: quantized leaves, the quantize transform, GGUF blocks, checkpoints.

Random matrices and tiny models only, except one test on real tensors of the SmolLM2 GGUF.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

import models
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading import load_quantized, safetensors_io, save_quantized
from jaxinfer.loading import saved as ckpt
from jaxinfer.loading.gguf import GGUFFile, dequantize, unpermute_qk
from jaxinfer.model import Model
from jaxinfer.quant import (
    IN_OUT,
    OUT_IN,
    W8A8,
    GGUFBlockWeight,
    Int4,
    Int4Weight,
    Int8,
    Int8Weight,
    W8A8Weight,
    dequantize_params,
    pack_nibbles,
    parse_scheme,
    quantize,
    stack_leaves,
    unpack_nibbles,
    weight_bytes,
)
from jaxinfer.quant import base as quant_base
from jaxinfer.quant.int8 import quantize_activations

forward = jax.jit(models.forward, static_argnums=0)


def rand(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def close(a, b, atol=1e-4, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


_JITTED = {}


def call(leaf, method, *args):
    """leaf.<method>(*args) under jit (one compile instead of one per eager op)."""
    if method not in _JITTED:
        _JITTED[method] = jax.jit(lambda lf, *a: getattr(lf, method)(*a))
    return _JITTED[method](leaf, *args)


# ----------------------------------------------------------------------------- packing


def test_pack_nibbles_known_example_and_round_trip():
    col = np.array([[1], [2], [3], [15]], np.uint8)  # one column of an IN_OUT weight
    packed = np.asarray(pack_nibbles(col, axis=-2))
    assert packed.dtype == np.uint8 and packed.tolist() == [[0x21], [0xF3]]
    assert np.asarray(pack_nibbles(col.T, axis=-1)).tolist() == [[0x21, 0xF3]]
    assert np.asarray(unpack_nibbles(packed, axis=-2)).tolist() == col.tolist()
    q = np.random.default_rng(0).integers(0, 16, (3, 64, 35)).astype(np.uint8)
    for axis in (-2, -1):
        p = pack_nibbles(q if axis == -2 else q.swapaxes(-1, -2), axis)
        back = np.asarray(unpack_nibbles(p, axis))
        assert np.array_equal(back, q if axis == -2 else q.swapaxes(-1, -2))
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(q[:, :3], axis=-2)


def test_int4_storage_is_packed_nibbles():
    w = rand((64, 5))
    leaf = Int4Weight.from_float(w, group_size=32)
    assert leaf.values.shape == (32, 5) and leaf.values.dtype == jnp.uint8
    assert leaf.scales.shape == (2, 5) and leaf.scales.dtype == jnp.float16
    assert leaf.nbytes == 32 * 5 + 2 * 5 * 2
    q = np.asarray(leaf.unpacked())
    assert np.array_equal(q[0::2] | (q[1::2] << 4), np.asarray(leaf.values))


# ----------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("layout", [IN_OUT, OUT_IN])
def test_int8_error_within_half_a_step_per_channel(layout):
    w = rand((96, 35), seed=1)
    leaf = Int8Weight.from_float(w, layout=layout)
    in_axis = 0 if layout == IN_OUT else 1
    assert leaf.values.dtype == jnp.int8 and leaf.scales.shape == (w.shape[1 - in_axis],)
    assert int(jnp.max(jnp.abs(leaf.values.astype(jnp.int32)))) == 127  # the extreme hits 127
    err = jnp.abs(leaf.dequantize() - w)
    bound = jnp.expand_dims(leaf.scales, in_axis) / 2
    assert bool(jnp.all(err <= bound * (1 + 1e-5) + 1e-7))
    assert leaf.dequantize().shape == w.shape and leaf.dequantize().dtype == jnp.float32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_within_half_a_step_per_group(group_size, symmetric):
    w = rand((2, 256, 19), seed=2)  # stacked: 2 layers
    leaf = Int4Weight.from_float(w, group_size=group_size, symmetric=symmetric)
    groups = 256 // group_size
    assert leaf.shape == w.shape and leaf.scales.shape == (2, groups, 19)
    assert (leaf.mins is None) == symmetric
    err = (leaf.dequantize() - w).reshape(2, groups, group_size, 19)
    step = leaf.scales.astype(jnp.float32)[:, :, None, :]
    assert bool(jnp.all(jnp.abs(err) <= step / 2 * (1 + 1e-5) + 1e-6))
    # groups never span layers: the stacked leaf equals quantizing each layer alone
    for i in range(2):
        alone = Int4Weight.from_float(w[i], group_size=group_size, symmetric=symmetric)
        assert np.array_equal(np.asarray(leaf.layer(i).values), np.asarray(alone.values))
        close(leaf.layer(i).dequantize(), alone.dequantize(), atol=0, rtol=0)


def test_int4_zero_and_constant_groups():
    w = jnp.zeros((64, 3)).at[32:, 1].set(0.25)
    for symmetric in (True, False):
        deq = Int4Weight.from_float(w, 32, symmetric).dequantize()
        assert not np.any(np.asarray(deq)[w == 0])  # all-zero groups stay exactly zero
        close(deq, w, atol=0.25 / 7 / 2)
    with pytest.raises(ValueError, match="divide"):
        Int4Weight.from_float(rand((96, 4)), group_size=64)
    with pytest.raises(ValueError, match="NaN"):
        Int8Weight.from_float(jnp.full((4, 4), jnp.nan))


# ----------------------------------------------------------------------------- matmul paths

LEAVES = {
    "int8": lambda w, layout: Int8Weight.from_float(w, layout=layout),
    "int4_sym": lambda w, layout: Int4Weight.from_float(w, 32, True, layout=layout),
    "int4_asym": lambda w, layout: Int4Weight.from_float(w, 32, False, layout=layout),
    "w8a8": lambda w, layout: W8A8Weight.from_float(w, layout=layout),
}


def quantized_input(name, x):
    """What the leaf's fast path multiplies: x itself, or for w8a8 its int8 round trip."""
    if name != "w8a8":
        return x
    qx, sx = quantize_activations(x)
    return qx.astype(jnp.float32) * sx


@pytest.mark.parametrize("name", list(LEAVES))
def test_matmul_equals_dequantized_float_matmul(name):
    """Odd shapes (in=96, out=35), batch dims, both layouts, stacked leaves and slices, 1-D x."""
    x = rand((2, 3, 96), seed=3)
    xq = quantized_input(name, x)
    w = rand((96, 35), seed=4)
    leaf = LEAVES[name](w, IN_OUT)
    assert leaf.shape == (96, 35)
    deq = leaf.dequantize()
    close(call(leaf, "matmul", x), xq @ deq)
    close(call(leaf, "matmul", x[0, 0]), xq[0, 0] @ deq)  # 1-D x
    # fallbacks of an IN_OUT leaf: x @ P^T and row gathers
    y = rand((2, 3, 35), seed=5)
    close(call(leaf, "matmul_transposed", y), y @ deq.T)
    tokens = jnp.array([[0, 95, 7], [3, 3, 1]])
    close(call(leaf, "take_rows", tokens), deq[tokens], atol=0)
    # OUT_IN (embedding tables): rows, the tied head, and the generic matmul
    table = LEAVES[name](w.T, OUT_IN)  # [35, 96]
    assert table.shape == (35, 96)
    tdeq = table.dequantize()
    close(call(table, "matmul_transposed", x), xq @ tdeq.T)
    close(call(table, "take_rows", tokens % 35), tdeq[tokens % 35], atol=0)
    close(call(table, "matmul", y), y @ tdeq)
    # stacked leaf [L, in, out]: like x @ dequantize() with numpy broadcasting; slices match
    stacked = LEAVES[name](rand((3, 96, 35), seed=6), IN_OUT)
    xs = rand((3, 4, 96), seed=7)
    out = call(stacked, "matmul", xs)
    close(out, quantized_input(name, xs) @ stacked.dequantize())
    close(call(stacked.layer(1), "matmul", xs[1]), out[1], atol=1e-5)


def test_leaf_types_of_equal_shapes_have_distinct_tree_structures():
    """jit keys its programs by tree structure: an Int8Weight and a W8A8Weight with the same
    fields, shapes and static values must not share one (structures registered through
    jax.tree_util.register_dataclass compare equal across classes; models.pytree's do not)."""
    w = rand((96, 35), seed=4)
    a, b = Int8Weight.from_float(w), W8A8Weight.from_float(w)
    assert jax.tree.structure(a) != jax.tree.structure(b)
    assert jax.tree.structure(a) == jax.tree.structure(Int8Weight.from_float(w * 2))
    traced = []
    f = jax.jit(lambda leaf, x: traced.append(type(leaf)) or leaf.matmul(x))
    x = rand((4, 96), seed=7)
    close(f(a, x), a.matmul(x), atol=1e-5)
    close(f(b, x), b.matmul(x), atol=1e-5)
    assert traced == [Int8Weight, W8A8Weight]
    assert not np.allclose(np.asarray(f(a, x)), np.asarray(f(b, x)), atol=1e-3)  # they differ


def test_w8a8_is_an_exact_integer_dot():
    x = rand((2, 5, 64), seed=8)
    w = rand((64, 33), seed=9)
    leaf = W8A8Weight.from_float(w)
    qx, sx = quantize_activations(x)
    acc = np.asarray(qx, np.int64) @ np.asarray(leaf.values, np.int64)
    expected = acc * np.asarray(sx) * np.asarray(leaf.scales)
    close(call(leaf, "matmul", x), expected, atol=1e-5, rtol=1e-5)
    hlo = jax.jit(lambda lf, a: lf.matmul(a)).lower(leaf, x).as_text()
    assert "i32" in hlo and "dot_general" in hlo


def test_big_matrices_are_contracted_in_chunks(monkeypatch):
    """Chunked contraction (CPU, big matrices) equals contracting the whole matrix."""
    monkeypatch.setattr(quant_base, "CHUNK_ELEMS", 256)  # make a 96 x 64 matrix "big"
    x = rand((2, 3, 96), seed=20)
    w = rand((96, 64), seed=21)
    raw = gguf_bytes(w.T, "Q4_1")
    leaves = [cls(w, IN_OUT) for cls in LEAVES.values()] + [cls(w.T, OUT_IN) for cls in LEAVES.values()]
    leaves += [GGUFBlockWeight.from_raw(raw, "Q4_1"), GGUFBlockWeight.from_raw(raw, "Q4_1", OUT_IN)]
    for leaf in leaves:
        assert leaf._chunk_plan() > 1
        op = "matmul" if leaf.layout == IN_OUT else "matmul_transposed"
        got, whole = jax.jit(lambda lf, a, op=op: (getattr(lf, op)(a), lf._contract(a)))(leaf, x)
        close(got, whole, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- GGUF blocks

KINDS = ["Q8_0", "Q4_0", "Q4_1"]


def gguf_bytes(w, kind):
    return gguf_quantize(np.asarray(w, np.float32), GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_blocks_match_reference_dequantization(kind):
    rows = np.random.default_rng(10).standard_normal((48, 96)).astype(np.float32)  # (out, in)
    raw = gguf_bytes(rows, kind)
    floats = dequantize(raw, kind).reshape(48, 96)
    leaf = GGUFBlockWeight.from_raw(raw, kind)  # a projection: param [in, out] = rows^T
    assert np.array_equal(leaf.to_raw(), raw)  # kept bit for bit
    assert leaf.nbytes == raw.nbytes and leaf.shape == (96, 48)
    close(leaf.dequantize(), floats.T, atol=0, rtol=0)
    x = rand((2, 3, 96), seed=11)
    close(call(leaf, "matmul", x), x @ floats.T)
    # as an embedding table [V=48, D=96]: rows and the tied head
    table = GGUFBlockWeight.from_raw(raw, kind, layout=OUT_IN)
    tokens = jnp.array([[0, 47, 3]])
    close(call(table, "take_rows", tokens), floats[np.asarray(tokens)], atol=0)
    close(call(table, "matmul_transposed", x), x @ floats.T)
    # row permutation (llama.cpp's Q/K order) and stacking
    perm_leaf = leaf.unpermute_qk(n_head=4)
    close(perm_leaf.dequantize(), unpermute_qk(floats, 4).T, atol=0)
    stacked = stack_leaves([leaf, perm_leaf])
    assert stacked.shape == (2, 96, 48)
    close(call(stacked, "matmul", x[:1]),
          np.stack([x[0] @ floats.T, x[0] @ unpermute_qk(floats, 4).T]))
    close(call(stacked.layer(1), "matmul", x), x @ unpermute_qk(floats, 4).T)
    with pytest.raises(ValueError):
        GGUFBlockWeight.from_raw(raw[:, :-1], kind)


def test_gguf_blocks_on_real_smollm2_tensors(smollm2_gguf_path):
    f = GGUFFile(smollm2_gguf_path)
    n_heads = int(f.metadata["llama.attention.head_count"])
    x = rand((1, 3, 576), seed=12)
    for name in ("blk.3.ffn_up.weight", "blk.5.ffn_down.weight", "blk.0.attn_q.weight"):
        kind = f.tensor_type(name)
        leaf = GGUFBlockWeight.from_raw(f.raw(name), kind)
        w = f.load(name)  # (out, in)
        if name.endswith("attn_q.weight"):
            leaf, w = leaf.unpermute_qk(n_heads), unpermute_qk(w, n_heads)
        xin = x if w.shape[1] == 576 else rand((1, 3, w.shape[1]), seed=13)
        close(call(leaf, "matmul", xin), xin @ w.T, atol=2e-4, rtol=1e-4)
    emb = GGUFBlockWeight.from_raw(f.raw("token_embd.weight"), f.tensor_type("token_embd.weight"),
                                   layout=OUT_IN)
    assert emb.kind == "Q8_0" and emb.shape == (49152, 576)
    ids = jnp.array([[1, 2, 49151]])
    rows = f.load("token_embd.weight")[np.asarray(ids)]
    close(call(emb, "take_rows", ids), rows, atol=0)


# ----------------------------------------------------------------------------- the transform

LLAMA = models.LlamaConfig.tiny(d_model=64, head_dim=16, d_ff=128, qkv_bias=True,
                                tie_embeddings=True)
GPT2 = models.GPT2Config.tiny()


init_params = jax.jit(models.init_params, static_argnums=0)  # one compile, not one per op


@pytest.fixture(scope="module")
def llama_params():
    return init_params(LLAMA, jax.random.key(0))


@pytest.fixture(scope="module")
def gpt2_params():
    return init_params(GPT2, jax.random.key(1))


def logits(config, params, t=6):
    tokens = jnp.arange(1, t + 1)[None] * 7 % config.vocab_size
    return forward(config, params, tokens, jnp.arange(t)[None])[0]


def test_default_rules_quantize_projections_only(llama_params, gpt2_params):
    q = quantize(llama_params, scheme=Int8())
    layers = q["layers"]
    for name in ("q", "k", "v", "o"):
        assert isinstance(layers["attn"][name], Int8Weight)
        assert layers["attn"][name].shape == llama_params["layers"]["attn"][name].shape
    for name in ("gate", "up", "down"):
        assert isinstance(layers["mlp"][name], Int8Weight)
    for path in (("embed",), ("final_norm",), ("layers", "attn_norm"), ("layers", "attn", "q_bias")):
        a, b = q, llama_params
        for k in path:
            a, b = a[k], b[k]
        assert a is b  # untouched, not even copied
    g = gpt2_params
    qg = quantize(g, scheme="w8a8")
    for group, name in (("attn", "qkv"), ("attn", "o"), ("mlp", "fc"), ("mlp", "proj")):
        assert isinstance(qg["layers"][group][name], W8A8Weight)
        assert qg["layers"][group][name + "_bias"] is g["layers"][group][name + "_bias"]
    assert all(qg[k] is g[k] for k in ("wte", "wpe", "ln_f_scale", "ln_f_bias"))
    with pytest.raises(InputError, match="int4 group size 128 does not divide the input dim"):
        quantize(g, scheme="int4")  # d_model 32


def test_quantized_forward_under_scan_close_to_float(llama_params):
    ref = logits(LLAMA, llama_params)
    errors = {}
    for name, s in {"int8": Int8(), "w8a8": W8A8(), "int4": Int4(32)}.items():
        q = quantize(llama_params, [("layers/**", s), ("embed", s)])
        out = logits(LLAMA, q)
        errors[name] = float(jnp.max(jnp.abs(out - ref)))
        assert np.isfinite(errors[name])
    assert errors["int8"] < 0.02 and errors["w8a8"] < 0.05
    assert errors["int4"] < 0.5
    assert errors["int8"] < errors["int4"] / 4


def test_quantized_cached_decode_matches_full_forward(llama_params):
    q = quantize(llama_params, [("layers/**", Int4(32)), ("embed", Int8())])
    tokens = jnp.array([[3, 9, 27, 81 % 128, 5]])
    positions = jnp.arange(5)[None]
    full = forward(LLAMA, q, tokens, positions)[0]
    cache = models.init_cache(LLAMA, 1, 8)
    out, cache = forward(LLAMA, q, tokens[:, :3], positions[:, :3], cache)
    close(out, full[:, :3], atol=1e-4)
    for t in (3, 4):
        out, cache = forward(LLAMA, q, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        close(out[:, 0], full[:, t], atol=1e-4)


def test_gpt2_quantized_with_tied_embedding(gpt2_params):
    params = gpt2_params
    q = quantize(params, [("layers/*/*", Int4(32)), ("{wte,wpe}", Int8())])
    assert isinstance(q["wte"], Int8Weight) and q["wte"].layout == OUT_IN
    assert not isinstance(q["layers"]["attn"]["qkv_bias"], Int4Weight)
    close(logits(GPT2, q), logits(GPT2, dequantize_params(q)), atol=1e-4)
    assert float(jnp.max(jnp.abs(logits(GPT2, q) - logits(GPT2, params)))) < 0.5
    assert weight_bytes(q) < 0.4 * weight_bytes(params)


def test_dequantize_params_and_weight_bytes(llama_params):
    q = quantize(llama_params, [("layers/mlp/*", Int4(32)), ("layers/attn/{q,k,v,o}", Int8()),
                                ("embed", Int8())])
    back = dequantize_params(q)
    assert jax.tree.structure(back) == jax.tree.structure(llama_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(llama_params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        close(a, b, atol=0.01)
    up = llama_params["layers"]["mlp"]["up"]
    assert q["layers"]["mlp"]["up"].nbytes == up.size // 2 + up.size // 32 * 2
    assert weight_bytes(q) == sum(x.nbytes for x in jax.tree.leaves(q))
    assert weight_bytes(q) < 0.35 * weight_bytes(llama_params)


def test_bad_quantize_inputs_raise_input_error(llama_params):
    with pytest.raises(InputError, match="unknown quantization scheme 'int3'"):
        quantize(llama_params, scheme="int3")
    with pytest.raises(InputError, match="unknown quantization scheme"):
        parse_scheme("fp8")
    with pytest.raises(InputError, match="group size"):
        parse_scheme("int8", group_size=32)
    with pytest.raises(InputError, match=r"layers/mlp/down: int4 group size 256 does not divide"):
        quantize(llama_params, [("layers/mlp/*", Int4(256))])  # d_ff = 128
    with pytest.raises(InputError, match="positive even"):
        Int4(group_size=33)
    with pytest.raises(InputError, match=r"'layers/ffn/\*' match no weight matrix"):
        quantize(llama_params, [("layers/attn/*", Int8()), ("layers/ffn/*", Int8())])
    with pytest.raises(InputError, match="match no weight matrix"):
        quantize(llama_params, [("layers/attn_norm", Int8())])  # a norm is not a matrix
    with pytest.raises(InputError, match="not both"):
        quantize(llama_params, [("embed", Int8())], scheme=Int8())
    with pytest.raises(InputError, match="rules or a scheme"):
        quantize(llama_params)
    with pytest.raises(InputError, match="bad rule pattern"):
        quantize(llama_params, [("layers/{attn", Int8())])
    once = quantize(llama_params, scheme=Int8())
    with pytest.raises(InputError, match="already quantized"):
        quantize(once, scheme=Int8())


def test_rule_order_and_globs(llama_params):
    q = quantize(llama_params, {"layers/attn/o": None, "layers/attn/?": Int4(32),
                                "**/down": "int8"})
    attn = q["layers"]["attn"]
    assert isinstance(attn["q"], Int4Weight) and isinstance(attn["v"], Int4Weight)
    assert isinstance(attn["o"], jax.Array)  # the first rule keeps it float
    assert isinstance(q["layers"]["mlp"]["down"], Int8Weight)
    assert isinstance(q["layers"]["mlp"]["up"], jax.Array)


def test_weight_leaves_are_pytrees_with_static_metadata(llama_params):
    leaf = quantize(llama_params, scheme=Int4(32, False))["layers"]["attn"]["q"]
    children, treedef = jax.tree.flatten(leaf)
    assert len(children) == 3 and all(c.shape[0] == LLAMA.n_layers for c in children)
    assert jax.tree.unflatten(treedef, children).group_size == 32
    assert leaf.layer(0).shape == leaf.shape[1:]


# ----------------------------------------------------------------------------- checkpoints


def tiny_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers

    from jaxinfer.tokenizer import Tokenizer

    words = ["<unk>", "<s>", "</s>", "<|im_end|>", "hello", "world", "a", "b"]
    backend = Backend(tm.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}"
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=(2,), unk_token_id=0,
                     chat_template=template, add_bos_token=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama_params):
    q = quantize(llama_params, [("layers/mlp/*", Int4(32, False)), ("layers/attn/*", W8A8()),
                                ("embed", Int8())])
    model = Model(config=LLAMA, params=q, tokenizer=tiny_tokenizer(), source="test",
                  eos_token_ids=(2, 3))
    out = tmp_path_factory.mktemp("ckpt") / "tiny-q"
    save_quantized(model, out)
    return model, out


def test_save_load_round_trip_identical_logits(saved):
    model, out = saved
    loaded = load_quantized(out)
    assert loaded.config == LLAMA
    ids = [[1, 4, 5, 6, 7, 2]]
    assert np.array_equal(loaded.logits(ids), model.logits(ids))
    assert type(loaded.params["layers"]["mlp"]["up"]) is Int4Weight
    assert type(loaded.params["layers"]["attn"]["q_bias"]) is type(model.params["layers"]["attn"]["q_bias"])
    assert loaded.eos_token_ids == (2, 3)
    tok, ref = loaded.tokenizer, model.tokenizer
    assert tok.encode("hello world b") == ref.encode("hello world b") == [4, 5, 7]
    assert (tok.bos_token_id, tok.add_bos_token, tok.eos_token_id) == (1, True, 2)
    assert 3 in tok.eos_token_ids  # <|im_end|> ends generation
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    desc = json.loads((out / "quantization.json").read_text())["params"]
    assert desc["layers/mlp/up"]["scheme"] == {"name": "int4", "group_size": 32, "symmetric": False}
    assert desc["layers/attn/q"]["type"] == "W8A8Weight"
    assert desc["layers/attn/q_bias"]["type"] == "array"


def test_gpt2_round_trip_without_tokenizer(tmp_path, gpt2_params):
    params = quantize(gpt2_params, [("layers/**", Int4(32)), ("wte", Int4(32))])
    model = Model(config=GPT2, params=params, tokenizer=None, eos_token_ids=())
    save_quantized(model, tmp_path / "g")
    loaded = load_quantized(tmp_path / "g")
    assert loaded.tokenizer is None and loaded.eos_token_ids == ()
    assert np.array_equal(loaded.logits([[1, 2, 3]]), model.logits([[1, 2, 3]]))
    with pytest.raises(InputError, match="already exists"):
        save_quantized(model, tmp_path / "g")
    save_quantized(model, tmp_path / "g", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp dirs left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, saved):
    model, _ = saved

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_description(path, fn):
    data = json.loads((path / "quantization.json").read_text())
    fn(data["params"])
    (path / "quantization.json").write_text(json.dumps(data))


@pytest.mark.parametrize("damage, message", [
    ("delete_description", "quantization.json: file not found"),
    ("corrupt_description", "quantization.json: not valid JSON"),
    ("missing_tensor", "missing tensor 'layers/mlp/up.scales'"),
    ("wrong_shape", "tensor 'layers/attn/k.values' is int8"),
    ("unknown_type", "unknown leaf type 'Int3Weight'"),
    ("inconsistent_static", "inconsistent Int4Weight"),
    ("missing_param", "missing: \\['final_norm'\\]"),
])
def test_damaged_checkpoint_raises_checkpoint_error(saved, tmp_path, damage, message):
    _, src = saved
    path = copy_checkpoint(src, tmp_path / "c")
    if damage == "delete_description":
        (path / "quantization.json").unlink()
    elif damage == "corrupt_description":
        (path / "quantization.json").write_text("{not json")
    elif damage == "missing_tensor":
        f = safetensors_io.SafetensorsFile(src / "model.safetensors")
        tensors = {n: np.array(f.get(n)) for n in f.names() if n != "layers/mlp/up.scales"}
        safetensors_io.write_safetensors(path / "model.safetensors", tensors)
    elif damage == "wrong_shape":
        edit_description(path, lambda p: p["layers/attn/k"]["children"]["values"].update(
            shape=[2, 64, 31]))
    elif damage == "unknown_type":
        edit_description(path, lambda p: p["layers/mlp/up"].update(type="Int3Weight"))
    elif damage == "inconsistent_static":
        edit_description(path, lambda p: p["layers/mlp/up"]["static"].update(group_size=48))
    elif damage == "missing_param":
        edit_description(path, lambda p: p.pop("final_norm"))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_config_with_rope_scaling_and_windows_round_trips(tmp_path):
    config = models.LlamaConfig.tiny(
        rope_scaling=models.RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0),
        sliding_windows=(4, None), qkv_bias=True)
    model = Model(config=config, params=None, tokenizer=None, eos_token_ids=(7,))
    (tmp_path / ckpt.CONFIG).write_text(json.dumps(ckpt._config_json(model)))
    assert ckpt.config_from_json(tmp_path / ckpt.CONFIG) == (config, (7,))
    (tmp_path / ckpt.CONFIG).write_text(json.dumps({"family": "t5", "config": {}}))
    with pytest.raises(CheckpointError, match="unknown model family 't5'"):
        ckpt.config_from_json(tmp_path / ckpt.CONFIG)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_quantized(tmp_path / "nowhere")
