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
    """k, v: [L, B, K, S, H]; pos: [B, S] int32 (-1 = empty); end: [B] int32 next free slot.

    Heads come before slots so each head's keys are contiguous for the decode attention.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens each."""
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch, max_len), -1, jnp.int32),
        end=jnp.zeros((batch,), jnp.int32),
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


def write_layer(buf: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write new keys or values [B, T, K, H] of layer `layer` into buf [L, B, K, S, H] at slots [B, T]."""
    b, _, k, _ = new.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(k)[None, :, None]
    vals = new.astype(buf.dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]
    return buf.at[layer, rows, heads, slots[:, None, :]].set(vals, mode="drop")
