"""The native CPU kernels (jaxinfer.kernels) on every ISA this machine has: exact enough
against float64, RoPE and the cache write bit for bit, dispatch, params wrapping, generation
with them equal to generation without them, and the ISA selection (JAXINFER_CPU_ISA)."""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxinfer import generate, kernels, paths
from jaxinfer.generate import Request, generate_ids
from jaxinfer.model import Model
from jaxinfer.quant import Int8Weight, W8A8Weight
from jaxinfer.sampling import Sampling

CONFIGS = {
    "llama_tied": models.LlamaConfig.tiny(tie_embeddings=True),
    "llama_untied": models.LlamaConfig.tiny(),
    "gpt2": models.GPT2Config.tiny(),
}


@pytest.fixture
def isa(float_isa):
    """This module's kernels (float32 matmuls, attention) on each ISA with its own code of
    them (conftest.FLOAT_ISAS; test_qkernels covers avx512vnni)."""
    return float_isa


@pytest.fixture(params=list(CONFIGS))
def tiny(request):
    config = CONFIGS[request.param]
    return Model(config=config, params=models.init_params(config, jax.random.key(0)),
                 tokenizer=None, source=request.param, eos_token_ids=())


def test_kernel_builds_and_registers(isa):
    """Each ISA is its own library, compiled for that ISA (checked when it loads; AVX-512
    instructions only in the AVX-512 one), cached, registered under its own targets."""
    assert kernels.isa() == isa and kernels.available()
    assert kernels.describe().startswith(f"native CPU kernels: {isa} (")
    lib = kernels.build(isa)
    mtime = lib.stat().st_mtime_ns
    assert kernels.build(isa) == lib and lib.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert kernels._library(isa).JaxinferIsa() == isa.encode()
    assert len({kernels._library_path(i) for i in kernels.ISA_FLAGS}) == len(kernels.ISA_FLAGS)
    if shutil.which("objdump"):
        text = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
        assert ("zmm" in text) == isa.startswith("avx512")


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 17, 64])
@pytest.mark.parametrize("k,n", [(7, 1), (64, 47), (64, 48), (100, 49), (576, 1536), (33, 200),
                                 (16, 72)])
def test_matmul_matches_float64(m, k, n, isa):
    """Every row-block size (1 .. 8 rows, several blocks), ragged last panels (one column, half
    a panel, 47 of 48)."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    fn = jax.jit(functools.partial(kernels.matmul, isa=isa), static_argnums=2)
    got = np.asarray(fn(x, kernels.pack(w), n))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(ref).max() + 1e-6)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17])
def test_matmul_many_and_glu_match_float64(m, isa):
    """Several projections of one x in one call, and the fused SwiGLU gate silu(x Wg) * (x Wu),
    against float64 (weights with ragged last panels, rows over one register block)."""
    rng = np.random.default_rng(m)
    k, ns = 200, [96, 7, 130]
    x = rng.standard_normal((m, k), np.float32)
    ws = [rng.standard_normal((k, n), np.float32) for n in ns]
    got = jax.jit(lambda x, *p: kernels.matmul_many(x, list(p), ns, isa))(
        x, *[kernels.pack(w) for w in ws])
    x64 = x.astype(np.float64)
    for y, w in zip(got, ws, strict=True):
        ref = x64 @ w
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(ref).max())
    for n in (130, 1536):
        wg, wu = (rng.standard_normal((k, n), np.float32) for _ in range(2))
        got = jax.jit(functools.partial(kernels.glu, isa=isa), static_argnums=3)(
            x, kernels.pack(wg), kernels.pack(wu), n)
        g, u = x64 @ wg, x64 @ wu
        ref = g / (1 + np.exp(-g)) * u
        assert got.shape == (m, n)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m,k", [(16, 1000), (17, 576), (9, 97)])
def test_rows_get_the_sums_of_one_row_alone(m, k, isa):
    """Each row of a many-row call (several blocks of rows; with AVX2 the panels read in chunks
    of k, the last one partial) gets bit for bit what a call with that row alone gives it:
    every output is the same chain of fused multiply-adds over k in order (matmul, the
    several projections of one x, the SwiGLU gate)."""
    rng = np.random.default_rng(k + m)
    n = 200
    x = rng.standard_normal((m, k), np.float32)
    w, wg, wu = (kernels.pack(rng.standard_normal((k, n), np.float32)) for _ in range(3))
    mm = jax.jit(functools.partial(kernels.matmul, isa=isa), static_argnums=2)
    many = jax.jit(lambda x, a, b: kernels.matmul_many(x, [a, b], [n, n], isa))
    glu = jax.jit(functools.partial(kernels.glu, isa=isa), static_argnums=3)
    whole = (mm(x, w, n), *many(x, w, wg), glu(x, wg, wu, n))
    for r in (0, 5, m - 1):
        one = (mm(x[r:r + 1], w, n), *many(x[r:r + 1], w, wg), glu(x[r:r + 1], wg, wu, n))
        for got, want in zip(whole, one, strict=True):
            np.testing.assert_array_equal(np.asarray(got)[r:r + 1], want)


def test_glu_over_the_whole_range_of_exp(isa):
    """silu(g) for g from -120 to 120: exp's clamp and its scaling by 2^n at both ends
    (n = 128 and -126) give silu within float32 rounding, never inf or nan."""
    n = 481
    g = np.linspace(-120, 120, n, dtype=np.float32)[None]
    got = np.asarray(jax.jit(functools.partial(kernels.glu, isa=isa), static_argnums=3)(
        np.ones((1, 1), np.float32), kernels.pack(g), kernels.pack(np.ones_like(g)), n))
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)


def test_linear_many_and_swiglu_dispatch(isa):
    """models.layers.linear_many / swiglu: packed weights run one custom call (biases added
    after), plain arrays and mixed weight types the unfused ops; all give the same numbers."""
    from models.layers import linear, linear_many, swiglu

    keys = jax.random.split(jax.random.key(3), 6)
    ws = [jax.random.normal(keys[i], (64, n)) for i, n in enumerate((64, 32, 32))]
    bs = [None, jax.random.normal(keys[3], (32,)), None]
    packed = [kernels.NativeWeight.from_array(w, isa) for w in ws]
    many, fused_glu = kernels.target("matmul_many", isa), kernels.target("glu", isa)
    for rows in (4, kernels.MAX_KERNEL_ROWS, 300):  # 300 rows: XLA's dot (a prefill)
        x = jax.random.normal(keys[4], (1, rows, 64))
        small = rows <= kernels.MAX_KERNEL_ROWS
        want = [linear(x, w, b) for w, b in zip(ws, bs, strict=True)]
        for weights, fused in [(packed, small), (ws, False),
                               ([packed[0], ws[1], packed[2]], False)]:
            fn = jax.jit(lambda x, weights=weights: linear_many(x, weights, bs))
            assert (many in fn.lower(x).as_text()) == fused
            for y, w in zip(fn(x), want, strict=True):
                np.testing.assert_allclose(y, w, rtol=1e-4, atol=1e-4)
        g, u = ws[1], jax.random.normal(keys[5], (64, 32))
        want = jax.nn.silu(x @ g) * (x @ u)
        pg, pu = kernels.NativeWeight.from_array(g, isa), kernels.NativeWeight.from_array(u, isa)
        for args, fused in [((pg, pu), small), ((g, u), False), ((pg, u), False),
                            ((pg, pu, bs[1]), False)]:
            fn = jax.jit(lambda x, args=args: swiglu(x, *args))
            assert (fused_glu in fn.lower(x).as_text()) == fused
            ref = want if len(args) == 2 else jax.nn.silu(x @ g + bs[1]) * (x @ u)
            np.testing.assert_allclose(fn(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k, n", [(3, 1), (5, 48), (7, 100), (4, kernels.PACK_PANELS * 48 + 5),
                                  (2, 2 * kernels.PACK_PANELS * 48)])
def test_pack_on_the_host_is_the_panel_layout(k, n):
    """pack (numpy, a few panels at a time) gives panels[p, k, j] = w[k, p * 48 + j], zero
    columns past n; a transposed view packs like its copy."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    p = -(-n // kernels.STRIP)
    want = np.zeros((k, p * kernels.STRIP), np.float32)
    want[:, :n] = w
    want = want.reshape(k, p, kernels.STRIP).transpose(1, 0, 2)
    for arg in (w, jnp.asarray(w), np.ascontiguousarray(w.T).T):
        got = kernels.pack(arg)
        assert isinstance(got, jax.Array) and got.shape == kernels.packed_shape(k, n)
        np.testing.assert_array_equal(got, want)


def test_native_weight_dispatch_by_dtype(isa):
    """Float32 inputs of up to MAX_KERNEL_ROWS rows (decode steps, short prompts) run the leaf's
    ISA's custom call; more rows (a prefill) and other dtypes XLA's dot on the unpacked weights;
    all give x @ w."""
    w = jax.random.normal(jax.random.key(0), (48, 80))
    leaf = kernels.NativeWeight.from_array(w, isa)
    assert leaf.shape == w.shape and leaf.panels.shape == (2, 48, kernels.STRIP) and leaf.isa == isa
    np.testing.assert_array_equal(kernels.unpack(leaf.panels, 80), w)
    for shape, dtype in [((1, 1, 48), jnp.float32), ((4, 1, 48), jnp.float32),
                         ((2, 3, 48), jnp.float32), ((300, 48), jnp.float32),
                         ((4, 48), jnp.bfloat16)]:
        x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
        text = jax.jit(leaf.matmul).lower(x).as_text()
        kernel = dtype == jnp.float32 and np.prod(shape[:-1]) <= kernels.MAX_KERNEL_ROWS
        assert (kernels.target("matmul", isa) in text) == kernel, shape
        tol = 1e-5 if dtype == jnp.float32 else 5e-2
        np.testing.assert_allclose(np.asarray(jax.jit(leaf.matmul)(x), np.float32),
                                   np.asarray(x.astype(jnp.float32) @ w), rtol=tol, atol=tol)


def test_native_embedding_rows_and_head(isa):
    table = jax.random.normal(jax.random.key(2), (50, 24))
    emb = kernels.NativeEmbedding.from_table(table, isa)
    tokens = jnp.array([[3, 0, 49], [7, 7, 1]])
    np.testing.assert_array_equal(emb.take_rows(tokens), table[tokens])
    x = jax.random.normal(jax.random.key(3), (2, 1, 24))
    fn = jax.jit(emb.matmul_transposed)
    assert kernels.target("matmul", isa) in fn.lower(x).as_text()
    np.testing.assert_allclose(fn(x), x @ table.T, atol=1e-5)
    assert emb.shape == table.shape


@pytest.mark.parametrize("rope", [False, True])
def test_cache_attention_fallback_is_rope_write_and_attend(rope):
    """Where the kernel does not apply (H not a multiple of 16), cache_attention is the XLA
    path: RoPE, the cache write and attend, bit for bit."""
    from models.cache import write_keys, write_layer
    from models.layers import apply_rope, attend, attention_mask, rope_inv_freq

    b, n, k, h, s = 2, 4, 2, 8, 10
    keys = jax.random.split(jax.random.key(5), 5)
    q = jax.random.normal(keys[0], (b, 1, n, h))
    k_new, v_new = (jax.random.normal(keys[i], (b, 1, k, h)) for i in (1, 2))
    kc, vc = jax.random.normal(keys[3], (b, k, h, s)), jax.random.normal(keys[4], (b, k, s, h))
    pos = jnp.array([[4], [2]], jnp.int32)
    k_pos = jnp.where(jnp.arange(s)[None] <= pos, jnp.arange(s)[None], -1)
    inv_freq = rope_inv_freq(h, 10000.0, None) if rope else None

    def reference(q, kn, vn, kc, vc):
        if rope:
            q, kn = apply_rope(q, pos, inv_freq), apply_rope(kn, pos, inv_freq)
        kc, vc = write_keys(kc, None, pos, kn), write_layer(vc, None, pos, vn)
        return attend(q, kc, vc, attention_mask(pos, k_pos, 5)), kc, vc

    got = jax.jit(lambda *a: kernels.cache_attention(*a[:5], pos, k_pos, 5, pos, inv_freq))(
        q, k_new, v_new, kc, vc)
    want = jax.jit(reference)(q, k_new, v_new, kc, vc)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_native_params_wraps_matmul_weights_only(tiny, isa):
    params = models.unstack_layers(tiny.params)
    mlp = params["layers"][0]["mlp"]
    name = "up" if "up" in mlp else "fc"
    mlp[name] = Int8Weight.from_float(mlp[name])
    down = "down" if "down" in mlp else "proj"
    mlp[down] = W8A8Weight.from_float(mlp[down])
    table = models.tied_table(tiny.config)
    wrapped = kernels.native_params(params, table)
    for path, leaf in paths.iter_leaves(wrapped):
        original = paths.get(params, path)
        if path == table:
            assert isinstance(leaf, kernels.NativeEmbedding) and leaf.isa == isa
            np.testing.assert_array_equal(kernels.unpack(leaf.panels, leaf.n), original.T)
        elif path == f"layers/0/mlp/{name}":  # quantized: its kernel form
            assert isinstance(leaf, kernels.NativeQuant) and leaf.isa == isa
            np.testing.assert_array_equal(leaf.dequantize(), original.dequantize())
        elif path == f"layers/0/mlp/{down}":
            assert leaf is original  # a scheme without a kernel form (W8A8) is left alone
        elif getattr(original, "ndim", 0) == 2 and path not in ("embed", "wpe"):
            assert isinstance(leaf, kernels.NativeWeight) and leaf.isa == isa, path
            np.testing.assert_array_equal(kernels.unpack(leaf.panels, leaf.n), original)
        else:
            assert leaf is original, path


@pytest.mark.parametrize("kv_cache", ["float", "float16"])
def test_generation_with_kernel_equals_without(tiny, isa, kv_cache, monkeypatch):
    """Greedy tokens identical and log-probs within float32 rounding, batch of 5 ragged rows
    (a float32 cache, and a float16 one: the kernel reads it as XLA does)."""
    prompts = [[1 + i, 5, 9, 2 + 3 * i][: 2 + i % 3] for i in range(5)]
    req = Request(prompts=prompts, sampling=[Sampling()], max_new_tokens=10, stop_token_ids=(),
                  kv_cache=kv_cache)
    native = generate.run_layout(tiny.params, tiny.config)
    o = native["layers"]["attn"]["o"]  # stacked: the scan reads each layer's panels in place
    assert o.isa == isa and o.panels.shape[0] == tiny.config.n_layers and o.layer is None
    attention = kernels.attention_for(native, jnp.float32)
    assert attention is kernels.attention_for(native, "float32") and attention.keywords == {"isa": isa}
    assert kernels.attention_for(native, jnp.float16) is attention
    assert kernels.attention_for(native, jnp.int8) is None
    with_kernel = generate_ids(tiny, req, logprobs=True, params=native)
    monkeypatch.setenv("JAXINFER_NATIVE", "0")
    plain = generate.run_layout(tiny.params, tiny.config)
    assert not isinstance(plain["layers"][0]["attn"]["o"], kernels.NativeWeight)  # per layer
    without = generate_ids(tiny, req, logprobs=True, params=plain)
    for a, b in zip(with_kernel, without, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.fixture
def fresh_state(monkeypatch):
    """kernels' process state (registered libraries, warnings given) as in a new process, and
    no ISA or kernel switch in the environment; restored after the test."""
    monkeypatch.setattr(kernels, "_library", functools.cache(kernels._library.__wrapped__))
    monkeypatch.setattr(kernels, "_warn_once", functools.cache(kernels._warn_once.__wrapped__))
    monkeypatch.delenv("JAXINFER_CPU_ISA", raising=False)
    monkeypatch.delenv("JAXINFER_NATIVE", raising=False)


def _fake_cpu(monkeypatch, flags: str, machine: str = "x86_64") -> None:
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: machine)


def test_unavailable_kernel_falls_back_to_xla(fresh_state, monkeypatch, tmp_path):
    """A failing compiler gives a warning, available() False and params left as they are."""
    monkeypatch.setattr(kernels, "_library_path", lambda isa: Path(tmp_path) / "k" / f"{isa}.so")
    _fake_cpu(monkeypatch, "avx2 fma f16c")
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(UserWarning, match=r"native CPU kernels \(avx2\) unavailable"):
        assert not kernels.available()
    assert kernels.isa() is None
    assert kernels.describe() == "native CPU kernels off (the avx2 build failed): XLA runs everything"
    assert list((Path(tmp_path) / "k").iterdir()) == []  # nothing half-written left behind
    params = {"layers": {"q": jnp.ones((4, 4))}}
    assert kernels.native_params(params, None) is params
    monkeypatch.setenv("JAXINFER_NATIVE", "0")
    assert not kernels.available()
    assert kernels.describe() == "native CPU kernels off (JAXINFER_NATIVE=0): XLA runs everything"


def test_compile_flags_follow_the_cpu_vendor(monkeypatch):
    """AMD's CPUs build without the next-panel prefetch at one row (VENDOR_FLAGS), others with
    it; the vendor's flags are part of the library's cache key."""
    got = {}
    for vendor in ("AuthenticAMD", "GenuineIntel", ""):
        monkeypatch.setattr(kernels, "_cpuinfo", lambda v=vendor: {"vendor_id": v} if v else {})
        flags = kernels._compile_flags("avx2")
        assert flags[:len(kernels.FLAGS)] == kernels.FLAGS
        assert ("-DJAXINFER_ONE_PASS_PREFETCH=0" in flags) == (vendor == "AuthenticAMD")
        got[vendor] = kernels._library_path("avx2")
    assert got["AuthenticAMD"] != got["GenuineIntel"] == got[""]


def test_supported_isas_follow_the_cpu_flags(monkeypatch):
    for flags, want in [("avx512f avx512bw avx512_vnni avx2 fma f16c",
                         ("avx512vnni", "avx512", "avx2")),
                        ("avx512f avx512bw avx2 fma f16c", ("avx512", "avx2")),
                        ("avx512f avx2 fma f16c", ("avx2",)),  # AVX-512 without BW: AVX2
                        ("avx2 fma f16c", ("avx2",)), ("avx512f avx512bw avx2 f16c", ()),
                        ("sse4_2 avx", ())]:
        _fake_cpu(monkeypatch, flags)
        assert kernels.supported_isas() == want, flags
    _fake_cpu(monkeypatch, "avx512f avx2 fma f16c", machine="aarch64")
    assert kernels.supported_isas() == ()


def test_no_avx2_means_xla(fresh_state, monkeypatch):
    _fake_cpu(monkeypatch, "sse4_2 avx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.isa() is None
    assert kernels.describe() == "native CPU kernels off (no AVX2/FMA): XLA runs everything"


@pytest.mark.parametrize("value,why", [("sse9", "not one of avx512vnni, avx512, avx2"),
                                       ("avx512", "not supported by this CPU")])
def test_isa_override_unknown_or_unsupported_warns_once(fresh_state, monkeypatch, value, why):
    """JAXINFER_CPU_ISA naming no ISA, or one this CPU lacks: one warning, then XLA."""
    _fake_cpu(monkeypatch, "avx2 fma f16c")
    monkeypatch.setenv("JAXINFER_CPU_ISA", value)
    with pytest.warns(UserWarning, match=f"JAXINFER_CPU_ISA={value}: {why}"):
        assert kernels.isa() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not kernels.available()
    assert kernels.describe() == (f"native CPU kernels off (JAXINFER_CPU_ISA={value} {why}): "
                                  "XLA runs everything")
    params = {"w": jnp.ones((4, 4))}
    assert kernels.native_params(params, None) is params


_SHAPES = [(9, 3, 64, 192), (4, 4, 16, 7), (8, 1, 128, 40), (10, 2, 80, 70)]
# every shape, window and RoPE choice over a float32 cache; each shape once over a float16 one
_ATTENTION_CASES = [(*shape, window, rope, "float32") for shape in _SHAPES
                    for window in (1 << 30, 5) for rope in (False, True)]
_ATTENTION_CASES += [(*shape, (1 << 30, 5)[i % 2], i < 2, "float16")
                     for i, shape in enumerate(_SHAPES)]


@pytest.mark.parametrize("n,k,h,s,window,rope,cache", _ATTENTION_CASES)
def test_decode_attention_matches_write_and_attend(n, k, h, s, window, rope, cache, isa):
    """Same cache contents and output as RoPE, models.cache's write and models.layers.attend
    with the position mask: groups of 1, 4, 5 and 8 query heads per KV head, ragged rows, left
    padding (position -1 slots), unused slots, a sliding window, a row that sees no key at
    all, and a slot out of range (dropped). A float16 cache gets the new token rounded as
    XLA's convert rounds it, and is attended over in float32."""
    from models.cache import write_keys, write_layer
    from models.layers import apply_rope, attend, attention_mask, rope_inv_freq

    b = 6
    keys = jax.random.split(jax.random.key(s + n), 5)
    q = jax.random.normal(keys[0], (b, 1, n, h))
    k_new = jax.random.normal(keys[1], (b, 1, k, h))
    v_new = jax.random.normal(keys[2], (b, 1, k, h))
    kc = jax.random.normal(keys[3], (b, k, h, s)).astype(cache)
    vc = jax.random.normal(keys[4], (b, k, s, h)).astype(cache)
    used = np.array([s, 1, max(1, s // 2), s - 1, 3, s])
    k_pos = np.full((b, s), -1, np.int32)
    for row in range(b):
        pad = row % 3 if used[row] > 3 else 0  # left padding inside the used slots
        k_pos[row, pad:used[row]] = np.arange(used[row] - pad)
    k_pos[4, :3] = -1  # row 4: every used slot is padding -> no visible key
    q_pos = jnp.asarray(np.maximum(k_pos.max(axis=1), 0)[:, None].astype(np.int32))
    slots = (used - 1)[:, None].astype(np.int32)
    slots[5] = s  # row 5: no free slot, the write is dropped
    slots, k_pos = jnp.asarray(slots), jnp.asarray(k_pos)
    inv_freq = rope_inv_freq(h, 10000.0, None) if rope else None
    q_rot, k_rot = ((apply_rope(q, q_pos, inv_freq), apply_rope(k_new, q_pos, inv_freq))
                    if rope else (q, k_new))
    want_k = write_keys(kc, None, slots, k_rot)
    want_v = write_layer(vc, None, slots, v_new)
    f32 = jnp.float32
    want = attend(q_rot, want_k.astype(f32), want_v.astype(f32),
                  attention_mask(q_pos, k_pos, window))
    fn = jax.jit(lambda q, kn, vn, kc, vc, qp, kp, sl: kernels.cache_attention(
        q, kn, vn, kc, vc, qp, kp, window, sl, inv_freq, isa=isa))
    kind = "attend" if cache == "float32" else "attend_half"
    assert kernels.target(kind, isa) in fn.lower(q, k_new, v_new, kc, vc, q_pos, k_pos,
                                                     slots).as_text()
    got, got_k, got_v = fn(q, k_new, v_new, kc, vc, q_pos, k_pos, slots)
    assert got_k.dtype == got_v.dtype == jnp.dtype(cache)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_decode_attention_on_the_first_rows_and_padding_rows(isa):
    """q of B rows over buffers of R > B rows attends with the buffers' first B rows (the
    others untouched), as the same kernel on those rows alone; a padding row (position -1) is
    written as the XLA path writes it and gets zeros (its output is never read)."""
    r, b, n, k, h, s = 5, 3, 4, 2, 32, 24
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (b, 1, n, h))
    k_new = jax.random.normal(keys[1], (b, 1, k, h))
    v_new = jax.random.normal(keys[2], (b, 1, k, h))
    kc = jax.random.normal(keys[3], (r, k, h, s))
    vc = jax.random.normal(keys[4], (r, k, s, h))
    used = np.array([10, 6, 20])
    k_pos = jnp.asarray(np.where(np.arange(s)[None] < used[:, None], np.arange(s)[None], -1),
                        jnp.int32)
    q_pos = jnp.asarray([[9], [-1], [19]], jnp.int32)
    slots = jnp.asarray((used - 1)[:, None], jnp.int32)
    fn = jax.jit(lambda q, kn, vn, kc, vc, qp: kernels.cache_attention(
        q, kn, vn, kc, vc, qp, k_pos, 1 << 30, slots, None, isa=isa))
    got, got_k, got_v = fn(q, k_new, v_new, kc, vc, q_pos)
    want, want_k, want_v = fn(q, k_new, v_new, kc[:b], vc[:b], q_pos.at[1].set(5))
    np.testing.assert_array_equal(got_k[:b], want_k)
    np.testing.assert_array_equal(got_v[:b], want_v)
    np.testing.assert_array_equal(got_k[b:], kc[b:])
    np.testing.assert_array_equal(got_v[b:], vc[b:])
    np.testing.assert_array_equal(got[0::2], want[0::2])
    np.testing.assert_array_equal(got[1], np.zeros_like(got[1]))


def test_stacked_weights_are_read_at_the_layer_index(isa):
    """A stack of every layer's packed weights [L, P, K, 48] read at a traced layer index
    (`models.layers.at_layer`, as the scan over the layers reads it) gives each layer's own
    result bit for bit: one projection, several in one call, the SwiGLU gate, and XLA's dot
    for rows the kernel does not take (bfloat16); a layer outside the stack is an error."""
    from models.layers import at_layer, linear, linear_many, swiglu

    rng = np.random.default_rng(0)
    layers, k, m = 3, 64, 5
    ws = {name: rng.standard_normal((layers, k, n)).astype(np.float32)
          for name, n in (("q", 96), ("k", 40), ("g", 130), ("u", 130))}
    stack = {name: kernels.NativeWeight.from_array(w, isa) for name, w in ws.items()}
    assert stack["q"].shape == (layers, k, 96) and stack["q"].panels.shape == (layers, 2, k, 48)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def run(tree, x):
        return (linear(x, tree["q"]), *linear_many(x, [tree["q"], tree["k"]], [None, None]),
                swiglu(x, tree["g"], tree["u"]))

    fn = jax.jit(lambda i, x: run(at_layer(stack, i), x))
    text = fn.lower(jnp.int32(0), x).as_text()
    assert all(kernels.target(kind, isa) in text for kind in ("matmul", "matmul_many", "glu"))
    xb = x.astype(jnp.bfloat16)
    for i in range(layers):
        one = {name: kernels.NativeWeight.from_array(w[i], isa) for name, w in ws.items()}
        for got, want in zip(fn(jnp.int32(i), x), jax.jit(run)(one, x), strict=True):
            np.testing.assert_array_equal(got, want)
        got = jax.jit(lambda i, x: linear(x, at_layer(stack, i)["q"]))(jnp.int32(i), xb)
        np.testing.assert_array_equal(got, jax.jit(lambda x, w=one["q"]: linear(x, w))(xb))
    with pytest.raises(Exception, match="holding the layer"):
        jax.block_until_ready(fn(jnp.int32(layers), x))


@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_decode_attention_on_a_stacked_cache_writes_its_layer(cache, isa):
    """The attention kernel on stacked buffers [L, R, K, H, S] at layer i equals the kernel on
    layer i's own buffers (output and that layer's cache bit for bit) and leaves the other
    layers as they were."""
    layers, b, n, k, h, s = 3, 2, 4, 2, 32, 24
    keys = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(keys[0], (b, 1, n, h))
    k_new = jax.random.normal(keys[1], (b, 1, k, h))
    v_new = jax.random.normal(keys[2], (b, 1, k, h))
    kc = jax.random.normal(keys[3], (layers, b, k, h, s)).astype(cache)
    vc = jax.random.normal(keys[4], (layers, b, k, s, h)).astype(cache)
    used = np.array([10, 20])
    k_pos = jnp.asarray(np.where(np.arange(s)[None] < used[:, None], np.arange(s)[None], -1),
                        jnp.int32)
    q_pos = jnp.asarray((used - 1)[:, None], jnp.int32)
    inv_freq = models.layers.rope_inv_freq(h, 10000.0, None)

    def attend(kc, vc, layer=None):
        return kernels.cache_attention(q, k_new, v_new, kc, vc, q_pos, k_pos, 1 << 30, q_pos,
                                        inv_freq, layer=layer, isa=isa)

    stacked = jax.jit(attend)
    text = stacked.lower(kc, vc, jnp.int32(0)).as_text()
    assert kernels.target("attend" if cache == "float32" else "attend_half", isa) in text
    for i in range(layers):
        got, got_k, got_v = stacked(kc, vc, jnp.int32(i))
        want, want_k, want_v = jax.jit(attend)(kc[i], vc[i])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_k[i], want_k)
        np.testing.assert_array_equal(got_v[i], want_v)
        others = [j for j in range(layers) if j != i]
        np.testing.assert_array_equal(np.asarray(got_k)[others], np.asarray(kc)[others])
        np.testing.assert_array_equal(np.asarray(got_v)[others], np.asarray(vc)[others])


def _chunk_case(seed, b, t, n, k, h, s, start, cache):
    """A prefill chunk of t tokens per row at positions start.. (row 1 ends two tokens early:
    padding, position -1, its slots out of range), over a cache of s slots holding start
    earlier tokens: (q, k_new, v_new, k_buf, v_buf, positions, k_pos, slots)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k_new, v_new = (jax.random.normal(keys[i], (b, t, k, h)) for i in (1, 2))
    kc = jax.random.normal(keys[3], (b, k, h, s)).astype(cache)
    vc = jax.random.normal(keys[4], (b, k, s, h)).astype(cache)
    positions = np.tile(np.arange(start, start + t, dtype=np.int32), (b, 1))
    positions[1, t - 2:] = -1
    slots = np.where(positions >= 0, positions, s).astype(np.int32)
    k_pos = np.full((b, s), -1, np.int32)
    k_pos[:, :start] = np.arange(start)
    for row, col in zip(*np.nonzero(positions >= 0), strict=True):
        k_pos[row, slots[row, col]] = positions[row, col]
    return (q, k_new, v_new, kc, vc, jnp.asarray(positions), jnp.asarray(k_pos),
            jnp.asarray(slots))


@pytest.mark.parametrize("n,k,h,s,t,start,window,cache", [
    (9, 3, 64, 300, 33, 240, 1 << 30, "float32"), (9, 3, 64, 300, 33, 240, 1 << 30, "float16"),
    (4, 4, 16, 256, 17, 0, 7, "float32"), (8, 1, 128, 260, 5, 3, 1 << 30, "float16"),
    (10, 2, 80, 70, 24, 30, 9, "float32"), (9, 3, 64, 96, 33, 40, 1 << 30, "float16")])
def test_prefill_attention_matches_rope_write_and_attend(n, k, h, s, t, start, window, cache,
                                                         isa):
    """A chunk of several tokens per row on the many-token kernel: the cache written as RoPE
    and models.cache's writes write it (bit for bit), the real queries' outputs as
    models.layers.attend with the position mask (groups of 1, 3, 4 and 5 query heads per KV
    head, earlier cached tokens, a sliding window, a padding query: zeros)."""
    from models.cache import write_keys, write_layer
    from models.layers import apply_rope, attend, attention_mask, rope_inv_freq

    q, k_new, v_new, kc, vc, positions, k_pos, slots = _chunk_case(7, 2, t, n, k, h, s, start,
                                                                   cache)
    inv_freq = rope_inv_freq(h, 10000.0, None)
    q_rot, k_rot = apply_rope(q, positions, inv_freq), apply_rope(k_new, positions, inv_freq)
    want_k, want_v = write_keys(kc, None, slots, k_rot), write_layer(vc, None, slots, v_new)
    f32 = jnp.float32
    want = attend(q_rot, want_k.astype(f32), want_v.astype(f32),
                  attention_mask(positions, k_pos, window))
    fn = jax.jit(lambda *a: kernels.cache_attention(*a, k_pos, window, slots, inv_freq,
                                                     isa=isa))
    kind = "attend" if cache == "float32" else "attend_half"
    assert kernels.target(kind, isa) in fn.lower(q, k_new, v_new, kc, vc, positions).as_text()
    got, got_k, got_v = fn(q, k_new, v_new, kc, vc, positions)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    real = np.asarray(positions >= 0)[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=2e-5,
                               atol=2e-5)
    assert not np.asarray(got)[~real[..., 0]].any()


@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_prefill_attention_equals_single_token_steps(cache, isa):
    """Each query of a prefill chunk (stacked buffers, layer 1) gets bit for bit what the
    single-token kernel gives it when the chunk's tokens are written and attended one by
    one: the same rotation, keys and operations, the other queries and the slots past its own
    adding exact zeros; the cache ends the same."""
    layers, b, n, k, h, s, t, start = 3, 2, 9, 3, 64, 80, 21, 30
    q, k_new, v_new, kc, vc, positions, k_pos, slots = _chunk_case(3, b, t, n, k, h, s, start,
                                                                   cache)
    kc = jnp.stack([kc] * layers)
    vc = jnp.stack([vc] * layers)
    inv_freq = models.layers.rope_inv_freq(h, 1e4, None)
    one = jnp.int32(1)
    got, got_k, got_v = jax.jit(lambda *a: kernels.cache_attention(
        *a, k_pos, 1 << 30, slots, inv_freq, layer=one, isa=isa))(q, k_new, v_new, kc, vc,
                                                                   positions)
    step = jax.jit(lambda q, kn, vn, kc, vc, p, kp, sl: kernels.cache_attention(
        q, kn, vn, kc, vc, p, kp, 1 << 30, sl, inv_freq, layer=one, isa=isa))
    kb, vb = kc, vc
    outs = []
    for i in range(t):
        cut = slice(i, i + 1)
        out, kb, vb = step(q[:, cut], k_new[:, cut], v_new[:, cut], kb, vb, positions[:, cut],
                           jnp.where(jnp.arange(s)[None] < start + i + 1, k_pos, -1),
                           slots[:, cut])
        outs.append(out)
    np.testing.assert_array_equal(got_k, kb)
    np.testing.assert_array_equal(got_v, vb)
    real = np.asarray(positions >= 0)[..., None]
    np.testing.assert_array_equal(np.where(real, got, 0),
                                  np.where(real, jnp.concatenate(outs, axis=1), 0))


@pytest.mark.parametrize("cache", ["float32", "float16"])
def test_prefill_query_that_sees_nothing_gets_the_mean_of_values(cache, isa):
    """A full cache whose slots all hold later positions, the chunk's own slots out of range
    (dropped): each real query sees no slot and gets the mean of v over all slots, as a
    one-token call gives it; padding queries zeros; the cache unchanged."""
    b, n, k, h, s, t = 2, 6, 2, 32, 40, 5
    q, k_new, v_new, kc, vc, positions, _, _ = _chunk_case(5, b, t, n, k, h, s, 0, cache)
    k_pos = jnp.tile(jnp.arange(100, 100 + s, dtype=jnp.int32), (b, 1))
    slots = jnp.full((b, t), s, jnp.int32)
    call = jax.jit(lambda q, kn, vn, kc, vc, p, sl: kernels.cache_attention(
        q, kn, vn, kc, vc, p, k_pos, 1 << 30, sl, None, isa=isa))
    got, got_k, got_v = call(q, k_new, v_new, kc, vc, positions, slots)
    np.testing.assert_array_equal(got_k, kc)
    np.testing.assert_array_equal(got_v, vc)
    mean = np.asarray(vc, np.float32).mean(axis=2)  # [b, k, h]
    want = np.repeat(mean, n // k, axis=1).reshape(b, 1, n * h)
    real = np.asarray(positions >= 0)[..., None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-5,
                               atol=1e-6)
    assert not np.asarray(got)[~real[..., 0]].any()
    for i in range(t):  # bit for bit what one-token calls give
        cut = slice(i, i + 1)
        one, _, _ = call(q[:, cut], k_new[:, cut], v_new[:, cut], kc, vc, positions[:, cut],
                         slots[:, cut])
        np.testing.assert_array_equal(np.where(real[:, cut], got[:, cut], 0),
                                      np.where(real[:, cut], one, 0))


def test_scan_over_kernel_stacks_compiles_one_layer_body(isa):
    """run_layout on CPU keeps the layers stacked as kernel stacks: a decode step's program
    calls each kernel as often for 4 layers as for 2 (one scanned layer body, not L unrolled
    ones), and its logits and cache equal those of the same weights in per-layer buffers."""
    counts = {}
    for n_layers in (2, 4):
        config = models.LlamaConfig.tiny(n_layers=n_layers, head_dim=16)
        params = models.init_params(config, jax.random.key(n_layers))
        stacked = generate.run_layout(params, config)
        per_layer = generate.run_layout(params, config, unstack=True)
        assert isinstance(stacked["layers"]["mlp"]["down"], kernels.NativeWeight)
        prompt = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
        prompt_pos = jnp.asarray([[0, 1, 2, 3], [-1, -1, 0, 1]])  # row 1 left padded
        tokens, positions = jnp.asarray([[3], [7]]), jnp.asarray([[4], [2]])
        fn = jax.jit(functools.partial(models.forward, config))
        outs = []
        for run in (stacked, per_layer):
            cache = models.init_cache(config, 2, 8, per_layer=run is per_layer,
                                      attention=kernels.attention_for(run, jnp.float32))
            _, cache = fn(run, prompt, prompt_pos, cache)  # prefill: XLA's attention
            if run is stacked:
                text = fn.lower(run, tokens, positions, cache).as_text()
                counts[n_layers] = [text.count(f"@{kernels.target(kind, isa)}(")
                                    for kind in ("matmul_many", "glu", "matmul", "attend")]
            outs.append(fn(run, tokens, positions, cache))
        (la, ca), (lb, cb) = outs
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ca.k, jnp.stack(cb.k), rtol=1e-6, atol=1e-6)
    assert counts[2] == counts[4] and all(c >= 1 for c in counts[4]), counts
