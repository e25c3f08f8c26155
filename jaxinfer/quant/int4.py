"""Group-wise 4-bit weights (`Int4Weight`), two values per byte.

Groups of `group_size` consecutive values along the in axis share one float16 scale (and, when
asymmetric, one float16 minimum):
  symmetric   q in [-8, 7] (stored as q + 8 in a nibble), w ~= q * scale,
              scale = max(max(w) / 7, -min(w) / 8) (the whole range [-8, 7] is used)
  asymmetric  q in [0, 15],                              w ~= q * scale + min,
              min = min(w), scale = (max(w) - min) / 15   (ggml Q4_1's formula)
Scales are rounded up and minimums down when cast to float16, so every value of a group stays
within scale / 2 of its weight. Children (G = in / group_size groups):
  IN_OUT  values uint8 [..., in / 2, out] (packed along in), scales/mins float16 [..., G, out]
  OUT_IN  values uint8 [..., out, in / 2],                   scales/mins float16 [..., out, G]
The matmul dequantizes then multiplies (no per-group dot: on XLA:CPU contracting x [.., G, gs]
against each group and summing scaled partial results was ~2x slower at prefill and no faster at
decode), and it never interleaves nibbles: low nibbles (even inputs) and high nibbles (odd
inputs) are dequantized and multiplied separately, see `Int4Weight._contract`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.base import (
    IN_OUT,
    KernelRows,
    QuantizedWeight,
    check_layout,
    dot_in,
    f16_down,
    f16_up,
    float_dtype_name,
    safe,
    split_axis,
)
from jaxinfer.quant.packing import pack_nibbles, unpack_nibbles
from models import pytree

GROUP_SIZES = (32, 64, 128)


def _grouped(a: jax.Array, layout: str, gs: int) -> jax.Array:
    """[..., in, out] -> [..., G, gs, out] (IN_OUT) or [..., out, in] -> [..., out, G, gs]."""
    if layout == IN_OUT:
        return a.reshape(*a.shape[:-2], a.shape[-2] // gs, gs, a.shape[-1])
    return a.reshape(*a.shape[:-1], a.shape[-1] // gs, gs)


def _ungrouped(a: jax.Array, layout: str) -> jax.Array:
    if layout == IN_OUT:
        return a.reshape(*a.shape[:-3], a.shape[-3] * a.shape[-2], a.shape[-1])
    return a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])


def _group_axis(layout: str) -> int:
    """Axis of a grouped array that runs inside a group."""
    return -2 if layout == IN_OUT else -1


def dequantize_int4(values, scales, mins, layout: str, group_size: int) -> jax.Array:
    """Packed children -> float32 parameter (see the module docstring for shapes)."""
    axis = _group_axis(layout)
    q = _grouped(unpack_nibbles(values, axis), layout, group_size).astype(jnp.float32)
    s = jnp.expand_dims(scales.astype(jnp.float32), axis)
    if mins is None:
        w = (q - 8.0) * s
    else:
        w = q * s + jnp.expand_dims(mins.astype(jnp.float32), axis)
    return _ungrouped(w, layout)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w, group_size: int, symmetric: bool, layout: str):
    """float w -> (packed values, float16 scales, float16 mins or None, all finite?)."""
    w = w.astype(jnp.float32)
    axis = _group_axis(layout)
    g = _grouped(w, layout, group_size)
    if symmetric:
        scales = f16_up(jnp.maximum(jnp.max(g, axis=axis) / 7.0, -jnp.min(g, axis=axis) / 8.0))
        div = jnp.expand_dims(safe(scales.astype(jnp.float32)), axis)
        q = jnp.clip(jnp.round(g / div), -8, 7) + 8
        mins = None
    else:
        mins = f16_down(jnp.min(g, axis=axis))
        m = jnp.expand_dims(mins.astype(jnp.float32), axis)
        scales = f16_up((jnp.max(g, axis=axis) - mins.astype(jnp.float32)) / 15.0)
        div = jnp.expand_dims(safe(scales.astype(jnp.float32)), axis)
        q = jnp.clip(jnp.round((g - m) / div), 0, 15)
    values = pack_nibbles(_ungrouped(q, layout).astype(jnp.uint8), axis)
    return values, scales, mins, jnp.all(jnp.isfinite(w))


@pytree.dataclass
class Int4Weight(QuantizedWeight):
    """4-bit group-wise weight. `mins` is None when symmetric."""

    values: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    layout: str = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @classmethod
    def from_float(cls, w, group_size: int = 128, symmetric: bool = True,
                   layout: str = IN_OUT) -> Int4Weight:
        """Quantize float w ([..., in, out] for IN_OUT, [..., out, in] for OUT_IN).

        ValueError if group_size does not divide the in dimension or is odd.
        """
        check_layout(layout)
        n_in = w.shape[-2] if layout == IN_OUT else w.shape[-1]
        if group_size <= 0 or group_size % 2 or n_in % group_size:
            raise ValueError(f"group size {group_size} does not divide the input dimension "
                             f"{n_in} (or is not a positive even number)")
        dtype = float_dtype_name(w.dtype)
        values, scales, mins, finite = _quantize(jnp.asarray(w), group_size, symmetric, layout)
        if not bool(finite):
            raise ValueError("weights contain NaN or infinity")
        return cls(values=values, scales=scales, mins=mins, layout=layout,
                   group_size=group_size, dtype=dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        s = tuple(self.values.shape)
        return (*s[:-2], s[-2] * 2, s[-1]) if self.layout == IN_OUT else (*s[:-1], s[-1] * 2)

    def dequantize(self, dtype=None) -> jax.Array:
        w = dequantize_int4(self.values, self.scales, self.mins, self.layout, self.group_size)
        return w.astype(dtype or self.dtype)

    def kernel_rows(self) -> KernelRows | None:
        """4-bit rows: the stored integers with their float16 scales and minimums (-8 * scale
        when symmetric)."""
        if self.stacked:
            return None
        q, s = np.asarray(self.unpacked()), np.asarray(self.scales)
        m = None if self.mins is None else np.asarray(self.mins)
        if self.layout == IN_OUT:  # [in, out] -> rows of out
            q, s, m = q.T, s.T, None if m is None else m.T
        return KernelRows.four_bit(np.ascontiguousarray(q), s, m, self.group_size)

    def unpacked(self) -> jax.Array:
        """The stored 4-bit integers as uint8 0..15, in the parameter's shape."""
        return unpack_nibbles(self.values, _group_axis(self.layout))

    def _contract(self, x):
        """x [..., in] -> [..., out] without interleaving the nibbles: the low nibbles hold the
        even inputs and the high nibbles the odd ones, so
            y = x[..., 0::2] @ W_low + x[..., 1::2] @ W_high
        with W_low/W_high dequantized straight from the packed bytes (on XLA:CPU 1.3x faster
        than unpack-then-dot for a layer, 4x for a tied LM head)."""
        in_axis = -2 if self.layout == IN_OUT else -1
        half = self.group_size // 2

        def per_value(a):  # per group [.., G, out] / [.., out, G] -> per packed byte
            a = jnp.expand_dims(a.astype(jnp.float32), in_axis)  # [.., G, 1, out] / [.., out, G, 1]
            shape = list(a.shape)
            shape[in_axis] = half
            return jnp.broadcast_to(a, shape).reshape(self.values.shape)

        s = per_value(self.scales)
        m = None if self.mins is None else per_value(self.mins)
        y = 0
        for nib, xs in ((self.values & 0x0F, x[..., 0::2]), (self.values >> 4, x[..., 1::2])):
            q = nib.astype(jnp.float32)
            w = (q - 8.0) * s if m is None else q * s + m
            y = y + dot_in(xs, w.astype(x.dtype), in_axis)
        return y

    def _gather(self, tokens):
        take = lambda a: None if a is None else jnp.take(a, tokens, axis=-2)  # noqa: E731
        w = dequantize_int4(take(self.values), take(self.scales), take(self.mins), self.layout,
                            self.group_size)
        return w.astype(self.dtype)

    @property
    def _unit(self) -> int:
        return self.group_size if self.layout == IN_OUT else 1

    def _split(self, n: int):
        cut = lambda a: None if a is None else split_axis(a, 0, n)  # noqa: E731
        return self.replace(values=cut(self.values), scales=cut(self.scales), mins=cut(self.mins))

    def scheme_dict(self) -> dict[str, object]:
        return {"name": "int4", "group_size": self.group_size, "symmetric": self.symmetric}

    def validate(self) -> None:
        check_layout(self.layout)
        float_dtype_name(self.dtype)
        if self.values.dtype != jnp.uint8 or self.values.ndim < 2:
            raise ValueError(f"values must be uint8 with >= 2 dims, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"bad group size {self.group_size!r}")
        shape = self.shape
        n_in, n_out = (shape[-2], shape[-1]) if self.layout == IN_OUT else (shape[-1], shape[-2])
        if n_in % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide in dimension {n_in}")
        groups = n_in // self.group_size
        lead = shape[:-2]
        want = (*lead, groups, n_out) if self.layout == IN_OUT else (*lead, n_out, groups)
        for name, a in (("scales", self.scales), ("mins", self.mins)):
            if a is None:
                continue
            if tuple(a.shape) != want or a.dtype != jnp.float16:
                raise ValueError(f"{name} are {a.dtype} {tuple(a.shape)}, expected float16 {want}")
