"""GPT-2 in Flax: learned positions, pre-LayerNorm, fused qkv projection, GELU MLP, tied head.

Parameters (2-D weights [in, out]; per-layer leaves have a leading L axis):
  wte [V, D]; wpe [P, D]; ln_f_scale, ln_f_bias [D]
  layers/{ln1_scale, ln1_bias, ln2_scale, ln2_bias [L, D]}
  layers/attn/{qkv [L, D, 3*D], qkv_bias [L, 3*D], o [L, D, D], o_bias [L, D]}
  layers/mlp/{fc [L, D, F], fc_bias [L, F], proj [L, F, D], proj_bias [L, D]}

Per-layer API (see `models.embed`, `models.apply_layer`, `models.head`): `embed`, `apply_layer`
and `head` below run the model piece by piece; the Flax module `GPT2` calls the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import cache as kvc
from models.config import GPT2Config
from models.layers import (
    NO_WINDOW,
    embed_lookup,
    last_token,
    layer_norm,
    linear,
    run_layers,
    self_attention,
    unembed,
    weight,
)

ZEROS = nn.initializers.zeros
ONES = nn.initializers.ones

# Calibration sites of one layer (`models.input_sites`): each input some projections multiply ->
# those projections (paths under the layer's params).
SITES = {
    "attn_in": ("attn/qkv",),  # layer_norm(x) [D]
    "o_in": ("attn/o",),  # attention output [D]
    "mlp_in": ("mlp/fc",),  # layer_norm(x) [D]
    "down_in": ("mlp/proj",),  # gelu(fc(x)) [F]
}


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    config: GPT2Config
    kernel: Callable | None = None  # decode attention kernel (see KVCache.attention)

    @nn.compact
    def __call__(self, x, positions, k_pos, layer, slots, cache_kv):
        """x [B, T, D] -> ([B, T, D], updated cache buffers (see KVCache.layer_buffers) or None)."""
        c = self.config
        d, n, h = c.d_model, c.n_heads, c.head_dim
        b, t, _ = x.shape
        w = weight(self, "qkv", (d, 3 * d), ("embed", "qkv"))
        bias = weight(self, "qkv_bias", (3 * d,), ("qkv",), ZEROS)
        q, k, v = jnp.split(linear(x, w, bias), 3, axis=-1)
        q, k, v = (a.reshape(b, t, n, h) for a in (q, k, v))
        out, cache_kv = self_attention(q, k, v, positions, k_pos, NO_WINDOW, layer, slots,
                                       cache_kv, self.kernel)
        wo = weight(self, "o", (d, d), ("heads", "embed"))
        return linear(out, wo, weight(self, "o_bias", (d,), ("embed",), ZEROS)), cache_kv


class MLP(nn.Module):
    """fc -> GELU -> proj."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        c = self.config
        hidden = linear(x, weight(self, "fc", (c.d_model, c.d_ff), ("embed", "mlp")),
                        weight(self, "fc_bias", (c.d_ff,), ("mlp",), ZEROS))
        hidden = jax.nn.gelu(hidden, approximate=c.activation == "gelu_new")
        return linear(hidden, weight(self, "proj", (c.d_ff, c.d_model), ("mlp", "embed")),
                      weight(self, "proj_bias", (c.d_model,), ("embed",), ZEROS))


class Block(nn.Module):
    """One GPT-2 layer; scanned over the L axis by `GPT2`."""

    config: GPT2Config
    kernel: Callable | None = None

    @nn.compact
    def __call__(self, carry, layer, positions, k_pos, slots):
        """carry = (x [B, T, D], cache (k, v) or None); layer = layer index."""
        c = self.config
        x, cache_kv = carry

        def ln(name, y):
            scale = weight(self, name + "_scale", (c.d_model,), ("embed",), ONES)
            bias = weight(self, name + "_bias", (c.d_model,), ("embed",), ZEROS)
            return layer_norm(y, scale, bias, c.norm_eps)

        a, cache_kv = Attention(c, self.kernel, name="attn")(ln("ln1", x), positions, k_pos,
                                                             layer, slots, cache_kv)
        x = x + a
        x = x + MLP(c, name="mlp")(ln("ln2", x))
        return (x, cache_kv), None


class GPT2(nn.Module):
    """The full model: forward(tokens, positions, cache) -> (logits, cache)."""

    config: GPT2Config
    scan_unroll: int = 1
    unstacked: bool = False  # params "layers_0".."layers_{L-1}" instead of stacked "layers"

    @nn.compact
    def __call__(self, tokens, positions, cache: kvc.KVCache | None = None, last_only=False):
        """tokens, positions [B, T] int32 (position -1 = padding) -> logits [B, T, V] float32.

        last_only: logits of each row's last real token only ([B, 1, V]; see last_token).
        """
        c = self.config
        top = {"wte": weight(self, "wte", (c.vocab_size, c.d_model), ("vocab", "embed")),
               "wpe": weight(self, "wpe", (c.max_seq_len, c.d_model), ("positions", "embed"))}
        x = embed(c, top, tokens, positions)
        if cache is None:
            k_pos, slots, cache_kv = positions, None, None
        else:
            cache, slots = kvc.write_positions(cache, positions)
            k_pos, cache_kv = cache.visible_pos(), cache.layer_buffers()
        x, cache_kv = run_layers(self, Block, c, c.n_layers, (x, cache_kv),
                                 np.arange(c.n_layers, dtype=np.int32), positions, k_pos, slots,
                                 unroll=self.scan_unroll, unstacked=self.unstacked,
                                 kernel=None if cache is None else cache.attention)
        top["ln_f_scale"] = weight(self, "ln_f_scale", (c.d_model,), ("embed",), ONES)
        top["ln_f_bias"] = weight(self, "ln_f_bias", (c.d_model,), ("embed",), ZEROS)
        logits = head(c, top, last_token(x, positions) if last_only else x)
        if cache is not None:
            cache = cache.replace(k=cache_kv[0], v=cache_kv[1], k_scale=cache_kv[2],
                                  v_scale=cache_kv[3])
        return logits, cache


# ----------------------------------------------------------------------------- per-layer API


def embed(config: GPT2Config, params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token plus learned position embeddings: tokens, positions [B, T] -> x [B, T, D] in the
    token table's dtype (padding, position -1, reads position 0)."""
    wte, wpe = params["wte"], params["wpe"]
    dtype = jnp.dtype(getattr(wte, "dtype", jnp.float32))
    x = embed_lookup(wte, tokens).astype(dtype)
    return x + embed_lookup(wpe, jnp.maximum(positions, 0)).astype(dtype)


def apply_layer(config: GPT2Config, layer_params, x: jax.Array, positions: jax.Array,
                layer) -> jax.Array:
    """Layer `layer` (int or int32 scalar) without a cache: x [B, T, D] -> [B, T, D]."""
    (y, _), _ = Block(config).apply({"params": layer_params}, (x, None),
                                    jnp.asarray(layer, jnp.int32), positions, positions, None)
    return y


def head(config: GPT2Config, params, x: jax.Array) -> jax.Array:
    """Final LayerNorm and the tied LM head: x [B, T, D] -> float32 [B, T, V]."""
    x = layer_norm(x, params["ln_f_scale"], params["ln_f_bias"], config.norm_eps)
    return unembed(x, params["wte"]).astype(jnp.float32)
