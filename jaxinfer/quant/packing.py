"""Two 4-bit values per byte.

Layout: along the packed axis, byte k holds element 2k in its low nibble and element 2k + 1 in
its high nibble. For an IN_OUT weight q [in, out] packed along the in axis (axis -2):
    packed[k, o] = q[2k, o] | q[2k + 1, o] << 4          -> uint8 [in / 2, out]
e.g. a column [1, 2, 3, 15] packs to [0x21, 0xF3].
Values are unsigned nibbles 0..15 (symmetric int4 stores q + 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_nibbles(q: jax.Array, axis: int = -2) -> jax.Array:
    """uint8 q [..., n, ...] with values 0..15 -> uint8 [..., n / 2, ...] along `axis` (-2 or -1).

    n must be even.
    """
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 2:
        raise ValueError(f"cannot pack an odd number ({n}) of 4-bit values")
    q = jnp.asarray(q, jnp.uint8)
    pairs = q.reshape(*q.shape[:axis], n // 2, 2, *q.shape[axis + 1:])
    lo = jnp.take(pairs, 0, axis=axis + 1)
    hi = jnp.take(pairs, 1, axis=axis + 1)
    return (lo & 0x0F) | (hi << 4)


def unpack_nibbles(packed: jax.Array, axis: int = -2) -> jax.Array:
    """Inverse of `pack_nibbles`: uint8 [..., m, ...] -> uint8 [..., 2m, ...] (values 0..15).

    Written as a broadcast against the shifts (0, 4) rather than a stack/concatenate: inside
    `nn.scan` XLA:CPU turned the concatenate into a strided copy that made an int4 decode step
    ~7x slower than this form.
    """
    axis = axis % packed.ndim
    packed = jnp.asarray(packed, jnp.uint8)
    shifts = jnp.array([0, 4], jnp.uint8).reshape((2,) + (1,) * (packed.ndim - axis - 1))
    both = (jnp.expand_dims(packed, axis + 1) >> shifts) & 0x0F
    shape = list(packed.shape)
    shape[axis] *= 2
    return both.reshape(shape)
