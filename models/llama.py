"""Llama-family decoder in Flax: Llama 2/3, SmolLM2, Mistral (sliding window), Qwen2 (qkv bias).

Parameters (2-D projection weights are [in, out]; every per-layer leaf has a leading L axis):
  embed [V, D]; final_norm [D]; lm_head [D, V] (untied only)
  layers/attn_norm [L, D], layers/mlp_norm [L, D]
  layers/attn/{q [L, D, N*H], k [L, D, K*H], v [L, D, K*H], o [L, N*H, D]} (+ q_bias, k_bias,
    v_bias [L, *], o_bias [L, D] when configured)
  layers/mlp/{gate [L, D, F], up [L, D, F], down [L, F, D]} (+ *_bias when configured)

Per-layer API (see `models.embed`, `models.apply_layer`, `models.head`): `embed`, `apply_layer`
and `head` below run the model piece by piece; the Flax module `Llama` calls the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import cache as kvc
from models.config import LlamaConfig
from models.layers import (
    NO_WINDOW,
    embed_lookup,
    last_token,
    linear,
    linear_many,
    rms_norm,
    rope_inv_freq,
    run_layers,
    self_attention,
    swiglu,
    unembed,
    weight,
)

ZEROS = nn.initializers.zeros
ONES = nn.initializers.ones

# Calibration sites of one layer (`models.input_sites`): each input some projections multiply ->
# those projections (paths under the layer's params), in the order the layer applies them.
SITES = {
    "attn_in": ("attn/q", "attn/k", "attn/v"),  # rms_norm(x) [D]
    "o_in": ("attn/o",),  # attention output [N*H]
    "mlp_in": ("mlp/gate", "mlp/up"),  # rms_norm(x) [D]
    "down_in": ("mlp/down",),  # silu(gate(x)) * up(x) [F]
}


class Attention(nn.Module):
    """Self-attention of one layer with RoPE, GQA and an optional cache write."""

    config: LlamaConfig
    kernel: Callable | None = None  # decode attention kernel (see KVCache.attention)

    @nn.compact
    def __call__(self, x, positions, k_pos, window, layer, slots, cache_kv):
        """x [B, T, D] -> ([B, T, D], updated cache buffers (see KVCache.layer_buffers) or None)."""
        c = self.config
        d, n, kv, h = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        b, t, _ = x.shape

        def proj(name, out, out_axis):
            w = weight(self, name, (d, out), ("embed", out_axis))
            bb = weight(self, name + "_bias", (out,), (out_axis,), ZEROS) if c.qkv_bias else None
            return w, bb

        (wq, bq), (wk, bk), (wv, bv) = (proj("q", n * h, "heads"), proj("k", kv * h, "kv_heads"),
                                        proj("v", kv * h, "kv_heads"))
        q, k, v = linear_many(x, [wq, wk, wv], [bq, bk, bv])
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)
        inv_freq = rope_inv_freq(h, c.rope_theta, c.rope_scaling)
        out, cache_kv = self_attention(q, k, v, positions, k_pos, window, layer, slots, cache_kv,
                                       self.kernel, inv_freq)
        wo = weight(self, "o", (n * h, d), ("heads", "embed"))
        bo = weight(self, "o_bias", (d,), ("embed",), ZEROS) if c.o_bias else None
        return linear(out, wo, bo), cache_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        c = self.config

        def proj(name, shape, axes):
            w = weight(self, name, shape, axes)
            bb = weight(self, name + "_bias", shape[1:], axes[1:], ZEROS) if c.mlp_bias else None
            return w, bb

        (wg, bg), (wu, bu) = (proj("gate", (c.d_model, c.d_ff), ("embed", "mlp")),
                              proj("up", (c.d_model, c.d_ff), ("embed", "mlp")))
        hidden = swiglu(x, wg, wu, bg, bu)
        return linear(hidden, *proj("down", (c.d_ff, c.d_model), ("mlp", "embed")))


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over the L axis by `Llama`."""

    config: LlamaConfig
    kernel: Callable | None = None

    @nn.compact
    def __call__(self, carry, per_layer, positions, k_pos, slots):
        """carry = (x [B, T, D], cache (k, v) or None); per_layer = (layer index, window)."""
        c = self.config
        x, cache_kv = carry
        layer, window = per_layer
        attn_norm = weight(self, "attn_norm", (c.d_model,), ("embed",), ONES)
        mlp_norm = weight(self, "mlp_norm", (c.d_model,), ("embed",), ONES)
        a, cache_kv = Attention(c, self.kernel, name="attn")(
            rms_norm(x, attn_norm, c.norm_eps), positions, k_pos, window, layer, slots, cache_kv)
        x = x + a
        x = x + MLP(c, name="mlp")(rms_norm(x, mlp_norm, c.norm_eps))
        return (x, cache_kv), None


class Llama(nn.Module):
    """The full model: forward(tokens, positions, cache) -> (logits, cache)."""

    config: LlamaConfig
    scan_unroll: int = 1  # layers unrolled per scan iteration (static)
    unstacked: bool = False  # params "layers_0".."layers_{L-1}" instead of stacked "layers"

    @nn.compact
    def __call__(self, tokens, positions, cache: kvc.KVCache | None = None, last_only=False):
        """tokens, positions [B, T] int32 (position -1 = padding) -> logits [B, T, V] float32.

        last_only: logits of each row's last real token only ([B, 1, V]; see last_token).
        """
        c = self.config
        top = {"embed": weight(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"))}
        x = embed(c, top, tokens, positions)
        if cache is None:
            k_pos, slots, cache_kv = positions, None, None
        else:
            cache, slots = kvc.write_positions(cache, positions)
            k_pos, cache_kv = cache.visible_pos(), cache.layer_buffers()
        x, cache_kv = run_layers(self, Block, c, c.n_layers, (x, cache_kv), layer_inputs(c),
                                 positions, k_pos, slots, unroll=self.scan_unroll,
                                 unstacked=self.unstacked,
                                 kernel=None if cache is None else cache.attention)
        top["final_norm"] = weight(self, "final_norm", (c.d_model,), ("embed",), ONES)
        if not c.tie_embeddings:
            top["lm_head"] = weight(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"))
        logits = head(c, top, last_token(x, positions) if last_only else x)
        if cache is not None:
            cache = cache.replace(k=cache_kv[0], v=cache_kv[1], k_scale=cache_kv[2],
                                  v_scale=cache_kv[3])
        return logits, cache


# ----------------------------------------------------------------------------- per-layer API


def layer_inputs(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """What `Block` gets per layer: (layer index int32 [L], sliding window int32 [L],
    NO_WINDOW where the layer attends to the whole context)."""
    windows = np.array([NO_WINDOW if w is None else w
                        for w in (config.sliding_windows or (None,) * config.n_layers)], np.int32)
    return np.arange(config.n_layers, dtype=np.int32), windows


def embed(config: LlamaConfig, params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings: tokens [B, T] -> x [B, T, D] in the table's dtype (positions unused:
    RoPE is applied inside attention)."""
    table = params["embed"]
    return embed_lookup(table, tokens).astype(jnp.dtype(getattr(table, "dtype", jnp.float32)))


def apply_layer(config: LlamaConfig, layer_params, x: jax.Array, positions: jax.Array,
                layer) -> jax.Array:
    """Decoder layer `layer` (int or int32 scalar) without a cache: x [B, T, D] -> [B, T, D]."""
    per_layer = (jnp.asarray(layer, jnp.int32), jnp.asarray(layer_inputs(config)[1])[layer])
    (y, _), _ = Block(config).apply({"params": layer_params}, (x, None), per_layer, positions,
                                    positions, None)
    return y


def head(config: LlamaConfig, params, x: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head (tied: the embedding table): x [B, T, D] -> float32 [B, T, V]."""
    x = rms_norm(x, params["final_norm"], config.norm_eps)
    logits = unembed(x, params["embed"]) if config.tie_embeddings else linear(x, params["lm_head"])
    return logits.astype(jnp.float32)
