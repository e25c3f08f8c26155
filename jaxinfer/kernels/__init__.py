"""Native CPU kernels behind the dispatching matmul (`models.layers.linear`).

`cpu.cc` holds float32 kernels (AVX-512, XLA's intra-op thread pool), called as XLA FFI
custom calls: a matmul against weights packed in 48-column panels (also several weights of
one input, and the SwiGLU gate, in one call), and single-token attention over the KV cache
that rotates q and k (RoPE), writes the new token and reads only the used slots.
It is compiled on first use with the system C++ compiler (`c++`, about 4 s) into the cache
directory, keyed by source, compiler flags, jaxlib and Python versions and CPU flags, and
loaded with ctypes. Where it cannot run (not x86-64 Linux with AVX-512F, no compiler,
`JAXINFER_NATIVE=0`) `available()` is False and every caller keeps XLA's own dot: the
kernel is a speed-up, never a requirement.

`native_params(params, tied)` replaces float32 2-D weights by packed `NativeWeight` leaves
(and a tied embedding by `NativeEmbedding`, the packed LM head); their matmul runs the kernel
for float32 inputs (decode steps and prefill alike) and XLA's dot on the unpacked weights for
other dtypes. Why packed: XLA:CPU's dot streams weights
and computes in turn, while the kernel reads each contiguous panel once with prefetching
(measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu.cc")
TARGET = "jaxinfer_matmul_f32"
MANY_TARGET = "jaxinfer_matmul_many_f32"
GLU_TARGET = "jaxinfer_glu_f32"
ATTEND_TARGET = "jaxinfer_attend_f32"
# XLA FFI target name -> symbol in cpu.cc
_SYMBOLS = {TARGET: "JaxinferMatmulF32", MANY_TARGET: "JaxinferMatmulManyF32",
            GLU_TARGET: "JaxinferGluF32", ATTEND_TARGET: "JaxinferAttendF32"}
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")

_STATE: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _library_path() -> Path:
    import jaxlib

    from jaxinfer.loading.fetch import cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_flags().encode(), sys.version.encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"cpu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile cpu.cc (once; later calls reuse the cached library). Returns its path.

    RuntimeError with the compiler's message if compilation fails.
    """
    lib = _library_path()
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [os.environ.get("CXX", "c++"), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE),
           "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a library in the cache is always complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def available() -> bool:
    """True once the kernel is built, loaded and registered with XLA for the CPU platform."""
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    ok = False
    if os.environ.get("JAXINFER_NATIVE", "1") == "0":
        pass
    elif platform.system() != "Linux" or platform.machine() != "x86_64" \
            or "avx512f" not in _cpu_flags().split():
        pass
    else:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            for target, symbol in _SYMBOLS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            ok = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            warnings.warn(f"native CPU matmul unavailable, using XLA's dot: {e}", stacklevel=2)
    _STATE["ok"] = ok
    return ok


STRIP = 48  # columns per packed panel (kStrip in cpu.cc)


def pack(w: jax.Array) -> jax.Array:
    """w [K, N] -> panels [ceil(N / STRIP), K, STRIP] (columns zero padded to whole panels)."""
    k, n = w.shape
    p = -(-n // STRIP)
    w = jnp.pad(w, ((0, 0), (0, p * STRIP - n)))
    return jnp.asarray(w.reshape(k, p, STRIP).transpose(1, 0, 2))


def unpack(panels: jax.Array, n: int) -> jax.Array:
    """panels [P, K, STRIP] -> w [K, n]."""
    p, k, s = panels.shape
    return panels.transpose(1, 0, 2).reshape(k, p * s)[:, :n]


def _require() -> None:
    """Builds and registers the kernels on first use; an error where they cannot run."""
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable here (see kernels.available)")


def matmul(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [M, K] @ W [K, n] -> [M, n] float32, W given packed (see `pack`); needs `available()`."""
    _require()
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, panels)


def matmul_many(x: jax.Array, panels: list[jax.Array], ns: list[int]) -> list[jax.Array]:
    """[x @ W_j] for several packed weights of one x [M, K], in one call -> [M, n_j] each."""
    _require()
    outs = [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for n in ns]
    return list(jax.ffi.ffi_call(MANY_TARGET, outs)(x, *panels))


def glu(x: jax.Array, gate: jax.Array, up: jax.Array, n: int) -> jax.Array:
    """silu(x @ Wg) * (x @ Wu) for x [M, K], both packed with n columns, in one call -> [M, n]."""
    _require()
    return jax.ffi.ffi_call(GLU_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(
        x, gate, up)


def _kernel_rows(x: jax.Array) -> int | None:
    """Rows of x [..., K] when the kernel takes them (float32, at least one row), else None."""
    rows = int(np.prod(x.shape[:-1]))
    return rows if x.dtype == jnp.float32 and rows > 0 else None


def _dot(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [..., K] @ W [K, n]: the kernel for float32 rows, XLA's dot on the unpacked weights
    otherwise."""
    rows = _kernel_rows(x)
    if rows is None:
        return x @ unpack(panels, n).astype(x.dtype)
    return matmul(x.reshape(rows, x.shape[-1]), panels, n).reshape(*x.shape[:-1], n)


@flax.struct.dataclass
class NativeWeight:
    """A float32 weight W [K, n] kept packed for the kernel: panels [ceil(n / 48), K, 48]."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_array(cls, w: jax.Array) -> NativeWeight:
        return cls(panels=pack(w), n=int(w.shape[1]))

    shape = property(lambda self: (self.panels.shape[1], self.n))
    dtype = property(lambda self: self.panels.dtype)
    nbytes = property(lambda self: self.panels.nbytes)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> [..., n]."""
        return _dot(x, self.panels, self.n)

    def matmul_many(self, x: jax.Array, others: list[NativeWeight]) -> list[jax.Array]:
        """[x @ W for W in (self, *others)] in one call: x [..., K] -> [..., n] each."""
        ws = [self, *others]
        rows = _kernel_rows(x)
        if rows is None:
            return [w.matmul(x) for w in ws]
        ys = matmul_many(x.reshape(rows, x.shape[-1]), [w.panels for w in ws], [w.n for w in ws])
        return [y.reshape(*x.shape[:-1], w.n) for y, w in zip(ys, ws, strict=True)]

    def glu(self, x: jax.Array, up: NativeWeight) -> jax.Array:
        """silu(x @ self) * (x @ up) in one call: x [..., K] -> [..., n]."""
        rows = _kernel_rows(x)
        if rows is None or up.n != self.n:
            return jax.nn.silu(self.matmul(x)) * up.matmul(x)
        y = glu(x.reshape(rows, x.shape[-1]), self.panels, up.panels, self.n)
        return y.reshape(*x.shape[:-1], self.n)


@flax.struct.dataclass
class NativeEmbedding:
    """A tied embedding table [V, D] kept as the packed LM head: panels of table^T, so
    x @ table^T runs the kernel; rows for the lookup are gathered from the panels."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_table(cls, table: jax.Array) -> NativeEmbedding:
        return cls(panels=pack(table.T), n=int(table.shape[0]))

    shape = property(lambda self: (self.n, self.panels.shape[1]))
    dtype = property(lambda self: self.panels.dtype)
    nbytes = property(lambda self: self.panels.nbytes)

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] -> [..., D]."""
        return self.panels[tokens // STRIP, :, tokens % STRIP]

    def matmul_transposed(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., V]."""
        return _dot(x, self.panels, self.n)


def decode_attention(q, k, v, k_buf, v_buf, positions, k_pos, window, slots, inv_freq=None):
    """The KVCache.attention kernel: each row's new token is rotated by RoPE (when inv_freq
    [H/2] is given), written into this layer's cache and attends over the row's used slots,
    in one call (the buffers are updated in place).

    q [B, 1, N, H]; k, v [B, 1, K, H] (new, q and k before RoPE); k_buf [B, K, H, S], v_buf
    [B, K, S, H]; positions [B, 1]; k_pos [B, S]; window (int); slots [B, 1] (where the new
    token goes) -> (out [B, 1, N * H], k_buf, v_buf), as models.layers.self_attention's XLA
    path. Float32 with H a multiple of 16 (at most 256) runs the kernel (once `available()`);
    anything else XLA.
    """
    from models.layers import rope_tables, self_attention

    b, _, n, h = q.shape
    if not (h % 16 == 0 and h <= 256 and available() and
            all(a.dtype == jnp.float32 for a in (q, k, v, k_buf, v_buf))):
        # The model's own XLA path, on this layer's buffers as a one-layer cache.
        out, (kb, vb, _, _) = self_attention(q, k, v, positions, k_pos, window, 0, slots,
                                             ((k_buf,), (v_buf,), None, None), None, inv_freq)
        return out, kb[0], vb[0]
    if inv_freq is None:  # no rotation: cos 1, sin 0
        rope = jnp.concatenate([jnp.ones((b, h // 2)), jnp.zeros((b, h // 2))], axis=-1)
    else:
        cos, sin = rope_tables(positions, inv_freq)
        rope = jnp.concatenate([cos[:, 0], sin[:, 0]], axis=-1)
    i32 = jnp.int32
    shapes = (jax.ShapeDtypeStruct((b, n, h), jnp.float32),
              jax.ShapeDtypeStruct(k_buf.shape, jnp.float32),
              jax.ShapeDtypeStruct(v_buf.shape, jnp.float32))
    out, k_buf, v_buf = jax.ffi.ffi_call(ATTEND_TARGET, shapes, input_output_aliases={0: 1, 1: 2})(
        k_buf, v_buf, q[:, 0], k[:, 0], v[:, 0], rope.astype(jnp.float32),
        positions[:, 0].astype(i32), k_pos.astype(i32),
        jnp.reshape(jnp.asarray(window, i32), (1,)), slots[:, 0].astype(i32))
    return out.reshape(b, 1, n * h), k_buf, v_buf


def attention_for(params, dtype):
    """The decode attention kernel for a cache of `dtype` next to `params`: decode_attention
    when params were prepared by native_params (the kernels are built and registered) and the
    cache is float32, else None (the model's own attention)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NativeWeight | NativeEmbedding))
    native = any(isinstance(x, NativeWeight | NativeEmbedding) for x in leaves)
    return decode_attention if native and jnp.dtype(dtype) == jnp.float32 else None


def native_params(params, tied_key: str | None):
    """params with every float32 2-D matmul weight (top level or in per-layer trees, see
    `models.unstack_layers`) packed as NativeWeight and the tied embedding `tied_key` (if any)
    packed as NativeEmbedding. Other leaves, and stacked layers, unchanged.
    Returns params itself when the kernel is unavailable."""
    if not available():
        return params

    def wrap(path, leaf):
        if not isinstance(leaf, jax.Array) or leaf.ndim != 2 or leaf.dtype != jnp.float32:
            return leaf
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        parts = name.split("/")
        if parts[0] == "layers" and not parts[1].isdigit():
            return leaf  # stacked layers [L, ...]: 2-D leaves there are per-layer vectors
        if name == tied_key:
            return NativeEmbedding.from_table(leaf)
        if parts[0] in ("embed", "wte", "wpe"):
            return leaf  # looked up, never multiplied
        return NativeWeight.from_array(leaf)

    return jax.tree_util.tree_map_with_path(
        wrap, params, is_leaf=lambda x: not isinstance(x, dict | tuple | list))
