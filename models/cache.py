"""The KV cache: a pytree of fixed-size buffers passed into `forward` and returned updated.

Each batch row is a *slot* with its own write offset, so rows can start, finish and be refilled
independently (continuous batching). Every slot records the position of the token it holds;
attention masks are built from positions alone (-1 marks an empty slot or a padding token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from models import pytree


def logical(*axes: str, host: bool = False, **kwargs):
    """A field of a pytree struct whose array has these logical axes, one per dimension.

    The runtime's sharding rules read them from the field (a per-layer tuple of buffers drops
    the leading "layers"; a struct of per-row arrays gives each array the leading axes).
    host: the caller reads the field back on the host (replicated across processes).
    """
    return flax.struct.field(metadata={"axes": axes, "host": host}, **kwargs)


@pytree.dataclass
class KVCache:
    """k: [L, B, K, H, S], v: [L, B, K, S, H]; pos: [B, S] int32 (-1 = empty); end: [B] int32
    next free slot.

    Per-layer form (`init_cache(..., per_layer=True)`, used with per-layer params, see
    `models.unstack_layers`): k, v (and the scales) are tuples of L arrays without the L axis.
    Each layer then reads and writes its own buffer: XLA:CPU copies a layer's slice out of the
    stacked buffer at every step otherwise (60 copies of 2.4 MB per SmolLM2 batch-16 step).

    Heads come before slots so each head's keys and values are contiguous for the decode
    attention. Keys keep the slots last: a decode query's scores then reduce over H with S as
    the vectorised (minor) axis, which XLA:CPU ran ~20% faster per batch-16 step than keys laid
    out [.., S, H] (docs/BENCHMARKS.md).
    An int8 cache stores k, v as int8 with one float32 scale per token and head in
    k_scale, v_scale [L, B, K, S]; a float cache has them None.

    attention (static, optional): a kernel the model calls on float buffers (decode steps
    and prefill chunks) instead of its own cache write and attention (see
    models.layers.self_attention); the runtime sets it (a native CPU kernel), the model never
    imports it.
    """

    k: jax.Array = logical("layers", "batch", "kv_heads", "head_dim", "sequence")
    v: jax.Array = logical("layers", "batch", "kv_heads", "sequence", "head_dim")
    pos: jax.Array = logical("batch", "sequence")
    end: jax.Array = logical("batch")
    k_scale: jax.Array | None = logical("layers", "batch", "kv_heads", "sequence", default=None)
    v_scale: jax.Array | None = logical("layers", "batch", "kv_heads", "sequence", default=None)
    attention: Callable | None = flax.struct.field(pytree_node=False, default=None)
    # visible (static, optional): XLA attention reads only the first `visible` slots of every
    # row (the caller guarantees no row holds tokens beyond them); None reads all.
    visible: int | None = flax.struct.field(pytree_node=False, default=None)

    def visible_pos(self) -> jax.Array:
        """The key positions attention reads: pos [B, S], or its first `visible` slots (not
        with an attention kernel, which reads each row's used slots itself)."""
        if self.visible is None or self.attention is not None:
            return self.pos
        return self.pos[:, :self.visible]

    def layer_buffers(self):
        """(k, v, k_scale, v_scale): what the layers carry and update."""
        return (self.k, self.v, self.k_scale, self.v_scale)

    @property
    def per_layer(self) -> bool:
        return isinstance(self.v, tuple)

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2] if self.per_layer else self.v.shape[3]


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32, *,
               per_layer: bool = False, attention: Callable | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens each.

    dtype int8 makes a quantized cache (per token and head scales). per_layer: one buffer per
    layer (tuples of L arrays) instead of stacked [L, ...] arrays. attention: see KVCache.
    """
    n = config.n_layers

    def zeros(*shape, dtype=dtype):
        if per_layer:
            return tuple(jnp.zeros(shape, dtype) for _ in range(n))
        return jnp.zeros((n, *shape), dtype)

    kv, h = config.n_kv_heads, config.head_dim
    quantized = jnp.dtype(dtype) == jnp.int8
    return KVCache(
        k=zeros(batch, kv, h, max_len),
        v=zeros(batch, kv, max_len, h),
        pos=jnp.full((batch, max_len), -1, jnp.int32),
        end=jnp.zeros((batch,), jnp.int32),
        k_scale=zeros(batch, kv, max_len, dtype=jnp.float32) if quantized else None,
        v_scale=zeros(batch, kv, max_len, dtype=jnp.float32) if quantized else None,
        attention=attention,
    )


def write_positions(cache: KVCache, positions: jax.Array) -> tuple[KVCache, jax.Array]:
    """Record the positions [B, T] of the tokens about to be written at each row's `end`.

    Returns the cache with `pos` and `end` advanced, and the slot indices [B, T] written.
    Rows are right-padded (position -1 after the real tokens), and `end` advances by the real
    tokens only: padding, and the single padding token a finished row is fed at each decode
    step, are written (marked empty) where the row's next real token will go, so they never
    take a cache slot.
    """
    t = positions.shape[1]
    slots = cache.end[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.arange(positions.shape[0])[:, None]
    pos = cache.pos.at[rows, slots].set(positions.astype(jnp.int32), mode="drop")
    end = cache.end + jnp.sum(positions >= 0, axis=1, dtype=jnp.int32)
    return cache.replace(pos=pos, end=end), slots


def _map_rows(fn, cache: KVCache, *others: KVCache) -> KVCache:
    """cache with fn(buffer, its logical axes, *the others' buffers) for every buffer (per-layer
    tuples item by item, their axes without the leading "layers")."""
    new = {}
    for f in dataclasses.fields(cache):
        axes, value = f.metadata.get("axes"), getattr(cache, f.name)
        if axes is None or value is None:
            continue
        new[f.name] = jax.tree.map(lambda a, *o, axes=axes: fn(a, axes[len(axes) - a.ndim:], *o),
                                   value, *(getattr(c, f.name) for c in others))
    return cache.replace(**new)


def take_rows(cache: KVCache, rows: jax.Array, length: int | None = None) -> KVCache:
    """The cache of rows [G] (a row index >= B reads some row: its result is for `put_rows` to
    drop); length (static, optional): only their first `length` slots (a window)."""
    def take(a, ax):
        a = jnp.take(a, rows, axis=ax.index("batch"), mode="clip")
        if length is None or "sequence" not in ax:
            return a
        return jax.lax.slice_in_dim(a, 0, length, axis=ax.index("sequence"))

    return _map_rows(take, cache)


def put_rows(cache: KVCache, rows: jax.Array, part: KVCache) -> KVCache:
    """cache with rows [G] replaced by the G-row cache `part` (indices >= B are dropped).

    A `part` of fewer slots than the cache (a window from `take_rows(..., length)`) replaces
    the rows' first slots and empties the rest of them: the caller guarantees that the rows
    hold no token beyond the window.
    """
    w = part.pos.shape[1]

    def put(a, ax, p):
        idx = [slice(None)] * a.ndim
        idx[ax.index("batch")] = rows
        if "sequence" in ax:
            idx[ax.index("sequence")] = slice(0, w)
        return a.at[tuple(idx)].set(p, mode="drop")

    cache = _map_rows(put, cache, part)
    if w == cache.max_len:
        return cache
    return cache.replace(pos=cache.pos.at[rows, w:].set(-1, mode="drop"))


def update_rows(x: jax.Array, axis: int, rows: jax.Array, part: jax.Array) -> jax.Array:
    """x with its entries rows [G] (in range) along `axis` set to part's G entries there,
    one dynamic_update_slice each (in place in a donated buffer, where a scatter is not)."""
    for i in range(part.shape[axis]):
        x = jax.lax.dynamic_update_slice_in_dim(
            x, jax.lax.slice_in_dim(part, i, i + 1, axis=axis).astype(x.dtype), rows[i], axis)
    return x


def write_rows(cache: KVCache, rows: jax.Array, part: KVCache) -> KVCache:
    """cache with rows [G] (in range) replaced by the G-row cache `part` (from `take_rows`
    without a window): keys, values, scales, positions and ends."""
    return _map_rows(lambda x, ax, p: update_rows(x, ax.index("batch"), rows, p), cache, part)


def head_rows(cache: KVCache, rows: int) -> KVCache:
    """The cache as seen by a forward pass over its first `rows` rows: their positions and
    ends, and the whole (shared, B-row) key and value buffers, which the layers write and read
    at rows 0..rows-1 only (`self_attention` reads the first rows of what it reads back)."""
    return cache.replace(pos=cache.pos[:rows], end=cache.end[:rows])


def put_head_rows(cache: KVCache, head: KVCache) -> KVCache:
    """cache updated from `head` (from `head_rows`, after a forward pass)."""
    r = head.end.shape[0]
    return head.replace(pos=cache.pos.at[:r].set(head.pos), end=cache.end.at[:r].set(head.end))


def clear_rows(cache: KVCache, clear: jax.Array) -> KVCache:
    """cache with the rows where clear [B] is True emptied (every slot free, end 0)."""
    return cache.replace(pos=jnp.where(clear[:, None], -1, cache.pos),
                         end=jnp.where(clear, 0, cache.end))


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def write_kv(bufs, layer, slots: jax.Array, k: jax.Array, v: jax.Array):
    """Write one layer's new k, v [B, T, K, H] into the carried buffers (see layer_buffers).

    layer: the layer index (a Python/numpy int for per-layer buffers, may be traced otherwise).
    """
    ck, cv, ks, vs = bufs
    if ks is None:
        return (_write(write_keys, ck, layer, slots, k), _write(write_layer, cv, layer, slots, v),
                None, None)
    (qk, sk), (qv, sv) = _quantize_rows(k), _quantize_rows(v)
    return (_write(write_keys, ck, layer, slots, qk), _write(write_layer, cv, layer, slots, qv),
            _write(write_layer, ks, layer, slots, sk), _write(write_layer, vs, layer, slots, sv))


def _write(write, buf, layer, slots, new):
    """write(buf, layer, slots, new) on a stacked buffer, or on the layer's own entry of a
    per-layer tuple (layer None there: no L axis)."""
    if not isinstance(buf, tuple):
        return write(buf, layer, slots, new)
    return replace_layer(buf, layer, write(buf[int(layer)], None, slots, new))


def replace_layer(buf: tuple, layer, new: jax.Array) -> tuple:
    """A per-layer tuple of buffers with entry `layer` replaced by `new`."""
    i = int(layer)
    return buf[:i] + (new,) + buf[i + 1:]


def read_kv(bufs, layer, dtype) -> tuple[jax.Array, jax.Array]:
    """One layer's keys [B, K, H, S] and values [B, K, S, H] in `dtype` (dequantized if int8,
    widened if float16)."""
    ck, cv, ks, vs = (b if b is None else b[int(layer)] if isinstance(b, tuple) else b[layer]
                      for b in bufs)
    if ks is None:
        return ck.astype(dtype), cv.astype(dtype)
    return ((ck.astype(jnp.float32) * ks[..., None, :]).astype(dtype),
            (cv.astype(jnp.float32) * vs[..., None]).astype(dtype))


def write_keys(buf: jax.Array, layer, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write new keys [B, T, K, H] of layer `layer` into buf [L, B, K, H, S] at slots [B, T]
    (layer None: buf is one layer's [B, K, H, S])."""
    b, _, k, h = new.shape
    rows = jnp.arange(b)[:, None, None, None]
    heads = jnp.arange(k)[None, :, None, None]
    dims = jnp.arange(h)[None, None, :, None]
    vals = new.astype(buf.dtype).transpose(0, 2, 3, 1)  # [B, K, H, T]
    idx = (rows, heads, dims, slots[:, None, None, :])
    return buf.at[idx if layer is None else (layer, *idx)].set(vals, mode="drop")


def write_layer(buf: jax.Array, layer, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Write new [B, T, K, (H)] of layer `layer` into buf [L, B, K, S, (H)] at slots [B, T]
    (layer None: buf is one layer's [B, K, S, (H)])."""
    b, _, k = new.shape[:3]
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(k)[None, :, None]
    vals = jnp.swapaxes(new.astype(buf.dtype), 1, 2)  # [B, K, T, (H)]
    idx = (rows, heads, slots[:, None, :])
    return buf.at[idx if layer is None else (layer, *idx)].set(vals, mode="drop")



def read_prefix(cache: KVCache, row: jax.Array, length: int) -> KVCache:
    """A 1-row cache holding row `row`'s first `length` (static) slots: the keys, values and
    positions of its first tokens (`end` as it is)."""
    return take_rows(cache, jnp.reshape(row, (1,)), length)


def write_prefix(cache: KVCache, row: jax.Array, prefix: KVCache, used: jax.Array) -> KVCache:
    """cache with row `row` holding `prefix` (from `read_prefix`) in its first slots, only its
    first `used` tokens kept (the rest of the row empty, end = used)."""
    def put(a, ax, p):
        if "sequence" not in ax:
            return a
        start = [0] * a.ndim
        start[ax.index("batch")] = row
        return jax.lax.dynamic_update_slice(a, p.astype(a.dtype), start)

    cache = clear_rows(cache, jnp.arange(cache.end.shape[0]) == row)
    cache = _map_rows(put, cache, prefix)
    keep = jnp.arange(cache.pos.shape[1]) < used
    pos = jnp.where((jnp.arange(cache.pos.shape[0]) == row)[:, None] & ~keep[None, :], -1,
                    cache.pos)
    return cache.replace(pos=pos, end=cache.end.at[row].set(used))
