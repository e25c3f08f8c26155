"""Per-output-channel symmetric int8 weights: weight-only (`Int8Weight`) and W8A8 (`W8A8Weight`).

Both hold the same data: `values` int8 in the parameter's own layout ([..., in, out] for IN_OUT,
[..., out, in] for OUT_IN) and `scales` float32 [..., out], with w ~= values * scale (per output
channel, |values| <= 127). They differ in the matmul:
  Int8Weight   (x @ values.astype(x.dtype)) * scale            (scale applied after the dot)
  W8A8Weight   activations quantized per token (symmetric int8, dynamic scale max|x| / 127),
               int8 x int8 -> int32 dot (`lax.dot_general(preferred_element_type=int32)`),
               then rescaled by x_scale * w_scale.
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
    float_dtype_name,
    per_out,
    repeat_front,
    safe,
    split_axis,
)
from models import pytree

QMAX = 127


def _in_axis(layout: str) -> int:
    return -2 if layout == IN_OUT else -1


def quantize_channels(w, layout: str) -> tuple[jax.Array, jax.Array]:
    """float w (parameter layout) -> (int8 values, float32 scales [..., out]).

    ValueError if w holds NaN or infinity.
    """
    values, scales, finite = _quantize(jnp.asarray(w), layout)
    if not bool(finite):
        raise ValueError("weights contain NaN or infinity")
    return values, scales


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w, layout: str):
    w = w.astype(jnp.float32)
    axis = _in_axis(layout)
    scales = jnp.max(jnp.abs(w), axis=axis) / QMAX
    div = jnp.expand_dims(safe(scales), axis)
    values = jnp.clip(jnp.round(w / div), -QMAX, QMAX).astype(jnp.int8)
    return values, scales, jnp.all(jnp.isfinite(w))


class _ChannelInt8(QuantizedWeight):
    """Shared parts of the two int8 leaves (fields `values`, `scales`, `layout`, `dtype`)."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dequantize(self, dtype=None) -> jax.Array:
        s = jnp.expand_dims(self.scales.astype(jnp.float32), _in_axis(self.layout))
        return (self.values.astype(jnp.float32) * s).astype(dtype or self.dtype)

    def _gather(self, tokens):
        rows = jnp.take(self.values, tokens, axis=-2).astype(jnp.float32)
        s = jnp.take(self.scales, tokens, axis=-1).astype(jnp.float32)
        return (rows * s[..., None]).astype(self.dtype)

    def _split(self, n: int):
        if self.layout == IN_OUT:  # values [in, out]: cut in; every chunk needs all scales
            return self.replace(values=split_axis(self.values, 0, n),
                                scales=repeat_front(self.scales, n))
        return self.replace(values=split_axis(self.values, 0, n),
                            scales=split_axis(self.scales, 0, n))

    def validate(self) -> None:
        check_layout(self.layout)
        if self.values.dtype != jnp.int8 or self.values.ndim < 2:
            raise ValueError(f"values must be int8 with >= 2 dims, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        out_axis = -1 if self.layout == IN_OUT else -2
        want = (*self.values.shape[:-2], self.values.shape[out_axis])
        if tuple(self.scales.shape) != want:
            raise ValueError(f"scales have shape {tuple(self.scales.shape)}, expected {want}")
        float_dtype_name(self.scales.dtype)
        float_dtype_name(self.dtype)


@pytree.dataclass
class Int8Weight(_ChannelInt8):
    """int8 weight-only, per-output-channel symmetric. values int8, scales float32 [..., out]."""

    values: jax.Array
    scales: jax.Array
    layout: str = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @classmethod
    def from_float(cls, w, layout: str = IN_OUT) -> Int8Weight:
        """Quantize float w ([..., in, out] for IN_OUT, [..., out, in] for OUT_IN)."""
        values, scales = quantize_channels(w, check_layout(layout))
        return cls(values=values, scales=scales, layout=layout, dtype=float_dtype_name(w.dtype))

    def _contract(self, x):
        y = dot_in(x, self.values.astype(x.dtype), _in_axis(self.layout))
        return y * per_out(self.scales, self.stacked).astype(x.dtype)

    def scheme_dict(self) -> dict[str, object]:
        return {"name": "int8"}

    def kernel_rows(self) -> KernelRows | None:
        """8-bit rows, one group (and float32 scale) per output channel."""
        if self.stacked:
            return None
        values = np.asarray(self.values)
        q = values.T if self.layout == IN_OUT else values
        return KernelRows(np.ascontiguousarray(q), np.asarray(self.scales, np.float32)[:, None],
                          None, q.shape[1])


@pytree.dataclass
class W8A8Weight(_ChannelInt8):
    """int8 weights (per output channel) x dynamic per-token int8 activations, int32 accumulation."""

    values: jax.Array
    scales: jax.Array
    layout: str = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @classmethod
    def from_float(cls, w, layout: str = IN_OUT) -> W8A8Weight:
        """Quantize float w ([..., in, out] for IN_OUT, [..., out, in] for OUT_IN)."""
        values, scales = quantize_channels(w, check_layout(layout))
        return cls(values=values, scales=scales, layout=layout, dtype=float_dtype_name(w.dtype))

    def _contract(self, x):
        qx, sx = quantize_activations(x)
        acc = self._int_dot(qx)
        y = acc.astype(jnp.float32) * sx * per_out(self.scales.astype(jnp.float32), self.stacked)
        return y.astype(x.dtype)

    def _fast(self, x):
        """Like `_contract`, with the int32 dot chunked for big matrices (x quantized once)."""
        qx, sx = quantize_activations(x)
        acc = self._chunked(lambda leaf, q: leaf._int_dot(q), qx, jnp.int32)
        y = acc.astype(jnp.float32) * sx * per_out(self.scales.astype(jnp.float32), self.stacked)
        return y.astype(x.dtype)

    def _int_dot(self, qx):
        """int8 qx [..., in] . int8 values -> int32 [..., out] (lax.dot_general)."""
        return dot_in(qx, self.values, _in_axis(self.layout), preferred=jnp.int32)

    def scheme_dict(self) -> dict[str, object]:
        return {"name": "w8a8"}


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token symmetric int8: x [..., K] -> (int8 [..., K], float32 scale [..., 1])."""
    x32 = x.astype(jnp.float32)
    sx = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / QMAX
    qx = jnp.clip(jnp.round(x32 / safe(sx)), -QMAX, QMAX).astype(jnp.int8)
    return qx, sx
