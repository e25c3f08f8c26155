"""Building blocks shared by the model families: parameters, the dispatching matmul, norms,
RoPE and masked attention. Plain functions of arrays; the Flax modules call them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import cache as kvc
from models.config import RopeScaling

# A window larger than any context: "no sliding window".
NO_WINDOW = np.iinfo(np.int32).max
DEFAULT_INIT = nn.initializers.normal(0.02)


def weight(mod: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init=DEFAULT_INIT, dtype=jnp.float32):
    """Declare (at init) or fetch (at apply) parameter `name` with logical axis names `axes`.

    The value given at apply time may be any pytree leaf the ops below understand (a float
    array, or a quantized/sparse weight object): unlike `Module.param`, no shape check is made
    against the declared shape, so parameter transforms never need model changes.
    """
    assert len(shape) == len(axes), (name, shape, axes)

    def make():
        return nn.LogicallyPartitioned(init(mod.make_rng("params"), shape, dtype), axes)

    return mod.variable("params", name, make).value


def last_token(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, 1, D] at each row's last real token (its highest position): the
    last column of a left-padded row, the last non-padding one of a right-padded row."""
    idx = jnp.argmax(positions, axis=1)[:, None, None]
    return jnp.take_along_axis(x, idx, axis=1)


def run_layers(mod: nn.Module, block, config, n_layers: int, carry, per_layer, *shared,
               unroll: int = 1, unstacked: bool = False, **block_attrs):
    """Apply `n_layers` decoder blocks in sequence: carry -> carry.

    per_layer: arrays with a leading L axis (the block gets row i; numpy arrays stay static
    in the unstacked loop, so a block may index per-layer tuples with them); shared: passed
    to every layer unchanged. Stacked (default): a scan over params "layers" whose leaves carry a
    leading L axis (`nn.scan` when initialising; when applying, `jax.lax.scan` over the layer
    index with each layer's params from `at_layer`, so leaves that read their layer in place,
    the native kernels' stacks, are not sliced). Unstacked: a Python loop over blocks
    "layers_0" .. "layers_{L-1}", one buffer per layer: XLA:CPU then multiplies each layer's
    weights in place instead of copying the layer's slice out of the stacked buffer at every
    step (see docs/DESIGN.md).
    block_attrs: extra (static) attributes of every block module.
    """
    if not unstacked and not mod.is_initializing():
        stack = mod.variables["params"]["layers"]
        one = block(config, parent=None, **block_attrs)

        def body(carry, xs):
            i, row = xs
            carry, _ = one.apply({"params": at_layer(stack, i)}, carry, row, *shared)
            return carry, None

        xs = (jnp.arange(n_layers, dtype=jnp.int32), per_layer)
        return jax.lax.scan(body, carry, xs, unroll=unroll)[0]
    if not unstacked:
        scanned = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0,) + (nn.broadcast,) * len(shared), length=n_layers, unroll=unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config, name="layers", parent=mod, **block_attrs)
        return scanned(carry, per_layer, *shared)[0]
    for i in range(n_layers):
        row = jax.tree.map(lambda a, i=i: a[i], per_layer)
        carry, _ = block(config, name=f"layers_{i}", parent=mod, **block_attrs)(carry, row,
                                                                               *shared)
    return carry


def at_layer(stack, i):
    """Layer i (an int32 scalar) of a tree of stacked leaves [L, ...]: a leaf with an
    `at_layer(i)` method (the native kernels' stacks) gives its view of layer i, read in place;
    any other array is sliced (a[i])."""
    def view(a):
        return a.at_layer(i) if hasattr(a, "at_layer") else a[i]

    return jax.tree.map(view, stack, is_leaf=lambda a: hasattr(a, "at_layer"))


def linear(x: jax.Array, w, b=None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out]) -> [..., out].

    The one matmul every projection goes through. A plain array is multiplied directly; any
    other weight type (quantized, sparse) supplies `w.matmul(x)`, so new schemes plug in here.
    """
    y = x @ w.astype(x.dtype) if isinstance(w, jax.Array | np.ndarray) else w.matmul(x)
    if b is not None:
        y = y + b.astype(y.dtype)
    return y


def linear_many(x: jax.Array, ws: list, bs: list) -> list[jax.Array]:
    """[linear(x, w, b) for w, b in zip(ws, bs)]: several projections of one input x [..., in].

    Weights of one type that can run together (a `matmul_many(x, others)` method) do so, in
    one call; the biases are added after.
    """
    first = ws[0]
    if hasattr(first, "matmul_many") and all(type(w) is type(first) for w in ws):
        ys = first.matmul_many(x, list(ws[1:]))
        return [y if b is None else y + b.astype(y.dtype) for y, b in zip(ys, bs, strict=True)]
    return [linear(x, w, b) for w, b in zip(ws, bs, strict=True)]


def swiglu(x: jax.Array, gate, up, gate_bias=None, up_bias=None) -> jax.Array:
    """silu(x @ gate + gate_bias) * (x @ up + up_bias): x [..., in] -> [..., hidden].

    Without biases, a gate weight with a `glu(x, up)` method (and an up weight of the same
    type) computes the whole product in one call.
    """
    if (gate_bias is None and up_bias is None and hasattr(gate, "glu")
            and type(up) is type(gate)):
        return gate.glu(x, up)
    return jax.nn.silu(linear(x, gate, gate_bias)) * linear(x, up, up_bias)


def gated_mlp_hidden(x: jax.Array, gate, up, activation: str, gate_bias=None,
                     up_bias=None) -> jax.Array:
    """act(x @ gate + gate_bias) * (x @ up + up_bias): x [..., in] -> [..., hidden].

    activation "silu" is `swiglu`; "gelu_tanh" (GeGLU, Gemma) runs both projections through
    `linear_many` and GELU's tanh approximation on the gate.
    """
    if activation == "silu":
        return swiglu(x, gate, up, gate_bias, up_bias)
    if activation != "gelu_tanh":
        raise ValueError(f"unknown activation {activation!r}")
    g, u = linear_many(x, [gate, up], [gate_bias, up_bias])
    return jax.nn.gelu(g, approximate=True) * u


def embed_lookup(table, tokens: jax.Array) -> jax.Array:
    """Rows of table [V, D] for tokens [B, T] -> [B, T, D]."""
    if isinstance(table, jax.Array | np.ndarray):
        return jnp.take(table, tokens, axis=0)
    return table.take_rows(tokens)


def unembed(x: jax.Array, table) -> jax.Array:
    """Tied LM head: x [B, T, D] @ table[V, D]^T -> [B, T, V]."""
    if isinstance(table, jax.Array | np.ndarray):
        return x @ table.astype(x.dtype).T
    return table.matmul_transposed(x)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis, computed in float32: x [..., D], w [D].

    plus_one (Gemma): scale by (1 + w), in float32 before the cast back (as HF Gemma does);
    otherwise the normalised x is cast back first and scaled by w (as HF Llama does).
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return (y.astype(x.dtype) * w.astype(x.dtype))


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32: x [..., D], w/b [D]."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with linear or llama3 scaling applied."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    if scaling.kind == "factors":
        factors = np.asarray(scaling.factors, np.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"{factors.size} RoPE frequency factors for head_dim {head_dim}")
        return (inv / factors).astype(np.float32)
    if scaling.kind == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unknown RoPE scaling kind {scaling.kind!r}")


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H/2] (float32) of the RoPE angles for positions [B, T]."""
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    freqs = pos[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, N, H] by positions [B, T] (half-split layout, as Hugging Face Llama)."""
    cos, sin = rope_tables(positions, inv_freq)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array:
    """Which keys each query may see: q_pos [B, T], k_pos [B, S] -> bool [B, T, S].

    A key is visible when it holds a real token (k_pos >= 0), is not in the future, and lies
    inside the sliding window (q_pos - k_pos < window).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    return (k >= 0) & (k <= q) & (q - k < window)


def self_attention(q, k, v, positions, k_pos, window, layer, slots, cache_kv, kernel=None,
                   inv_freq=None):
    """Attention of the new tokens, with the cache if there is one.

    q [B, T, N, H]; k, v [B, T, K, H] (new; q and k before RoPE, rotated here by positions
    when inv_freq [H/2] is given); positions [B, T]; k_pos: the key positions (cache.pos with
    a cache, else positions); cache_kv: the carried cache buffers (KVCache.layer_buffers) or
    None. Returns (out [B, T, N * H], updated cache_kv or None).
    Without a cache, attends over k, v alone; with one, writes k, v at `slots` [B, T] and
    attends over everything cached. kernel (optional, KVCache.attention) takes over on float
    buffers (per-layer, or stacked with the layer index), rotating, writing and attending in
    one call:
    kernel(q, k, v, k_buf, v_buf, positions, k_pos, window, slots, inv_freq, layer=...)
    -> (out, k_buf, v_buf).
    """
    if cache_kv is not None:
        ck, cv, ks, _ = cache_kv
        if kernel is not None and ks is None:
            if not isinstance(ck, tuple):  # stacked [L, B, ...]: the kernel reads its layer
                out, kb, vb = kernel(q, k, v, ck, cv, positions, k_pos, window, slots, inv_freq,
                                     layer=layer)
                return out, (kb, vb, None, None)
            out, kb, vb = kernel(q, k, v, ck[int(layer)], cv[int(layer)], positions, k_pos,
                                 window, slots, inv_freq)
            return out, (kvc.replace_layer(ck, layer, kb), kvc.replace_layer(cv, layer, vb),
                         None, None)
    if inv_freq is not None:
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache_kv is None:
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, K, H, T], [B, K, T, H]
        return attend(q, k, v, attention_mask(positions, k_pos, window)), None
    cache_kv = kvc.write_kv(cache_kv, layer, slots, k, v)
    k, v = kvc.read_kv(cache_kv, layer, q.dtype)
    b, s = k_pos.shape  # the rows attending and the visible slots (KVCache.visible_pos):
    k, v = k[:b, ..., :s], v[:b, ..., :s, :]  # the first rows (cache.head_rows) and slots
    return attend(q, k, v, attention_mask(positions, k_pos, window)), cache_kv


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q [B, T, N, H]; keys k [B, K, H, S] (slots last), values v [B, K, S, H], N % K == 0;
    mask bool [B, T, S] -> [B, T, N * H].
    Scores and softmax in float32. A query that sees no key gets a uniform average (no NaN).
    Two batched dots (einsum): with keys slots-last, XLA:CPU runs them 2-4x faster than a
    multiply-and-reduce for batched decode (measured, docs/BENCHMARKS.md).
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    scores = jnp.einsum("bkgth,bkhs->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h).astype(q.dtype)
