"""The quantized-weight kernels (jaxinfer.kernels.NativeQuant, quant.cc) on every ISA this machine
runs: each format (int8 per channel, int4 group-wise symmetric and asymmetric, GGUF Q8_0 / Q4_0
/ Q4_1) against float64 on the same weights dequantized (4-bit formats: with the activations
quantized per block of 32 in numpy, as the kernels take them), row counts 1 to 17, several
projections and the SwiGLU gate in one call, the quantized tied head and its rows, params
wrapping, and generation with the kernels against generation without them (a tiny model; the
real SmolLM2 Q4_1 file: tokens and perplexity)."""

from __future__ import annotations

import shutil
import subprocess

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


def _q8(x: np.ndarray) -> np.ndarray:
    """x [..., K] quantized per block of 32 inputs as the 4-bit kernels do (float32 steps:
    d = max |x| / 127, x -> d * round(x * (127 / max |x|))), returned as float64."""
    b = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(b * inv), -127, 127)
    return (xq * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)


def test_integer_dot_products_of_each_isa(isa):
    """Each ISA's library is its own (avx512vnni too: built, cached and registered under its
    own targets), and the 4-bit kernels' integer dot products use that ISA's instructions:
    VNNI's vpdpbusd in avx512vnni only, maddubs elsewhere."""
    assert kernels.isa() == isa and kernels.describe().startswith(f"native CPU kernels: {isa} (")
    lib = kernels.build(isa)
    assert kernels._library(isa).JaxinferIsa() == isa.encode()
    if shutil.which("objdump"):
        text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
        assert ("zmm" in text) == isa.startswith("avx512")
        assert ("vpdpbusd" in text) == (isa == "avx512vnni")
        assert ("vpmaddubsw" in text) == (isa != "avx512vnni")


def _ref(x, leaf, native) -> np.ndarray:
    """float64 x @ dequantize(leaf), x as the kernel takes it for this leaf's bit width."""
    xr = _q8(x) if native.bits == 4 else np.asarray(x, np.float64)
    return xr @ np.asarray(leaf.dequantize(jnp.float32), np.float64)


def test_q8_activations_definition():
    """kernels.q8_activations (the XLA side of the 4-bit weights) is the numpy definition."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.float32(3)
    x[1, 32:64] = 0  # an all-zero block
    np.testing.assert_array_equal(np.asarray(kernels.q8_activations(jnp.asarray(x))),
                                  _q8(x).astype(np.float32))


@pytest.mark.parametrize("m", [1, 6])
def test_kernel_quantizes_activations_as_defined(m, isa):
    """The 4-bit kernel's own quantization of x (vectorized in quant.cc) is the numpy
    definition, bit for bit: against the identity as a 4-bit weight (q 1 on the diagonal,
    scale 1, min 0), the kernel returns d * xq itself. Rows include an all-zero block, exact
    ties (x * 127 / max |x| = j + 0.5, rounded to even) and a block whose largest entry is
    negative."""
    from jaxinfer.quant.base import KernelRows

    k = 96
    eye = np.eye(k, dtype=np.uint8)
    rows = KernelRows(q=eye, scales=np.ones((k, k // 32), np.float16),
                      mins=np.zeros((k, k // 32), np.float16), group=32)
    native = kernels.NativeQuant.from_rows(rows, isa)
    rng = np.random.default_rng(m)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, 32:64] = 0
    x[-1, 64:96] = np.arange(32, dtype=np.float32) - 15.5  # ties j + 0.5 ...
    x[-1, 64] = -127.0  # ... as max |x| = 127 (a negative entry) makes x * 127 / max |x| = x
    got = np.asarray(jax.jit(native.matmul)(x))
    np.testing.assert_array_equal(got, _q8(x).astype(np.float32))


def _close(got, ref, k):
    """Float32 accumulation against float64 on the same weights."""
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 * np.sqrt(k) * np.abs(ref).max() + 1e-6)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 2, 5, 17])
@pytest.mark.parametrize("k,n", [(256, 100), (128, 1)])
def test_quantized_matmul_matches_dequantized(fmt, m, k, n, isa):
    """x @ W on the kernel equals float64 x @ dequantize(W) (x quantized per block for 4-bit
    weights): the one-row paths and the several-row paths (tails of row blocks and of panels,
    one column)."""
    rng = np.random.default_rng(m + k + n)
    leaf = FORMATS[fmt](rng.standard_normal((k, n)).astype(np.float32))
    native = _native(leaf, isa)
    assert native.shape == (k, n) and native.isa == isa
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(jax.jit(native.matmul)(x))
    _close(got, _ref(x, leaf, native), k)


@pytest.mark.parametrize("m", range(1, 18))
def test_every_row_count(m, isa):
    """Row counts 1 .. 17 for the 4-bit format with minimums and for Q8_0 (every register-block
    tail; K over one dequantized chunk, kChunk = 128 rows of k). A 4-bit row's result does not
    depend on the other rows of the call (row blocks of 4 and their tails of 1 to 3): the
    first, a middle and the last row each equal that row alone, bit for bit."""
    rng = np.random.default_rng(m)
    k, n = 320, 61
    for fmt in ("Q4_1", "Q8_0"):
        leaf = FORMATS[fmt](rng.standard_normal((k, n)).astype(np.float32))
        native = _native(leaf, isa)
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = np.asarray(jax.jit(native.matmul)(x))
        _close(got, _ref(x, leaf, native), k)
        if native.bits == 4:
            for i in sorted({0, m // 2, m - 1}):
                alone = np.asarray(jax.jit(native.matmul)(x[i:i + 1]))
                np.testing.assert_array_equal(got[i:i + 1], alone)


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
    for y, leaf, native in zip(fn(x), leaves, natives, strict=True):
        _close(np.asarray(y), _ref(x, leaf, native), k)
    gate, up = (FORMATS["int4_asym_g64"](rng.standard_normal((k, 1536)).astype(np.float32))
                for _ in range(2))
    ng, nu = _native(gate, isa), _native(up, isa)
    got = np.asarray(jax.jit(lambda x: swiglu(x, ng, nu))(x))
    g, u = _ref(x, gate, ng), _ref(x, up, nu)
    ref = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["int8", "int4_asym_g64", "Q4_1"])
def test_stacked_quantized_weights_are_read_at_the_layer_index(fmt, isa):
    """A stacked quantized leaf [L, K, N] becomes one NativeQuant stack (`native_params`),
    which read at a traced layer index (as the scan over the layers reads it) gives each
    layer's own kernel leaf's results bit for bit: one projection, several in one call, the
    SwiGLU gate, and the dequantized weight."""
    from jaxinfer.quant.base import stack_leaves
    from models.layers import at_layer, linear, linear_many, swiglu

    rng = np.random.default_rng(3)
    layers, k, m = 3, 128, 4
    names = {"q": 96, "v": 40, "gate": 130, "up": 130}
    per = {name: [FORMATS[fmt](rng.standard_normal((k, n)).astype(np.float32))
                  for _ in range(layers)] for name, n in names.items()}
    stacked = kernels.native_params({"layers": {name: stack_leaves(ls) for name, ls in
                                                per.items()}}, None)["layers"]
    assert all(isinstance(w, kernels.NativeQuant) and w.shape == (layers, k, names[name])
               for name, w in stacked.items())
    x = rng.standard_normal((m, k)).astype(np.float32)

    def run(tree, x):
        return (linear(x, tree["q"]), *linear_many(x, [tree["q"], tree["v"]], [None, None]),
                swiglu(x, tree["gate"], tree["up"]), tree["q"].dequantize())

    fn = jax.jit(lambda i, x: run(at_layer(stacked, i), x))
    for i in range(layers):
        one = {name: _native(ls[i], isa) for name, ls in per.items()}
        for got, want in zip(fn(jnp.int32(i), x), jax.jit(run)(one, x), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["float32", "int4_asym_g64", "Q4_1"])
def test_expert_stacks_run_each_expert_on_its_kernel_leaf(fmt, isa):
    """A MoE layer's expert stacks become kernel stacks (`native_params`): [E, K, N] in a
    layer's tree, [L, E, K, N] stacked. Multiplied as models/moe.py does (x [1, M, D] through
    `swiglu` with gate, up [E, D, F]; h [E, M, F] through `linear` with down [E, F, D]) they
    give [E, M, F] and [E, M, D] equal, bit for bit, to each expert's own 2-D kernel leaf (the
    stack read at a traced layer index, as the scan reads it), on the kernels only."""
    from jaxinfer.quant.base import stack_leaves
    from models.layers import at_layer, linear, swiglu

    rng = np.random.default_rng(5)
    layers, experts, d, f, m = 2, 3, 64, 128, 5
    shapes = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    per = {name: [[FORMATS.get(fmt, jnp.asarray)(rng.standard_normal(shape).astype(np.float32))
                   for _ in range(experts)] for _ in range(layers)]
           for name, shape in shapes.items()}

    def stack(leaves):
        return jnp.stack(leaves) if fmt == "float32" else stack_leaves(leaves)

    def one(leaf):  # one expert's matrix as its own kernel leaf
        if fmt == "float32":
            return kernels.NativeWeight.from_array(leaf, isa)
        return _native(leaf, isa)

    kind = kernels.NativeWeight if fmt == "float32" else kernels.NativeQuant
    stacked = kernels.native_params(
        {"layers": {"moe": {n: stack([stack(r) for r in ls]) for n, ls in per.items()}}},
        None)["layers"]["moe"]
    assert all(isinstance(w, kind) and w.shape == (layers, experts, *shapes[n])
               for n, w in stacked.items())
    x = rng.standard_normal((1, m, d)).astype(np.float32)

    def run(tree, x):
        h = swiglu(x, tree["gate"], tree["up"])  # [E, M, F]
        return h, linear(h, tree["down"])  # [E, M, D]

    def each(tree, x):  # every expert alone
        h = jnp.stack([swiglu(x[0], g, u) for g, u in zip(tree["gate"], tree["up"],
                                                           strict=True)])
        return h, jnp.stack([linear(he, w) for he, w in zip(h, tree["down"], strict=True)])

    fn = jax.jit(lambda i, x: run(at_layer(stacked, i), x))
    text = fn.lower(jnp.int32(0), x).as_text()
    assert "dot_general" not in text and kernels.target(
        "glu" if fmt == "float32" else "qmatmul", isa) in text
    for i in range(layers):
        layer = kernels.native_params({"moe": {n: stack(ls[i]) for n, ls in per.items()}}, None,
                                      prefix=f"layers/{i}")["moe"]
        assert all(isinstance(w, kind) and w.shape == (experts, *shapes[n])
                   for n, w in layer.items())
        want = jax.jit(each)({n: [one(w) for w in ls[i]] for n, ls in per.items()}, x)
        for got in (fn(jnp.int32(i), x), jax.jit(run)(layer, x)):
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape
                np.testing.assert_array_equal(g, w)


def test_dispatch_by_dtype(isa):
    """bfloat16 inputs and zero rows run XLA's dot on the dequantized weight (4-bit: with the
    same quantized activations), float32 rows the kernel; all agree. More than
    MAX_KERNEL_ROWS rows (a long prefill): 4-bit weights stay on the kernel, each row as it is
    alone, bit for bit; with an 8-bit weight in the call, XLA's dot runs."""
    from models.layers import linear_many

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
    long = jnp.asarray(rng.standard_normal((2 * kernels.MAX_KERNEL_ROWS + 7, 64)), jnp.float32)
    assert kernels.target("qmatmul", isa) in jax.jit(native.matmul).lower(long).as_text()
    got = np.asarray(native.matmul(long))
    _close(got, _q8(np.asarray(long)) @ np.asarray(native.dequantize(), np.float64), 64)
    for i in (0, kernels.MAX_KERNEL_ROWS + 3, len(long) - 1):
        np.testing.assert_array_equal(got[i:i + 1], native.matmul(long[i:i + 1]))
    eight = _native(FORMATS["Q8_0"](rng.standard_normal((64, 20)).astype(np.float32)), isa)
    both = jax.jit(lambda x: linear_many(x, [native, eight], [None, None]))
    assert kernels.target("qmatmul", isa) not in both.lower(long).as_text()
    assert kernels.target("qmatmul", isa) in both.lower(long[:kernels.MAX_KERNEL_ROWS]).as_text()
    y4, y8 = both(long)
    np.testing.assert_allclose(y4, got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y8, np.asarray(long) @ eight.dequantize(), rtol=1e-5, atol=1e-5)


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
    xr = _q8(x) if emb.head.bits == 4 else x.astype(np.float64)
    _close(got, xr @ np.asarray(leaf.dequantize(jnp.float32), np.float64).T, d)


def test_generation_with_quantized_kernels_equals_without(isa, monkeypatch):
    """A tiny model quantized as `--quant int4` does it (int4 layers, int8 tied embedding):
    run_layout makes every quantized leaf (the tied head too) a kernel leaf; greedy tokens and
    log-probs equal the same kernel leaves run by XLA (MAX_KERNEL_ROWS 0: the same quantized
    activations, XLA's dot), and stay close to the quantized leaves' own XLA path (float
    activations)."""
    from jaxinfer.quant.recipes import quantize_model

    config = models.LlamaConfig.tiny(tie_embeddings=True)
    model = quantize_model(Model(config=config, params=models.init_params(config, jax.random.key(0)),
                                 tokenizer=None, source="tiny", eos_token_ids=()),
                           "int4", group_size=32)
    native = generate.run_layout(model.params, model.config)
    layers = native["layers"]  # stacked: each layer's panels read in place by the scan
    assert all(isinstance(layers[a][w], kernels.NativeQuant)
               and layers[a][w].q.shape[0] == config.n_layers
               for a, w in (("attn", "q"), ("attn", "o"), ("mlp", "gate"), ("mlp", "down")))
    assert isinstance(native["embed"], kernels.NativeQuantEmbedding)
    assert kernels.attention_for(native, jnp.float32).keywords == {"isa": isa}
    prompts = [[1 + i, 5, 9, 2 + 3 * i][: 2 + i % 3] for i in range(3)]
    req = Request(prompts=prompts, sampling=[Sampling()], max_new_tokens=8, stop_token_ids=())
    with_kernel = generate_ids(model, req, logprobs=True, params=native)
    plain = generate_ids(model, req, logprobs=True,
                         params=generate.run_layout(model.params, model.config, native=False))
    monkeypatch.setattr(kernels, "MAX_KERNEL_ROWS", 0)
    jax.clear_caches()
    try:
        on_xla = generate_ids(model, req, logprobs=True, params=native)
    finally:
        jax.clear_caches()
    for a, b, c in zip(with_kernel, on_xla, plain, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        np.testing.assert_allclose(a.logprobs[:1], c.logprobs[:1], atol=2e-2)


def test_smollm2_q4_1_kernels_against_xla(smollm2_gguf_path, best_isa):
    """The real SmolLM2 Q4_1 file kept packed (--quant native): with the quantized kernels
    (activations quantized per block of 32) greedy tokens follow the XLA packed path (float
    activations) for 16 new tokens on several prompts, except where that path's two best
    next tokens are nearly tied (a log-prob gap under 0.25, probabilities within 1.3x: either
    is then the greedy answer of some rounding; on the first prompt the XLA path's gap is 0.22
    at the 6th token, and llama.cpp, which also quantizes activations, picks the kernels' token
    there and agrees with them on all 16), and perplexity on real text stays within +0.5%."""
    import dataclasses

    import jaxinfer
    from jaxinfer.bench import english_text

    model = jaxinfer.load(smollm2_gguf_path, keep_packed=True, progress=False)
    native = generate.run_layout(model.params, model.config)
    plain = generate.run_layout(model.params, model.config, native=False)
    assert isinstance(native["layers"]["mlp"]["down"], kernels.NativeQuant)
    assert isinstance(native["embed"], kernels.NativeQuantEmbedding)
    on_plain = dataclasses.replace(model, params=plain)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village,"]
    prompts = [model.tokenizer.encode(t) for t in texts]
    req = Request(prompts=prompts, sampling=[Sampling()], max_new_tokens=16, stop_token_ids=())
    agree = 0
    for prompt, a, b in zip(prompts, generate_ids(model, req, params=native),
                            generate_ids(model, req, params=plain), strict=True):
        i = next((j for j, (u, v) in enumerate(zip(a.token_ids, b.token_ids, strict=True))
                  if u != v), 16)
        agree += i
        if i < 16:
            top2 = np.sort(on_plain.logits(prompt + b.token_ids[:i])[0, -1])[-2:]
            assert top2[1] - top2[0] < 0.25, (i, a.token_ids, b.token_ids)
    assert agree >= 24
    ids = model.tokenizer.encode(english_text()[20_000:24_000])[:256]  # 256 rows: the kernels

    def perplexity(params):
        logits = dataclasses.replace(model, params=params).logits(ids)[0, :-1]
        logp = logits - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
        return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))

    ppl_kernel, ppl_plain = perplexity(native), perplexity(plain)
    assert ppl_kernel <= 1.005 * ppl_plain, (ppl_kernel, ppl_plain)
