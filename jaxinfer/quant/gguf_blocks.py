"""GGUF (ggml) block-quantized weights kept packed: Q8_0, Q4_0, Q4_1 (`GGUFBlockWeight`).

A ggml 2-D tensor is stored as rows of OUTPUT features (numpy shape (out, in)), each row a run
of blocks of 32 values along the in dimension. The block layouts (little endian):
  Q8_0  f16 d, int8 qs[32]                      x = d * q                          (34 bytes)
  Q4_0  f16 d, uint8 qs[16]                     x = d * (q - 8)                    (18 bytes)
  Q4_1  f16 d, f16 m, uint8 qs[16]              x = d * q + m                      (20 bytes)
where in Q4_x value j of a block is the low nibble of qs[j] and value j + 16 its high nibble.

The leaf splits each block into its fields, bit for bit (`to_raw()` gives back the file's
bytes), with R rows and nb = in / 32 blocks per row and any leading (layer) axes:
  d float16 [..., R, nb];  m float16 [..., R, nb] (Q4_1 only, else None);
  qs int8 [..., R, nb, 32] (Q8_0) or uint8 [..., R, nb, 16] (Q4_0, Q4_1).
`nbytes` therefore equals the tensor's size in the file. The matmul dequantizes in JAX and
multiplies; for Q4_x the low-nibble and high-nibble halves of every block are multiplied with the
matching halves of x separately (no nibble interleaving, which XLA:CPU runs slowly in a scan).
Layout IN_OUT: the parameter is rows^T [in, out] (projection weights, untied LM head); OUT_IN:
the parameter is the rows themselves [V, D] (token embedding / tied head).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.base import IN_OUT, KernelRows, QuantizedWeight, check_layout, dot_in, split_axis
from models import pytree

BLOCK = 32
# kind -> (bytes per block, bytes of the d/m header)
BLOCK_BYTES = {"Q8_0": (34, 2), "Q4_0": (18, 2), "Q4_1": (20, 4)}
KINDS = tuple(BLOCK_BYTES)


def unpack_halves(qs: jax.Array) -> jax.Array:
    """Q4 block nibbles uint8 [..., 16] -> [..., 32]: low nibbles (values 0..15), then high.

    A broadcast against the shifts (0, 4), not a concatenate (much faster on XLA:CPU in a scan).
    """
    shifts = jnp.array([0, 4], jnp.uint8).reshape(2, 1)
    both = (qs[..., None, :] >> shifts) & 0x0F  # [..., 2, 16]
    return both.reshape(*qs.shape[:-1], 2 * qs.shape[-1])


def _deq_rows(d, m, qs, kind: str) -> jax.Array:
    """Block fields -> float32 rows [..., R, nb * 32]."""
    if kind == "Q8_0":
        q = qs.astype(jnp.float32)
    else:
        q = unpack_halves(qs).astype(jnp.float32)
        if kind == "Q4_0":
            q = q - 8.0
    x = q * d.astype(jnp.float32)[..., None]
    if m is not None:
        x = x + m.astype(jnp.float32)[..., None]
    return x.reshape(*x.shape[:-2], x.shape[-2] * BLOCK)


@pytree.dataclass
class GGUFBlockWeight(QuantizedWeight):
    """A Q8_0 / Q4_0 / Q4_1 tensor in ggml's blocks (see the module docstring)."""

    qs: jax.Array
    d: jax.Array
    m: jax.Array | None
    kind: str = flax.struct.field(pytree_node=False)
    layout: str = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)

    @classmethod
    def from_raw(cls, raw, kind: str, layout: str = IN_OUT, dtype: str = "float32"):
        """From packed bytes uint8 [..., R, bytes_per_row] (as `GGUFFile.raw(name)` gives them).

        Children are numpy copies (the input may be a read-only view of a mapped file).
        ValueError for an unsupported kind or a row that is not a whole number of blocks.
        """
        if kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported GGUF block type {kind!r}; supported: {', '.join(KINDS)}")
        check_layout(layout)
        raw = np.asarray(raw)
        size, head = BLOCK_BYTES[kind]
        if raw.dtype != np.uint8 or raw.ndim < 2 or raw.shape[-1] % size:
            raise ValueError(f"{kind} data must be uint8 [..., rows, k * {size}], got "
                             f"{raw.dtype} {raw.shape}")
        blocks = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)
        d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if head == 4 else None
        qs = np.ascontiguousarray(blocks[..., head:])
        if kind == "Q8_0":
            qs = qs.view(np.int8)
        return cls(qs=qs, d=d, m=m, kind=kind, layout=layout, dtype=dtype)

    def to_raw(self) -> np.ndarray:
        """The packed ggml bytes, uint8 [..., R, bytes_per_row] (inverse of `from_raw`)."""
        parts = [np.asarray(self.d)[..., None].view(np.uint8)]
        if self.m is not None:
            parts.append(np.asarray(self.m)[..., None].view(np.uint8))
        parts.append(np.asarray(self.qs).view(np.uint8))
        blocks = np.concatenate(parts, axis=-1)
        return blocks.reshape(*blocks.shape[:-2], -1)

    @property
    def rows(self) -> int:
        return int(self.d.shape[-2])

    @property
    def shape(self) -> tuple[int, ...]:
        lead, r, n_in = tuple(self.d.shape[:-2]), self.d.shape[-2], self.d.shape[-1] * BLOCK
        return (*lead, n_in, r) if self.layout == IN_OUT else (*lead, r, n_in)

    def dequantize_rows(self, dtype=jnp.float32) -> jax.Array:
        """The ggml rows [..., R, in] as floats (what `GGUFFile.load` returns)."""
        return _deq_rows(self.d, self.m, self.qs, self.kind).astype(dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        rows = self.dequantize_rows(dtype or self.dtype)
        return jnp.swapaxes(rows, -1, -2) if self.layout == IN_OUT else rows

    def _contract(self, x):
        """x [..., in] @ rows^T -> [..., R]. For Q4_x the two nibble halves of each block are
        multiplied separately with the matching halves of x (no interleaving of nibbles)."""
        if self.kind == "Q8_0":
            return dot_in(x, self.dequantize_rows(x.dtype), -1)
        nb = self.d.shape[-1]
        xb = x.reshape(*x.shape[:-1], nb, 2, BLOCK // 2)
        d = self.d.astype(jnp.float32)[..., None]
        m = None if self.m is None else self.m.astype(jnp.float32)[..., None]
        y = 0
        for half, nib in ((0, self.qs & 0x0F), (1, self.qs >> 4)):
            q = nib.astype(jnp.float32)
            w = (q - 8.0) * d if m is None else q * d + m  # [..., R, nb, 16]
            w = w.reshape(*w.shape[:-2], nb * (BLOCK // 2)).astype(x.dtype)
            xs = xb[..., half, :].reshape(*x.shape[:-1], nb * (BLOCK // 2))
            y = y + dot_in(xs, w, -1)
        return y

    def _gather(self, tokens):
        d = jnp.take(self.d, tokens, axis=-2)
        m = None if self.m is None else jnp.take(self.m, tokens, axis=-2)
        qs = jnp.take(self.qs, tokens, axis=-3)
        return _deq_rows(d, m, qs, self.kind).astype(self.dtype)

    @property
    def _lead(self) -> str:
        return "out"  # ggml rows are output features, whatever the layout

    def _split(self, n: int):
        cut = lambda a: None if a is None else split_axis(a, 0, n)  # noqa: E731
        return self.replace(d=cut(self.d), m=cut(self.m), qs=cut(self.qs))

    def permute_rows(self, perm) -> GGUFBlockWeight:
        """The leaf with output rows reordered: new row i = old row perm[i]."""
        perm = np.asarray(perm)
        if sorted(perm.tolist()) != list(range(self.rows)):
            raise ValueError(f"not a permutation of {self.rows} rows")

        def take(a, axis):
            if a is None:
                return None
            return np.take(a, perm, axis=axis) if isinstance(a, np.ndarray) else (
                jnp.take(a, perm, axis=axis))

        return self.replace(d=take(self.d, -2), m=take(self.m, -2), qs=take(self.qs, -3))

    def unpermute_qk(self, n_head: int) -> GGUFBlockWeight:
        """Undo llama.cpp's Q/K row permutation (see `unpermute_qk`)."""
        if self.rows % (2 * n_head):
            raise ValueError(f"{self.rows} rows cannot hold {n_head} heads of an even head size")
        return self.permute_rows(qk_row_order(self.rows, n_head))

    def scheme_dict(self) -> dict[str, object]:
        return {"name": "gguf", "type": self.kind}

    def kernel_rows(self) -> KernelRows | None:
        """The ggml rows (output features in either layout), a group per block."""
        if self.stacked:
            return None
        r, nb = self.d.shape
        if self.kind == "Q8_0":
            return KernelRows(np.asarray(self.qs).reshape(r, nb * BLOCK), np.asarray(self.d),
                              None, BLOCK)
        qs = np.asarray(self.qs)  # low nibbles are values 0..15 of a block, high 16..31
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(r, nb * BLOCK)
        m = None if self.m is None else np.asarray(self.m)
        return KernelRows.four_bit(q, np.asarray(self.d), m, BLOCK)

    def validate(self) -> None:
        check_layout(self.layout)
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported GGUF block type {self.kind!r}")
        if self.d.dtype != jnp.float16 or self.d.ndim < 2:
            raise ValueError(f"d must be float16 [..., rows, blocks], got {self.d.dtype} "
                             f"{tuple(self.d.shape)}")
        width, qdt = (32, jnp.int8) if self.kind == "Q8_0" else (16, jnp.uint8)
        want = (*self.d.shape, width)
        if tuple(self.qs.shape) != want or self.qs.dtype != qdt:
            raise ValueError(f"qs is {self.qs.dtype} {tuple(self.qs.shape)}, expected "
                             f"{jnp.dtype(qdt).name} {want}")
        if (self.m is None) != (self.kind != "Q4_1"):
            raise ValueError(f"m must be present for Q4_1 only (type {self.kind})")
        if self.m is not None and (self.m.shape != self.d.shape or self.m.dtype != jnp.float16):
            raise ValueError(f"m is {self.m.dtype} {tuple(self.m.shape)}, expected float16 "
                             f"{tuple(self.d.shape)}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation on a (n_head * head_dim, in) weight.

    llama.cpp's converter stores `w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2)` (rotary
    halves interleaved); this maps it back to HF's layout (rotary halves contiguous per head).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: hf_rows = gguf_rows[order]."""
    return unpermute_qk(np.arange(rows)[:, None], n_head)[:, 0]
