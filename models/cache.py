"""The KV cache: a pytree of fixed-size buffers passed into `forward` and returned updated.

Each batch row is a *slot* with its own write offset, so rows can start, finish and be refilled
independently (continuous batching). Every slot records the position of the token it holds;
attention masks are built from positions alone (-1 marks an empty slot or a padding token).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """k: [L, B, K, H, S], v: [L, B, K, S, H]; pos: [B, S] int32 (-1 = empty); end: [B] int32
    next free slot.

    Heads come before slots so each head's keys and values are contiguous for the decode
    attention. Keys keep the slots last: a decode query's scores then reduce over H with S as
    the vectorised (minor) axis, which XLA:CPU ran ~20% faster per batch-16 step than keys laid
    out [.., S, H] (docs/BENCHMARKS.md).
    An int8 cache stores k, v as int8 with one float32 scale per token and head in
    k_scale, v_scale [L, B, K, S]; a float cache has them None.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    end: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def layer_buffers(self):
        """(k, v, k_scale, v_scale): what the layers carry and update."""
        return (self.k, self.v, self.k_scale, self.v_scale)

    @property
    def max_len(self) -> int:
        return self.v.shape[3]


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens each.

    dtype int8 makes a quantized cache (per token and head scales).
    """
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    k_shape = (*shape[:3], config.head_dim, max_len)
    quantized = jnp.dtype(dtype) == jnp.int8
    scales = (jnp.zeros(shape[:-1], jnp.float32) for _ in range(2)) if quantized else (None, None)
    return KVCache(
        k=jnp.zeros(k_shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch, max_len), -1, jnp.int32),
        end=jnp.zeros((batch,), jnp.int32),
        k_scale=next(scales) if quantized else None,
        v_scale=next(scales) if quantized else None,
    )


def write_positions(cache: KVCache, positions: jax.Array) -> tuple[KVCache, jax.Array]:
    """Record the positions [B, T] of the tokens about to be written at each row's `end`.

    Returns the cache with `pos` and `end` advanced, and the slot indices [B, T] written.
    """
    t = positions.shape[1]
    slots = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.arange(positions.shape[0])[:, None]
    pos = cache.pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
    return cache.replace(pos=pos, end=cache.end + t), slots


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def write_kv(bufs, layer, slots: jax.Array, k: jax.Array, v: jax.Array):
    """Write one layer's new k, v [B, T, K, H] into the carried buffers (see layer_buffers)."""
    ck, cv, ks, vs = bufs
    if ks is None:
        return (write_keys(ck, layer, slots, k), write_layer(cv, layer, slots, v), None, None)
    (qk, sk), (qv, sv) = _quantize_rows(k), _quantize_rows(v)
    return (write_keys(ck, layer, slots, qk), write_layer(cv, layer, slots, qv),
            write_layer(ks, layer, slots, sk), write_layer(vs, layer, slots, sv))


def read_kv(bufs, layer, dtype) -> tuple[jax.Array, jax.Array]:
    """One layer's keys [B, K, H, S] and values [B, K, S, H] in `dtype` (dequantized if int8)."""
    ck, cv, ks, vs = bufs
    if ks is None:
        return ck[layer], cv[layer]
    return ((ck[layer].astype(jnp.float32) * ks[layer][..., None, :]).astype(dtype),
            (cv[layer].astype(jnp.float32) * vs[layer][..., None]).astype(dtype))


def write_keys(buf: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write new keys [B, T, K, H] of layer `layer` into buf [L, B, K, H, S] at slots [B, T]."""
    b, _, k, h = new.shape
    rows = jnp.arange(b)[:, None, None, None]
    heads = jnp.arange(k)[None, :, None, None]
    dims = jnp.arange(h)[None, None, :, None]
    vals = new.astype(buf.dtype).transpose(0, 2, 3, 1)  # [B, K, H, T]
    return buf.at[layer, rows, heads, dims, slots[:, None, None, :]].set(vals, mode="drop")


def write_layer(buf: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write new [B, T, K, (H)] of layer `layer` into buf [L, B, K, S, (H)] at slots [B, T]."""
    b, _, k = new.shape[:3]
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(k)[None, :, None]
    vals = jnp.swapaxes(new.astype(buf.dtype), 1, 2)  # [B, K, T, (H)]
    return buf.at[layer, rows, heads, slots[:, None, :]].set(vals, mode="drop")
