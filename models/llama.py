"""Llama-family decoder in Flax: Llama 2/3, SmolLM2, Mistral (sliding window), Qwen2 (qkv bias),
Qwen3 (q/k norms), Phi-3 (its fused qkv / gate_up weights are split when loaded), Gemma 3 (norms
around attention and MLP, q/k norms, GeGLU, local and global layers), and the mixture-of-experts
Mixtral and Qwen3-MoE (`models.moe`: the MLP's place taken by a routed set of experts).

Parameters (2-D projection weights are [in, out]; every per-layer leaf has a leading L axis):
  embed [V, D]; final_norm [D]; lm_head [D, V] (untied only)
  layers/attn_norm [L, D], layers/mlp_norm [L, D] (the norms before attention and the MLP)
  layers/attn_post_norm [L, D], layers/mlp_post_norm [L, D] (post_norms: on their outputs)
  layers/attn/{q [L, D, N*H], k [L, D, K*H], v [L, D, K*H], o [L, N*H, D]} (+ q_bias, k_bias,
    v_bias [L, *], o_bias [L, D] when configured; q_norm, k_norm [L, H] with qk_norm)
  layers/mlp/{gate [L, D, F], up [L, D, F], down [L, F, D]} (+ *_bias when configured)
  layers/moe/{router [L, D, E], gate [L, E, D, F], up [L, E, D, F], down [L, E, F, D]}
    instead of layers/mlp with n_experts (see models.moe)
With norm_plus_one (Gemma) every norm weight w scales by (1 + w), as HF stores it.

Per-layer API (see `models.embed`, `models.apply_layer`, `models.head`): `embed`, `apply_layer`
and `head` below run the model piece by piece; the Flax module `Llama` calls the same code.
"""

from __future__ import annotations

import math
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
    gated_mlp_hidden,
    last_token,
    linear,
    linear_many,
    rms_norm,
    rope_inv_freq,
    run_layers,
    self_attention,
    unembed,
    weight,
)
from models.moe import MoE

ZEROS = nn.initializers.zeros
ONES = nn.initializers.ones

# Calibration sites of one layer (`models.input_sites`): each input some projections multiply ->
# those projections (paths under the layer's params), in the order the layer applies them.
SITES = {
    "attn_in": ("attn/q", "attn/k", "attn/v"),  # rms_norm(x) [D]
    "o_in": ("attn/o",),  # attention output [N*H]
    "mlp_in": ("mlp/gate", "mlp/up"),  # rms_norm(x) [D]
    "down_in": ("mlp/down",),  # act(gate(x)) * up(x) [F]
}
# With n_experts: the MLP sites name expert stacks [E, in, out]; expert e multiplies only the
# tokens that ROUTER (moe/router [D, E], read by `models.moe.routing`) routes to it.
MOE_SITES = {
    **SITES,
    "mlp_in": ("moe/gate", "moe/up"),  # rms_norm(x) [D], the routed tokens of each expert
    "down_in": ("moe/down",),  # each expert's act(gate(x)) * up(x) [F] on its routed tokens
}
ROUTER = "moe/router"


def _norm_weight(mod: nn.Module, name: str, size: int, axis: str, config: LlamaConfig):
    """An RMSNorm weight [size]; initialised to the identity scale (0 when it scales by 1 + w)."""
    return weight(mod, name, (size,), (axis,), ZEROS if config.norm_plus_one else ONES)


class Attention(nn.Module):
    """Self-attention of one layer with RoPE, GQA and an optional cache write."""

    config: LlamaConfig
    kernel: Callable | None = None  # decode attention kernel (see KVCache.attention)

    @nn.compact
    def __call__(self, x, positions, k_pos, window, inv_freq, layer, slots, cache_kv):
        """x [B, T, D] -> ([B, T, D], updated cache buffers (see KVCache.layer_buffers) or None).

        window: this layer's sliding window (NO_WINDOW: none); inv_freq [H/2]: its RoPE
        frequencies (see `layer_inputs`).
        """
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
        if c.qk_norm:
            q = rms_norm(q, _norm_weight(self, "q_norm", h, "head_dim", c), c.norm_eps,
                         c.norm_plus_one)
            k = rms_norm(k, _norm_weight(self, "k_norm", h, "head_dim", c), c.norm_eps,
                         c.norm_plus_one)
        if c.query_scale is not None and c.query_scale * math.sqrt(h) != 1.0:
            # attention scales scores by 1 / sqrt(H) (here and in the kernels): fold the rest
            # into q (RoPE is linear, so before it is the same)
            q = q * jnp.asarray(c.query_scale * math.sqrt(h), q.dtype)
        out, cache_kv = self_attention(q, k, v, positions, k_pos, window, layer, slots, cache_kv,
                                       self.kernel, inv_freq)
        wo = weight(self, "o", (n * h, d), ("heads", "embed"))
        bo = weight(self, "o_bias", (d,), ("embed",), ZEROS) if c.o_bias else None
        return linear(out, wo, bo), cache_kv


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act silu (SwiGLU) or GELU-tanh."""

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
        hidden = gated_mlp_hidden(x, wg, wu, c.activation, bg, bu)
        return linear(hidden, *proj("down", (c.d_ff, c.d_model), ("mlp", "embed")))


class Block(nn.Module):
    """One pre-norm decoder layer; scanned over the L axis by `Llama`."""

    config: LlamaConfig
    kernel: Callable | None = None

    @nn.compact
    def __call__(self, carry, per_layer, positions, k_pos, slots):
        """carry = (x [B, T, D], cache (k, v) or None); per_layer = (layer index, window,
        inv_freq), one row of `layer_inputs`."""
        c = self.config
        x, cache_kv = carry
        layer, window, inv_freq = per_layer

        def norm(name, y):
            w = _norm_weight(self, name, c.d_model, "embed", c)
            return rms_norm(y, w, c.norm_eps, c.norm_plus_one)

        a, cache_kv = Attention(c, self.kernel, name="attn")(
            norm("attn_norm", x), positions, k_pos, window, inv_freq, layer, slots, cache_kv)
        x = x + (norm("attn_post_norm", a) if c.post_norms else a)
        mlp = MoE(c, name="moe") if c.n_experts else MLP(c, name="mlp")
        m = mlp(norm("mlp_norm", x))
        x = x + (norm("mlp_post_norm", m) if c.post_norms else m)
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
        top["final_norm"] = _norm_weight(self, "final_norm", c.d_model, "embed", c)
        if not c.tie_embeddings:
            top["lm_head"] = weight(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"))
        logits = head(c, top, last_token(x, positions) if last_only else x)
        if cache is not None:
            cache = cache.replace(k=cache_kv[0], v=cache_kv[1], k_scale=cache_kv[2],
                                  v_scale=cache_kv[3])
        return logits, cache


# ----------------------------------------------------------------------------- per-layer API


def layer_inputs(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What `Block` gets per layer: (layer index int32 [L], sliding window int32 [L],
    NO_WINDOW where the layer attends to the whole context, RoPE inverse frequencies float32
    [L, H/2]: local_rope_theta without scaling on sliding-window layers when it is set,
    else rope_theta with rope_scaling)."""
    c = config
    per_layer = c.sliding_windows or (None,) * c.n_layers
    windows = np.array([NO_WINDOW if w is None else w for w in per_layer], np.int32)
    full = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    local = full if c.local_rope_theta is None else rope_inv_freq(c.head_dim,
                                                                  c.local_rope_theta, None)
    inv_freq = np.stack([full if w is None else local for w in per_layer])
    return np.arange(c.n_layers, dtype=np.int32), windows, inv_freq


def embed(config: LlamaConfig, params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings: tokens [B, T] -> x [B, T, D] in the table's dtype, times sqrt(D) (in
    that dtype) with scale_embeddings (positions unused: RoPE is applied inside attention)."""
    table = params["embed"]
    dtype = jnp.dtype(getattr(table, "dtype", jnp.float32))
    x = embed_lookup(table, tokens).astype(dtype)
    return x * jnp.asarray(math.sqrt(config.d_model), dtype) if config.scale_embeddings else x


def apply_layer(config: LlamaConfig, layer_params, x: jax.Array, positions: jax.Array,
                layer) -> jax.Array:
    """Decoder layer `layer` (int or int32 scalar) without a cache: x [B, T, D] -> [B, T, D]."""
    per_layer = tuple(jnp.asarray(a)[layer] for a in layer_inputs(config))
    (y, _), _ = Block(config).apply({"params": layer_params}, (x, None), per_layer, positions,
                                    positions, None)
    return y


def head(config: LlamaConfig, params, x: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head (tied: the embedding table): x [B, T, D] -> float32 [B, T, V]."""
    x = rms_norm(x, params["final_norm"], config.norm_eps, config.norm_plus_one)
    logits = unembed(x, params["embed"]) if config.tie_embeddings else linear(x, params["lm_head"])
    return logits.astype(jnp.float32)
