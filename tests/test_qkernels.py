"""The quantized-weight kernels (jaxinfer.kernels.NativeQuant, quant.cc) on every ISA this machine
runs: each format (int8 per channel, int4 group-wise symmetric and asymmetric, GGUF Q8_0 / Q4_0
/ Q4_1) against float64 on the same weights dequantized, row counts 1 to 17, several projections
and the SwiGLU gate in one call, the quantized tied head and its rows, params wrapping, and
generation with the kernels equal to generation without them (tiny models and the real SmolLM2
Q4_1 file)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize

import models
from jaxinfer import generate, kernels
from jaxinfer.generate import Request, generate_ids
from jaxinfer.model import Model
from jaxinfer.quant import Int4Weight, Int8Weight
from jaxinfer.quant.base import OUT_IN
from jaxinfer.quant.gguf_blocks import GGUFBlockWeight
from jaxinfer.sampling import Sampling


def _gguf(w: np.ndarray, kind: str, layout: str = "in_out") -> GGUFBlockWeight:
    """w [in, out] (in_out) or [rows, in] (out_in) in ggml's blocks, quantized by `gguf`."""
    rows = w.T if layout == "in_out" else w
    raw = quantize(np.ascontiguousarray(rows), GGMLQuantizationType[kind])
    return GGUFBlockWeight.from_raw(raw, kind, layout)


FORMATS = {  # name -> w [K, N] float32 -> quantized leaf (IN_OUT)
    "int8": lambda w: Int8Weight.from_float(jnp.asarray(w)),
    "int4_sym_g32": lambda w: Int4Weight.from_float(jnp.asarray(w), group_size=32),
    "int4_asym_g64": lambda w: Int4Weight.from_float(jnp.asarray(w), 64, symmetric=False),
    "int4_sym_g128": lambda w: Int4Weight.from_float(jnp.asarray(w), group_size=128),
    "Q8_0": lambda w: _gguf(w, "Q8_0"),
    "Q4_0": lambda w: _gguf(w, "Q4_0"),
    "Q4_1": lambda w: _gguf(w, "Q4_1"),
}


def _native(leaf, isa) -> kernels.NativeQuant:
    native = kernels.NativeQuant.from_rows(leaf.kernel_rows(), isa)
    np.testing.assert_array_equal(native.dequantize(), leaf.dequantize(jnp.float32))
    return native


def _close(got, ref, k):
    """Float32 accumulation against float64 on the same weights."""
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 * np.sqrt(k) * np.abs(ref).max() + 1e-6)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 2, 5, 17])
@pytest.mark.parametrize("k,n", [(256, 100), (128, 1)])
def test_quantized_matmul_matches_dequantized(fmt, m, k, n, isa):
    """x @ W on the kernel equals float64 x @ dequantize(W): the one-row path and the
    dequantize-then-block path (tails of row blocks and of panels, one column)."""
    rng = np.random.default_rng(m + k + n)
    leaf = FORMATS[fmt](rng.standard_normal((k, n)).astype(np.float32))
    native = _native(leaf, isa)
    assert native.shape == (k, n) and native.isa == isa
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(native.matmul)(x))
    _close(got, x.astype(np.float64) @ np.asarray(leaf.dequantize(jnp.float32), np.float64), k)


@pytest.mark.parametrize("m", range(1, 18))
def test_every_row_count(m, isa):
    """Row counts 1 .. 17 (every register-block tail) for the 4-bit format with minimums,
    K over one dequantized chunk (kChunk = 128 rows of k)."""
    rng = np.random.default_rng(m)
    k, n = 320, 61
    leaf = FORMATS["Q4_1"](rng.standard_normal((k, n)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(_native(leaf, isa).matmul)(x))
    _close(got, x.astype(np.float64) @ np.asarray(leaf.dequantize(jnp.float32), np.float64), k)


@pytest.mark.parametrize("m", [1, 9])
def test_quantized_many_and_glu(m, isa):
    """Several projections of one x (mixed formats) in one call, and silu(x Wg) * (x Wu), against
    float64; the calls really are the kernel's."""
    from models.layers import linear_many, swiglu

    rng = np.random.default_rng(m)
    k = 192
    leaves = [FORMATS[f](rng.standard_normal((k, n)).astype(np.float32))
              for f, n in (("Q4_1", 96), ("Q8_0", 7), ("int8", 130))]
    natives = [_native(leaf, isa) for leaf in leaves]
    x = rng.standard_normal((m, k)).astype(np.float32)
    fn = jax.jit(lambda x: linear_many(x, natives, [None] * 3))
    assert str(fn.lower(x).as_text()).count(kernels.target("qmatmul", isa)) == 1
    x64 = x.astype(np.float64)
    for y, leaf in zip(fn(x), leaves, strict=True):
        _close(np.asarray(y), x64 @ np.asarray(leaf.dequantize(jnp.float32), np.float64), k)
    gate, up = (FORMATS["int4_asym_g64"](rng.standard_normal((k, 1536)).astype(np.float32))
                for _ in range(2))
    ng, nu = _native(gate, isa), _native(up, isa)
    got = np.asarray(jax.jit(lambda x: swiglu(x, ng, nu))(x))
    g = x64 @ np.asarray(gate.dequantize(jnp.float32), np.float64)
    u = x64 @ np.asarray(up.dequantize(jnp.float32), np.float64)
    ref = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_dispatch_by_dtype(isa):
    """bfloat16 inputs, zero rows or more than MAX_KERNEL_ROWS rows (a prefill) run XLA's dot on
    the dequantized weight, other float32 rows the kernel; all agree."""
    rng = np.random.default_rng(0)
    native = _native(FORMATS["int4_sym_g32"](rng.standard_normal((64, 50)).astype(np.float32)),
                     isa)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    text = jax.jit(native.matmul).lower(x.astype(jnp.bfloat16)).as_text()
    assert kernels.target("qmatmul", isa) not in text
    y16 = native.matmul(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), native.matmul(x), rtol=0.05, atol=0.3)
    assert native.matmul(jnp.zeros((0, 64))).shape == (0, 50)
    long = jnp.asarray(rng.standard_normal((kernels.MAX_KERNEL_ROWS + 1, 64)), jnp.float32)
    assert kernels.target("qmatmul", isa) not in jax.jit(native.matmul).lower(long).as_text()
    np.testing.assert_allclose(native.matmul(long), long @ native.dequantize(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "Q8_0", "Q4_1"])
def test_quantized_tied_head_and_rows(kind, isa):
    """The tied embedding as the packed head: rows equal the leaf's own take_rows, and
    x @ table^T runs the kernel and equals float64 on the dequantized table."""
    rng = np.random.default_rng(1)
    v, d = 150, 64
    table = rng.standard_normal((v, d)).astype(np.float32)
    leaf = (Int8Weight.from_float(jnp.asarray(table), layout=OUT_IN) if kind == "int8"
            else _gguf(table, kind, layout=OUT_IN))
    emb = kernels.NativeQuantEmbedding(head=kernels.NativeQuant.from_rows(leaf.kernel_rows(),
                                                                          isa))
    tokens = jnp.asarray([[0, 47, 48, 149], [3, 3, 96, 100]])
    np.testing.assert_array_equal(emb.take_rows(tokens), leaf.take_rows(tokens))
    x = rng.standard_normal((2, 3, d)).astype(np.float32)
    got = np.asarray(jax.jit(emb.matmul_transposed)(x))
    ref = x.astype(np.float64) @ np.asarray(leaf.dequantize(jnp.float32), np.float64).T
    _close(got, ref, d)


def test_generation_with_quantized_kernels_equals_without(isa):
    """A tiny model quantized as `--quant int4` does it (int4 layers, int8 tied embedding):
    run_layout makes every quantized leaf (the tied head too) a kernel leaf; greedy tokens and
    log-probs equal the XLA path on the same quantized weights."""
    from jaxinfer.quant.recipes import quantize_model

    config = models.LlamaConfig.tiny(tie_embeddings=True)
    model = quantize_model(Model(config=config, params=models.init_params(config, jax.random.key(0)),
                                 tokenizer=None, source="tiny", eos_token_ids=()),
                           "int4", group_size=32)
    native = generate.run_layout(model.params, model.config)
    layer = native["layers"][0]
    assert all(isinstance(layer[a][w], kernels.NativeQuant)
               for a, w in (("attn", "q"), ("attn", "o"), ("mlp", "gate"), ("mlp", "down")))
    assert isinstance(native["embed"], kernels.NativeQuantEmbedding)
    assert kernels.attention_for(native, jnp.float32).keywords == {"isa": isa}
    prompts = [[1 + i, 5, 9, 2 + 3 * i][: 2 + i % 3] for i in range(3)]
    req = Request(prompts=prompts, sampling=[Sampling()], max_new_tokens=8, stop_token_ids=())
    with_kernel = generate_ids(model, req, logprobs=True, params=native)
    plain = generate.run_layout(model.params, model.config, native=False)
    without = generate_ids(model, req, logprobs=True, params=plain)
    for a, b in zip(with_kernel, without, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_smollm2_q4_1_kernels_equal_xla(smollm2_gguf_path):
    """The real SmolLM2 Q4_1 file kept packed (--quant native): greedy tokens with the
    quantized kernels equal the XLA packed path for 32 new tokens on several prompts."""
    import jaxinfer

    model = jaxinfer.load(smollm2_gguf_path, keep_packed=True, progress=False)
    native = generate.run_layout(model.params, model.config)
    assert isinstance(native["layers"][0]["mlp"]["down"], kernels.NativeQuant)
    assert isinstance(native["embed"], kernels.NativeQuantEmbedding)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village,"]
    req = Request(prompts=[model.tokenizer.encode(t) for t in texts], sampling=[Sampling()],
                  max_new_tokens=32, stop_token_ids=())
    with_kernel = generate_ids(model, req, params=native)
    plain = generate_ids(model, req, params=generate.run_layout(model.params, model.config,
                                                                 native=False))
    assert [c.token_ids for c in with_kernel] == [c.token_ids for c in plain]
