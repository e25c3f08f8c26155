"""Semi-structured N:M sparse weights stored compressed (`NMSparseWeight`).

In every run of M consecutive inputs of an output column, at most N weights are non-zero
(2:4 keeps 2 of every 4). A projection P [..., in, out] (IN_OUT layout only) is stored as
  values   [..., in / M * N, out]    the kept weights, group by group (float, or int8 with scales)
  indices  uint8 [..., in / M * N / 2, out]  each kept weight's position 0..M-1 inside its group,
           two 4-bit indices per byte (`packing.pack_nibbles` along axis -2)
  scales   float32 [..., out] when values are int8 (per-output-channel symmetric, like
           `Int8Weight`), else None
so kept row r = g * N + j holds the j-th kept weight of group g (kept positions ascending).
Bytes per weight for 2:4: float32 2.25 (0.56x dense), int8 0.75 (0.75x of dense int8).

The matmul rebuilds the dense block (one-hot expansion of the indices) and multiplies: a
correct path on every backend. jax 0.10.2 has no N:M sparse matmul (jax.experimental.sparse
holds BCOO/BCSR only), so no backend runs the compressed form natively here; the saving is
memory and checkpoint size, not speed (measured in docs/SPARSITY_RESULTS.md).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.base import (
    IN_OUT,
    QuantizedWeight,
    dot_in,
    float_dtype_name,
    per_out,
    repeat_front,
    split_axis,
)
from jaxinfer.quant.int8 import quantize_channels
from jaxinfer.quant.packing import pack_nibbles, unpack_nibbles
from models import pytree


def check_nm(n: int, m: int, n_in: int | None = None) -> str | None:
    """Why N:M cannot apply to a matrix with n_in inputs (None if it can)."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m <= 16:
        return f"N:M needs integers 1 <= N < M <= 16, got {n}:{m}"
    if n_in is not None:
        if n_in % m:
            return f"M={m} does not divide the input dimension {n_in}"
        if (n_in // m * n) % 2:
            return (f"{n}:{m} on an input dimension of {n_in} keeps an odd number of rows "
                    f"({n_in // m * n}); indices are packed in pairs")
    return None


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compress(w, n: int, m: int):
    """Dense w [..., in, out] with <= n non-zeros per group -> (values, indices unpacked)."""
    g = w.reshape(*w.shape[:-2], w.shape[-2] // m, m, w.shape[-1])  # [..., G, M, out]
    nonzero = (g != 0).astype(jnp.int32)
    # Kept positions first (ascending), then the rest: sort by (zero?, position).
    key = (1 - nonzero) * m + jnp.arange(m, dtype=jnp.int32)[:, None]
    order = jnp.argsort(key, axis=-2)[..., :n, :]  # [..., G, N, out]
    values = jnp.take_along_axis(g, order, axis=-2)
    flat = (*w.shape[:-2], w.shape[-2] // m * n, w.shape[-1])
    too_many = jnp.any(jnp.sum(nonzero, axis=-2) > n)
    return values.reshape(flat), order.astype(jnp.uint8).reshape(flat), too_many


def expand(values: jax.Array, indices: jax.Array, n: int, m: int) -> jax.Array:
    """Compressed values [..., G*N, out] and unpacked indices -> dense [..., G*M, out]."""
    g = values.shape[-2] // n
    v = values.reshape(*values.shape[:-2], g, n, 1, values.shape[-1])
    i = indices.reshape(*indices.shape[:-2], g, n, 1, indices.shape[-1])
    onehot = i == jnp.arange(m, dtype=jnp.uint8)[:, None]  # [..., G, N, M, out]
    dense = jnp.sum(jnp.where(onehot, v, jnp.zeros((), v.dtype)), axis=-3)  # [..., G, M, out]
    return dense.reshape(*values.shape[:-2], g * m, values.shape[-1])


@pytree.dataclass
class NMSparseWeight(QuantizedWeight):
    """An N:M sparse projection [..., in, out], compressed (see the module docstring)."""

    values: jax.Array
    indices: jax.Array
    scales: jax.Array | None
    n: int = flax.struct.field(pytree_node=False)
    m: int = flax.struct.field(pytree_node=False)
    layout: str = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @classmethod
    def from_dense(cls, w, n: int, m: int, int8: bool = False) -> NMSparseWeight:
        """Compress a dense N:M-sparse w [..., in, out] (at most n non-zeros in every group of
        m inputs per column; ValueError otherwise). int8: values quantized per output column."""
        reason = check_nm(n, m, int(w.shape[-2]))
        if reason:
            raise ValueError(reason)
        dtype = float_dtype_name(w.dtype)
        values, idx, too_many = _compress(jnp.asarray(w), n, m)
        if bool(too_many):
            raise ValueError(f"the weight is not {n}:{m} sparse (a group of {m} inputs holds more "
                             f"than {n} non-zeros); prune it first")
        leaf = cls(values=values, indices=pack_nibbles(idx, axis=-2), scales=None, n=n, m=m,
                   layout=IN_OUT, dtype=dtype)
        return leaf.to_int8() if int8 else leaf

    def to_int8(self) -> NMSparseWeight:
        """The same sparsity pattern with int8 values and per-output-channel float32 scales
        (the kept values quantized like an `Int8Weight`; ValueError for NaN or infinity)."""
        if self.scales is not None:
            return self
        values, scales = quantize_channels(self.values, IN_OUT)
        return self.replace(values=values, scales=scales)

    # ------------------------------------------------------------------ QuantizedWeight API
    @property
    def shape(self) -> tuple[int, ...]:
        rows = self.values.shape[-2] // self.n * self.m
        return (*self.values.shape[:-2], rows, self.values.shape[-1])

    @property
    def _unit(self) -> int:
        return 2 * self.m  # a chunk keeps whole groups and whole index bytes

    def _dense_unscaled(self, dtype) -> jax.Array:
        idx = unpack_nibbles(self.indices, axis=-2)
        return expand(self.values.astype(dtype), idx, self.n, self.m)

    def dequantize(self, dtype=None) -> jax.Array:
        dtype = dtype or self.dtype
        if self.scales is None:
            return self._dense_unscaled(dtype)
        w = self._dense_unscaled(jnp.float32) * self.scales.astype(jnp.float32)[..., None, :]
        return w.astype(dtype)

    def _contract(self, x):
        y = dot_in(x, self._dense_unscaled(x.dtype), -2)
        if self.scales is not None:
            y = y * per_out(self.scales, self.stacked).astype(x.dtype)
        return y

    def _gather(self, tokens):
        raise NotImplementedError("NMSparseWeight stores projections (IN_OUT) only")

    def _split(self, k: int):
        return self.replace(values=split_axis(self.values, 0, k),
                            indices=split_axis(self.indices, 0, k),
                            scales=None if self.scales is None else repeat_front(self.scales, k))

    def scheme_dict(self) -> dict[str, object]:
        return {"name": f"{self.n}:{self.m}" + (" int8" if self.scales is not None else "")}

    def validate(self) -> None:
        if self.layout != IN_OUT:
            raise ValueError(f"layout must be {IN_OUT!r}, got {self.layout!r}")
        reason = check_nm(self.n, self.m)
        if reason:
            raise ValueError(reason)
        v, i = self.values, self.indices
        if v.ndim < 2 or v.shape[-2] % self.n or v.shape[-2] % 2:
            raise ValueError(f"values shape {tuple(v.shape)} does not hold whole groups of "
                             f"{self.n} kept rows")
        want = (*v.shape[:-2], v.shape[-2] // 2, v.shape[-1])
        if i.dtype != jnp.uint8 or tuple(i.shape) != want:
            raise ValueError(f"indices must be uint8 {want}, got {i.dtype} {tuple(i.shape)}")
        packed = np.asarray(i)
        if bool(np.any(np.maximum(packed & 0x0F, packed >> 4) >= self.m)):
            raise ValueError(f"indices must lie in [0, {self.m})")
        if self.scales is None:
            float_dtype_name(v.dtype)
        else:
            if v.dtype != jnp.int8:
                raise ValueError(f"values with scales must be int8, got {v.dtype}")
            want_s = (*v.shape[:-2], v.shape[-1])
            if tuple(self.scales.shape) != want_s:
                raise ValueError(f"scales have shape {tuple(self.scales.shape)}, expected {want_s}")
            float_dtype_name(self.scales.dtype)
        float_dtype_name(self.dtype)
