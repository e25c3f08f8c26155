"""What every quantized parameter leaf shares: layouts, the three ops the models call, helpers.

A quantized leaf stands for one float parameter P of the params tree and replaces it in place.
It is a registered pytree (a `models.pytree.dataclass`): its array children are the quantized data
and carry the leading layer axis L of a stacked parameter, so `nn.scan` slices it like any
array; static metadata (layout, group size, ...) is pytree aux data. Every method works on the
stacked leaf (children [L, ...]) and on a per-layer slice (children without L).

Layouts (which axis of P the quantization runs along — the "in" axis, contracted by a matmul):
  IN_OUT  P is [..., in, out]: projection weights and untied LM heads (`linear` computes x @ P).
          Scales are per output column; groups/blocks run down the in axis.
  OUT_IN  P is [..., out, in]: embedding tables [V, D] (`embed_lookup` takes rows; the tied LM
          head computes x @ P^T, so the rows are its output channels). Scales are per row;
          groups/blocks run along the row.

The ops (x may have any leading dims; a stacked leaf broadcasts like `x @ dequantize()`):
  matmul(x)            x [..., A] @ P [A, B] -> [..., B]        (layers.linear)
  matmul_transposed(x) x [..., B] @ P^T       -> [..., A]       (layers.unembed, tied head)
  take_rows(tokens)    P[tokens]: [B, T] int -> [B, T, B_dim]   (layers.embed_lookup)
The fast quantized path is the one matching the layout (matmul for IN_OUT; take_rows and
matmul_transposed for OUT_IN); the other ops fall back to dequantize-then-compute.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IN_OUT = "in_out"
OUT_IN = "out_in"
LAYOUTS = (IN_OUT, OUT_IN)
CHUNK_ELEMS = 1 << 18  # floats per dequantized chunk of a big matrix (see `_chunk_plan`)


class QuantizedWeight:
    """Mixin of the quantized leaf dataclasses (Int8Weight, Int4Weight, W8A8Weight, ...).

    Subclasses define static fields `layout` and `dtype` (name of the original float dtype),
    and implement `shape`, `dequantize`, `_contract` (x contracted with the in axis) and
    `_gather` (rows of an OUT_IN parameter).
    """

    layout: str
    dtype: str

    # ------------------------------------------------------------------ subclass interface
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the float parameter this leaf stands for (with L when stacked)."""
        raise NotImplementedError

    def dequantize(self, dtype=None) -> jax.Array:
        """The float parameter, shape `self.shape`, in `dtype` (default: the original dtype)."""
        raise NotImplementedError

    def _contract(self, x: jax.Array) -> jax.Array:
        """x [..., in] contracted with the in axis -> [..., out] (the quantized fast path)."""
        raise NotImplementedError

    def _gather(self, tokens: jax.Array) -> jax.Array:
        """Rows of an OUT_IN parameter: tokens [...] -> [..., in]."""
        raise NotImplementedError

    def _split(self, n: int):
        """The leaf cut into n equal chunks along its storage-leading axis (see `_chunked`):
        every child gets a new leading axis of size n (children the cut does not apply to are
        broadcast)."""
        raise NotImplementedError

    @property
    def _lead(self) -> str:
        """The axis the children store first: "in" (IN_OUT) or "out" (OUT_IN)."""
        return "in" if self.layout == IN_OUT else "out"

    @property
    def _unit(self) -> int:
        """Alignment a chunk of the leading axis needs (e.g. the int4 group size)."""
        return 1

    def _fast(self, x: jax.Array) -> jax.Array:
        """`_contract`, a cache-sized chunk at a time for big matrices (see `_chunked`)."""
        return self._chunked(lambda leaf, xc: leaf._contract(xc), x, x.dtype)

    # ------------------------------------------------------------------ the model-facing ops
    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., A] @ P [A, B] -> [..., B], in x's dtype."""
        if x.ndim == 1:
            return self.matmul(x[None])[..., 0, :]
        if self.layout == IN_OUT:
            return self._fast(x)
        return jnp.matmul(x, self.dequantize(x.dtype))

    def matmul_transposed(self, x: jax.Array) -> jax.Array:
        """x [..., B] @ P^T -> [..., A] (tied LM head: x [B, T, D] @ table[V, D]^T -> [B, T, V])."""
        if x.ndim == 1:
            return self.matmul_transposed(x[None])[..., 0, :]
        if self.layout == OUT_IN:
            return self._fast(x)
        return jnp.matmul(x, jnp.swapaxes(self.dequantize(x.dtype), -1, -2))

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """P[tokens] along axis -2: tokens [B, T] -> [B, T, B_dim] (float, original dtype)."""
        if self.layout == OUT_IN:
            return self._gather(tokens)
        return jnp.take(self.dequantize(), tokens, axis=-2)

    # ------------------------------------------------------------------ chunking
    def _chunk_plan(self) -> int | None:
        """Number of chunks for a big unstacked matrix (None: contract it whole).

        A chunk dequantizes to about CHUNK_ELEMS floats (1 MiB in float32) so that it stays
        in cache: on XLA:CPU this made a quantized tied LM head (49152 x 576) 5-10x faster than
        dequantizing the whole table. CPU only (elsewhere the matrix is contracted whole). The
        chunk length must divide the leading axis; without a divisor close to the target the
        matrix is contracted whole.
        """
        if self.stacked or jax.default_backend() != "cpu":
            return None
        n_in, n_out = self.in_out_dims
        lead, other = (n_in, n_out) if self._lead == "in" else (n_out, n_in)
        unit = self._unit
        target = max(unit, CHUNK_ELEMS // other // unit * unit)
        if target * 2 > lead:
            return None
        for size in range(target, max(unit, target // 4) - 1, -unit):
            if lead % size == 0:
                return lead // size
        return None

    def _chunked(self, fn, x: jax.Array, acc_dtype) -> jax.Array:
        """fn(leaf, x) -> [..., out] (the in axis contracted), one chunk at a time when the
        leaf is big: chunks of out rows are mapped and concatenated, chunks of in rows are
        accumulated (in `acc_dtype`)."""
        n = self._chunk_plan()
        if n is None:
            return fn(self, x)
        chunks = self._split(n)
        if self._lead == "out":
            y = lax.map(lambda c: fn(c, x), chunks)  # [n, ..., out / n]
            return jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], n * y.shape[-1])
        k = x.shape[-1]
        xs = jnp.moveaxis(x.reshape(*x.shape[:-1], n, k // n), -2, 0)

        def body(acc, chunk_and_x):
            c, xc = chunk_and_x
            return acc + fn(c, xc).astype(acc_dtype), None

        init = jnp.zeros((*x.shape[:-1], self.in_out_dims[1]), acc_dtype)
        return lax.scan(body, init, (chunks, xs))[0]

    # ------------------------------------------------------------------ generic helpers
    @property
    def in_out_dims(self) -> tuple[int, int]:
        """(in, out) of the matrix: in is the quantization axis, contracted by `_contract`."""
        a, b = self.shape[-2:]
        return (a, b) if self.layout == IN_OUT else (b, a)

    @property
    def stacked(self) -> bool:
        """True when the leaf has leading (layer) axes beyond the 2-D matrix."""
        return len(self.shape) > 2

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all array children (what the leaf really holds)."""
        return sum(int(c.nbytes) for c in self.children().values() if c is not None)

    def children(self) -> dict[str, jax.Array | None]:
        """Array children by field name (None for an absent optional child)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("pytree_node", True)}

    def static(self) -> dict[str, object]:
        """Static (aux data) fields by name: JSON-serialisable scalars."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("pytree_node", True)}

    def scheme_dict(self) -> dict[str, object]:
        """A short description of the quantization scheme (for quantization.json and reports)."""
        raise NotImplementedError

    def kernel_rows(self) -> KernelRows | None:
        """The matrix as the native kernels take it (see `KernelRows`), or None where this leaf
        has no such form (a stacked leaf, or a scheme the kernels do not run). The rows are the
        outputs of the matmul the layout serves: `matmul` for IN_OUT, the tied head's
        `matmul_transposed` for OUT_IN."""
        return None

    def validate(self) -> None:
        """Raise ValueError if the children's shapes/dtypes do not fit together."""
        raise NotImplementedError

    def layer(self, i: int):
        """The per-layer slice i of a stacked leaf (what `nn.scan` hands each layer)."""
        return jax.tree.map(lambda c: c[i], self)


class KernelRows(NamedTuple):
    """A quantized matrix with N output rows and K inputs, in the one form the native kernels
    repack (jaxinfer.kernels.NativeQuant): groups of `group` consecutive inputs share a scale,
    W[n, k] = q[n, k] * scales[n, k // group] (+ mins[n, k // group]).

    q       int8 [N, K] (8-bit) or uint8 [N, K] holding 0..15 (4-bit)
    scales  float32 or float16 [N, K / group] (float16 for 4-bit)
    mins    float16 [N, K / group] for 4-bit (a symmetric format: -8 * scales), None for 8-bit
    """

    q: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    group: int

    @classmethod
    def four_bit(cls, q, scales, mins, group: int) -> KernelRows | None:
        """4-bit rows from q (0..15) and float16 scales, with mins None for a symmetric format
        (q - 8) * scale; None where -8 * scale overflows float16."""
        scales = np.asarray(scales, np.float16)
        if mins is None:
            mins = (-8.0 * scales.astype(np.float32)).astype(np.float16)
            if not np.all(np.isfinite(mins)):
                return None
        return cls(np.asarray(q, np.uint8), scales, np.asarray(mins, np.float16), group)


def is_quantized(x) -> bool:
    """True for a quantized leaf."""
    return isinstance(x, QuantizedWeight)


def stack_leaves(leaves):
    """Stack per-layer leaves of one type and static metadata into a stacked leaf [L, ...].

    Children are stacked with numpy when they are numpy arrays, else with jnp.
    """
    leaves = list(leaves)
    if not leaves:
        raise ValueError("stack_leaves needs at least one leaf")
    structs = {jax.tree.structure(leaf) for leaf in leaves}
    if len(structs) != 1:
        raise ValueError("stack_leaves: leaves differ in type or static metadata")

    def stack(*cs):
        if all(isinstance(c, np.ndarray) for c in cs):
            return np.stack(cs)
        return jnp.stack(cs)

    return jax.tree.map(stack, *leaves)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def dot_in(x: jax.Array, w: jax.Array, w_in_axis: int, preferred=None) -> jax.Array:
    """Contract x's last axis with axis `w_in_axis` (-2 or -1) of w [..., a, b].

    A 2-D w is one `lax.dot_general` (no transpose materialised); a stacked w broadcasts its
    leading axes like numpy matmul. `preferred` is the accumulation/result dtype.
    """
    if w.ndim == 2:
        dims = (((x.ndim - 1,), (w.ndim + w_in_axis,)), ((), ()))
        return lax.dot_general(x, w, dims, preferred_element_type=preferred)
    if w_in_axis == -1:
        w = jnp.swapaxes(w, -1, -2)
    return jnp.matmul(x, w, preferred_element_type=preferred)


def per_out(s: jax.Array, stacked: bool) -> jax.Array:
    """Per-output scales s [..., out] shaped to broadcast against a matmul result."""
    return s[..., None, :] if stacked else s


def float_dtype_name(dtype) -> str:
    """Canonical name of a float dtype ("float32", "bfloat16", "float16")."""
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"expected a float array, got dtype {dt}")
    return dt.name


def safe(s: jax.Array) -> jax.Array:
    """s with zeros replaced by ones (divisor for all-zero channels/groups)."""
    return jnp.where(s == 0, jnp.ones_like(s), s)


def f16_up(s: jax.Array) -> jax.Array:
    """float32 -> float16, rounded so the result is >= s (a scale never shrinks)."""
    h = s.astype(jnp.float16)
    return jnp.where(h.astype(jnp.float32) < s, jnp.nextafter(h, jnp.float16(jnp.inf)), h)


def f16_down(s: jax.Array) -> jax.Array:
    """float32 -> float16, rounded so the result is <= s (a minimum never grows)."""
    h = s.astype(jnp.float16)
    return jnp.where(h.astype(jnp.float32) > s, jnp.nextafter(h, jnp.float16(-jnp.inf)), h)


def split_axis(a: jax.Array, axis: int, n: int) -> jax.Array:
    """a with `axis` cut into n equal chunks, the chunk index moved to the front."""
    axis = axis % a.ndim
    a = a.reshape(*a.shape[:axis], n, a.shape[axis] // n, *a.shape[axis + 1:])
    return jnp.moveaxis(a, axis, 0)


def repeat_front(a: jax.Array, n: int) -> jax.Array:
    """a broadcast to a new leading axis of size n."""
    return jnp.broadcast_to(a, (n, *a.shape))
