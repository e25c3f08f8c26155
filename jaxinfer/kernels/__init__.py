"""Native CPU kernels behind the dispatching matmul (`models.layers.linear`).

`cpu.cc` holds float32 kernels (XLA's intra-op thread pool), called as XLA FFI custom calls: a
matmul against weights packed in 48-column panels (also several weights of one input, and the
SwiGLU gate, in one call), and attention over the KV cache that rotates q and k (RoPE),
writes the new tokens and reads only the slots each query sees (decode steps and prefill
chunks). The instruction set is a thin layer,
`simd.h`; each ISA of `ISA_FLAGS` (AVX-512 with VNNI, AVX-512, AVX2 + FMA) is its own library
with its own FFI target names (`target(kind, isa)`), so one process can run any ISA the CPU has.

The process runs the most capable ISA this CPU supports, or `JAXINFER_CPU_ISA` (avx512vnni,
avx512, avx2: a lower one, to exercise its path); `isa()` says which, `describe()` says it in a
line. A library is compiled on first use with the system C++ compiler (`c++`, about 5 s) into
the cache directory, keyed by the sources, the ISA's compiler flags, jaxlib and Python versions and the
CPU flags, and loaded with ctypes. Where the kernels cannot run (not x86-64 Linux, no AVX2/FMA,
no compiler, `JAXINFER_NATIVE=0`, an unknown or unsupported `JAXINFER_CPU_ISA`) `isa()` is None,
`available()` False and every caller keeps XLA's own dot: the kernel is a speed-up, never a
requirement.

`native_params(params, tied)` replaces float32 matrices (and stacks of them: the layers, a
MoE layer's experts) by packed `NativeWeight` leaves, quantized ones by `NativeQuant` (and a
tied embedding by `NativeEmbedding`, the packed LM head), which carry their ISA; their
matmul runs the kernel for float32 inputs (decode steps and prefill alike) and XLA's dot on the
unpacked weights for other dtypes. Why packed: XLA:CPU's dot streams weights and computes in
turn, while the kernel reads each contiguous panel once with prefetching (measured in
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import functools
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

from jaxinfer import paths
from models import pytree

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ("cpu.cc", "quant.cc", "common.h", "simd.h"))
COMPILED = SOURCES[:2]  # the translation units; the headers are hashed with them
# ISA -> (CPU flags it needs, compiler flags that select its path in simd.h); most capable first.
# Explicit flags, not -march=native: a lower ISA must compile its own path on a higher CPU.
# avx512vnni is avx512 whose 4-bit integer dot products use VNNI's vpdpbusd (one instruction
# for maddubs + add; identical sums).
ISA_FLAGS = {
    "avx512vnni": (("avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", "f16c"),
                   ("-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c")),
    "avx512": (("avx512f", "avx512bw", "avx2", "fma", "f16c"),
               ("-mavx512f", "-mavx512bw", "-mavx2", "-mfma", "-mf16c")),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
}
FLAGS = ("-O3", "-mtune=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")
# CPU vendor (/proc/cpuinfo vendor_id) -> defines that tune the kernels for its CPUs (common.h):
# on AMD's a panel read in a single pass (batch 1) does not prefetch the next panel (batch-1
# float32 decode on Zen 4 without it: median +9.5% on AVX2, 9 pairs; +2% on AVX-512, 8 pairs,
# a wash), while Intel's gained 14-44% (AVX2) and 1-8% (AVX-512) with it (docs/CPU_RESULTS.md).
VENDOR_FLAGS = {"AuthenticAMD": ("-DJAXINFER_ONE_PASS_PREFETCH=0",)}
# kernel kind -> symbol in cpu.cc (the same in every ISA's library)
_SYMBOLS = {"matmul": "JaxinferMatmulF32", "matmul_many": "JaxinferMatmulManyF32",
            "glu": "JaxinferGluF32", "attend": "JaxinferAttendF32",
            "attend_half": "JaxinferAttendF16", "qmatmul": "JaxinferQMatmul"}
KINDS = tuple(_SYMBOLS)
STRIP = 48  # columns per packed panel (kStrip in cpu.cc, checked when a library loads)


def target(kind: str, isa: str) -> str:
    """The XLA FFI target of one kernel kind (a key of _SYMBOLS: "matmul", "attend", ...) for
    one ISA, e.g. "jaxinfer_matmul_f32_avx2" ("attend_half": the attention over a float16
    cache)."""
    return f"jaxinfer_{kind}_f32_{isa}"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_flags() -> str:
    """This CPU's feature flags, space separated ("" where unknown)."""
    return _cpuinfo().get("flags", "")


def supported_isas() -> tuple[str, ...]:
    """The ISAs of ISA_FLAGS this CPU can run (x86-64 Linux with their CPU flags), most
    capable first. Builds nothing."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return ()
    have = set(_cpu_flags().split())
    return tuple(isa for isa, (needs, _) in ISA_FLAGS.items() if have.issuperset(needs))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _selection() -> tuple[str | None, str]:
    """(the ISA this process should run, "") or (None, why none runs); builds nothing."""
    if os.environ.get("JAXINFER_NATIVE", "1") == "0":
        return None, "JAXINFER_NATIVE=0"
    supported = supported_isas()
    wanted = os.environ.get("JAXINFER_CPU_ISA", "").strip().lower()
    if wanted:
        if wanted in supported:
            return wanted, ""
        why = "not one of " + ", ".join(ISA_FLAGS) if wanted not in ISA_FLAGS else "not supported by this CPU"
        _warn_once(f"JAXINFER_CPU_ISA={wanted}: {why}; the native CPU kernels are off, XLA runs everything")
        return None, f"JAXINFER_CPU_ISA={wanted} {why}"
    if supported:
        return supported[0], ""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None, f"not x86-64 Linux: {platform.system()} {platform.machine()}"
    return None, "no AVX2/FMA"


def _compile_flags(isa: str) -> tuple[str, ...]:
    """The compiler flags of `isa`'s library on this CPU: FLAGS, the ISA's, the vendor's."""
    return (*FLAGS, *ISA_FLAGS[isa][1], *VENDOR_FLAGS.get(_cpuinfo().get("vendor_id", ""), ()))


def _library_path(isa: str) -> Path:
    """Where `isa`'s library is cached: named by the ISA and a hash of everything it depends on."""
    import jaxlib

    from jaxinfer.loading.fetch import cache_dir

    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), " ".join(_compile_flags(isa)).encode(),
                 os.environ.get("CXX", "c++").encode(), jaxlib.__version__.encode(),
                 _cpu_flags().encode(), sys.version.encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"cpu-{isa}-{key.hexdigest()[:16]}.so"


def build(isa: str | None = None) -> Path:
    """Compile the kernel sources for `isa` (default: the one this process runs; once, later calls reuse
    the cached library). Returns its path.

    RuntimeError with the compiler's message if compilation fails.
    """
    isa = isa or _selection()[0]
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"no ISA to build the native CPU kernels for ({_selection()[1]})")
    lib = _library_path(isa)
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [os.environ.get("CXX", "c++"), *_compile_flags(isa), f"-I{jax.ffi.include_dir()}",
           *map(str, COMPILED), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the kernels ({isa}) failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a library in the cache is always complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    """`isa`'s kernels built, loaded and registered with XLA for the CPU platform, once per
    process (the one registration state, everything asks here); None, with a warning, where
    they cannot be (compiler missing or failing)."""
    try:
        lib = ctypes.CDLL(str(build(isa)))
        lib.JaxinferIsa.restype = ctypes.c_char_p
        lib.JaxinferStrip.restype = ctypes.c_int64
        built = (lib.JaxinferIsa().decode(), lib.JaxinferStrip())
        if built != (isa, STRIP):
            raise RuntimeError(f"the library was compiled for {built}, expected {(isa, STRIP)}")
        for kind, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(target(kind, isa), jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"native CPU kernels ({isa}) unavailable, using XLA: {e}", stacklevel=3)
        return None


def register(isa: str) -> bool:
    """Build, load and register `isa`'s kernels with XLA if not yet done; False where they
    cannot be (see `_library`). A program that calls them needs this before it compiles."""
    return _library(isa) is not None


def _active() -> str | None:
    chosen, _ = _selection()
    return chosen if chosen is not None and _library(chosen) is not None else None


def isa() -> str | None:
    """The ISA whose kernels this process runs ("avx512vnni", "avx512" or "avx2", built and
    registered on the first call), or None where XLA runs everything (see `describe`)."""
    return _active()


def available() -> bool:
    """True once the kernels are built, loaded and registered with XLA for the CPU platform."""
    return _active() is not None


def describe() -> str:
    """One line saying which path runs, e.g. "native CPU kernels: avx2 (AMD EPYC, 2 threads)"
    or "native CPU kernels off (JAXINFER_NATIVE=0): XLA runs everything". Builds the kernels
    if they are not built yet."""
    chosen, why = _selection()
    if chosen is not None and _library(chosen) is None:
        why = f"the {chosen} build failed"
    if why:
        return f"native CPU kernels off ({why}): XLA runs everything"
    model = _cpuinfo().get("model name", platform.processor() or "unknown CPU")
    return f"native CPU kernels: {chosen} ({model}, {len(os.sched_getaffinity(0))} threads)"


PACK_PANELS = 64  # panels copied per numpy step in `pack` (a working set that fits in L2)


def pack(w) -> jax.Array:
    """w [K, N] -> panels [ceil(N / STRIP), K, STRIP] (columns zero padded to whole panels);
    a stack w [*S, K, N] (layers [L], a layer's experts [E], or both [L, E]) -> [*S,
    ceil(N / STRIP), K, STRIP].

    Packed on the host with numpy (w may be a numpy array or a CPU jax array, read without a
    copy) a few panels at a time: no XLA program is compiled for it (eager jnp ops would
    compile and run one small program per weight shape at every start), and a transposed
    view such as `table.T` is read block by block.
    """
    w = np.asarray(w)
    out = np.empty((*w.shape[:-2], *packed_shape(*w.shape[-2:])), w.dtype)
    for i in np.ndindex(*w.shape[:-2]):  # one matrix at a time into the stack (() for one)
        _pack_into(w[i], out[i])
    return jax.device_put(out)  # jnp.asarray would compile a copy program per shape


def _pack_into(w: np.ndarray, out: np.ndarray) -> None:
    """w [K, N] packed into out [ceil(N / STRIP), K, STRIP] (see `pack`)."""
    k, n = w.shape
    p = out.shape[0]
    out[-1] = 0  # the last panel's padding columns
    for p0 in range(0, p, PACK_PANELS):
        cols = w[:, p0 * STRIP:(p0 + PACK_PANELS) * STRIP]  # [K, <= PACK_PANELS * STRIP]
        full = cols.shape[1] // STRIP
        out[p0:p0 + full] = cols[:, :full * STRIP].reshape(k, full, STRIP).transpose(1, 0, 2)
        if full * STRIP < cols.shape[1]:  # the last, partial panel
            out[p0 + full, :, :cols.shape[1] - full * STRIP] = cols[:, full * STRIP:]


def unpack(panels: jax.Array, n: int) -> jax.Array:
    """panels [P, K, STRIP] -> w [K, n]."""
    p, k, s = panels.shape
    return panels.transpose(1, 0, 2).reshape(k, p * s)[:, :n]


def _require(isa: str | None) -> str:
    """`isa` (default: the process's, see `isa()`) once its kernels are built and registered;
    RuntimeError where they cannot run here."""
    chosen = isa or _active()
    if chosen is None or chosen not in supported_isas() or _library(chosen) is None:
        raise RuntimeError(f"the native CPU kernels ({isa or 'any ISA'}) are unavailable here: "
                           f"{describe()}")
    return chosen


def _layer_arg(layer) -> jax.Array:
    """Every kernel's first operand: the layer of stacked weights (and caches) it reads, an
    int32 scalar (0 for unstacked ones)."""
    return jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())


def matmul(x: jax.Array, panels: jax.Array, n: int, isa: str | None = None,
           layer=None) -> jax.Array:
    """x [M, K] @ W [K, n] -> [M, n] float32, W given packed (see `pack`; or a stack of layers
    [L, P, K, STRIP] of which `layer`, an int or int32 scalar, is read in place), on `isa`'s
    kernel (default: the process's)."""
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(target("matmul", _require(isa)), out)(_layer_arg(layer), x, panels)


def matmul_many(x: jax.Array, panels: list[jax.Array], ns: list[int],
                isa: str | None = None, layer=None) -> list[jax.Array]:
    """[x @ W_j] for several packed weights (or stacks, see `matmul`) of one x [M, K], in one
    call -> [M, n_j] each."""
    outs = [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for n in ns]
    call = jax.ffi.ffi_call(target("matmul_many", _require(isa)), outs)
    return list(call(_layer_arg(layer), x, *panels))


def glu(x: jax.Array, gate: jax.Array, up: jax.Array, n: int, isa: str | None = None,
        layer=None) -> jax.Array:
    """silu(x @ Wg) * (x @ Wu) for x [M, K], both packed with n columns (or stacks, see
    `matmul`), in one call -> [M, n]."""
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(target("glu", _require(isa)), out)(_layer_arg(layer), x, gate, up)


# Rows up to which the matmul kernels run; more (a long prefill chunk, several prompts) go to
# XLA's dot on the unpacked or dequantized weight, which blocks x too (measured on Zen 3, one
# call, SmolLM2's 576 x 1536 weight: kernel 7.07 vs XLA 7.25 ms at 256 rows, 14.74 vs 13.18 ms
# at 512; the kernels read x again for every panel). 4-bit weights take the kernel at any row
# count: its integer dot products beat XLA's dot on the dequantized weight at every count
# measured (Zen 4, SmolLM2's Q4_1 576 x 1536 and 1536 x 576, 512 to 2048 rows: 1.25-1.6x on
# the AVX2 path, 2.6-5x with VNNI; 8-bit weights: XLA 1.0-1.3x faster there; docs/CPU_RESULTS.md).
MAX_KERNEL_ROWS = 256


def _kernel_rows(x: jax.Array, limit: int | None = MAX_KERNEL_ROWS) -> int | None:
    """Rows of x [..., K] when the kernel takes them (float32, 1 to `limit` rows; None: any),
    else None."""
    rows = int(np.prod(x.shape[:-1]))
    fits = 0 < rows and (limit is None or rows <= limit)
    return rows if x.dtype == jnp.float32 and fits else None


def _dot(x: jax.Array, panels: jax.Array, n: int, isa: str, layer=None) -> jax.Array:
    """x [..., K] @ W [K, n]: `isa`'s kernel for float32 rows, XLA's dot on the unpacked weights
    otherwise (panels: one weight's, or a stack read at `layer`)."""
    rows = _kernel_rows(x)
    if rows is None:
        return x @ unpack(_at(panels, layer, 3), n).astype(x.dtype)
    return matmul(x.reshape(rows, x.shape[-1]), panels, n, isa, layer).reshape(*x.shape[:-1], n)


def _at(a: jax.Array | None, layer, rank: int) -> jax.Array | None:
    """One layer's part of a child of a native leaf: a[layer] when `a` is a stack (one axis
    more than `rank`), else a itself."""
    return a[layer] if a is not None and a.ndim == rank + 1 else a


def _free(stack: tuple, layer) -> tuple:
    """The stack axes of a native leaf not chosen yet: all of them ([L], [E] or [L, E]), or
    all but the first once `layer` is (by a scan over the layers, `at_layer`)."""
    return stack[layer is not None:]


def _flat(a: jax.Array | None, layer) -> jax.Array | None:
    """A child of a native leaf as the flat stack `_per_entry` indexes: [L, E, ...] with a
    layer chosen -> [L * E, ...] (a view of the same buffer); [E, ...] itself."""
    return a if a is None or layer is None else a.reshape(-1, *a.shape[2:])


def _per_entry(x: jax.Array, ws: list, op) -> list[jax.Array]:
    """Native leaves of one stack whose first free axis has E entries (a layer's experts,
    shape [E, K, n]; all of ws with the same `layer` and free axes) applied to x [..., M, K]
    as x @ W [E, K, n] broadcasts: op(x_e [..., M, K], [each w's entry e]) -> a list of
    [..., M, n_j], run for each e in a static loop, each entry a view that the kernels read
    in place (layer operand e, or layer * E + e of the flattened stack) -> the list of
    results stacked on axis -3: [..., E, M, n_j] each."""
    count = ws[0].free[0]
    xb = jnp.broadcast_to(x, (*jnp.broadcast_shapes(x.shape[:-2], (count,)), *x.shape[-2:]))
    outs = []
    for e in range(count):
        index = e if ws[0].layer is None else ws[0].layer * count + e  # one object for all ws
        outs.append(op(xb[..., e, :, :], [w.entry(index) for w in ws]))
    return [jnp.stack(ys, axis=-3) for ys in zip(*outs, strict=True)]


def _one_stack(ws: list) -> bool:
    """Whether native leaves run together: one ISA, the same chosen layer and free axes."""
    return all(w.isa == ws[0].isa and w.layer is ws[0].layer and w.free == ws[0].free
               for w in ws)


def _many_apart(x: jax.Array, ws: list) -> list[jax.Array] | None:
    """`matmul_many` of native leaves ws over x [..., K] where they cannot run as one kernel
    call: each alone (not `_one_stack`), or one call per entry of a free stack axis
    (`_per_entry`); None when they can (the caller's kernel call)."""
    if not _one_stack(ws):
        return [w.matmul(x) for w in ws]
    if ws[0].free:
        return _per_entry(x, ws, lambda xe, v: v[0].matmul_many(xe, v[1:]))
    return None


def _layer_field():
    """The layer a stacked leaf is read at (an int32 scalar; set by `at_layer` inside a scan
    over the layers), or None: a child, since a scan's counter is traced."""
    return flax.struct.field(default=None)


def _isa_field():
    """The ISA a packed leaf runs on: static (aux data), so each ISA traces its own calls."""
    return flax.struct.field(pytree_node=False)


@pytree.dataclass
class NativeWeight:
    """A float32 weight W [K, n] kept packed for `isa`'s kernels: panels [ceil(n / 48), K, 48];
    or a stack of them [*S, ceil(n / 48), K, 48] (shape [*S, K, n]): the weights of every layer
    (S = [L]), of which a scan over the layers multiplies layer `layer` (`at_layer`) in place;
    a layer's experts (S = [E]), or every layer's ([L, E]). A stack whose first free axis is
    not chosen (the experts) multiplies each entry by its own part of x (`_per_entry`)."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    isa: str = _isa_field()
    layer: jax.Array | None = _layer_field()

    @classmethod
    def from_array(cls, w: jax.Array, isa: str | None = None) -> NativeWeight:
        """w [K, n] (or a stack [*S, K, n]) packed for `isa` (default: the process's ISA;
        RuntimeError if none runs)."""
        return cls(panels=pack(w), n=int(w.shape[-1]), isa=_require(isa))

    shape = property(lambda self: _shape(self.panels.shape[:-3], self.layer,
                                         (self.panels.shape[-2], self.n)))
    free = property(lambda self: _free(self.panels.shape[:-3], self.layer))
    dtype = property(lambda self: self.panels.dtype)
    nbytes = property(lambda self: self.panels.nbytes)

    def at_layer(self, layer) -> NativeWeight:
        """Layer `layer` (int32 scalar) of a stack, still reading the whole stack's buffer."""
        return self.replace(layer=layer)

    def entry(self, index) -> NativeWeight:
        """Entry `index` of the flat stack (see `_per_entry`), read in place."""
        return self.replace(panels=_flat(self.panels, self.layer), layer=index)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> [..., n]; with a free stack axis [E, K, n], x [..., M, K] ->
        [..., E, M, n] (broadcast as x @ W)."""
        if self.free:
            return _per_entry(x, [self], lambda xe, v: [v[0].matmul(xe)])[0]
        return _dot(x, self.panels, self.n, self.isa, self.layer)

    def matmul_many(self, x: jax.Array, others: list[NativeWeight]) -> list[jax.Array]:
        """[x @ W for W in (self, *others)] in one call: x [..., K] -> [..., n] each (one call
        per entry of a free stack axis)."""
        ws = [self, *others]
        apart = _many_apart(x, ws)
        if apart is not None:
            return apart
        rows = _kernel_rows(x)
        if rows is None:
            return [w.matmul(x) for w in ws]
        ys = matmul_many(x.reshape(rows, x.shape[-1]), [w.panels for w in ws], [w.n for w in ws],
                         self.isa, self.layer)
        return [y.reshape(*x.shape[:-1], w.n) for y, w in zip(ys, ws, strict=True)]

    def glu(self, x: jax.Array, up: NativeWeight) -> jax.Array:
        """silu(x @ self) * (x @ up) in one call: x [..., K] -> [..., n] (one call per entry
        of a free stack axis)."""
        if up.n != self.n or not _one_stack([self, up]):
            return jax.nn.silu(self.matmul(x)) * up.matmul(x)
        if self.free:
            return _per_entry(x, [self, up], lambda xe, v: [v[0].glu(xe, v[1])])[0]
        rows = _kernel_rows(x)
        if rows is None:
            return jax.nn.silu(self.matmul(x)) * up.matmul(x)
        y = glu(x.reshape(rows, x.shape[-1]), self.panels, up.panels, self.n, self.isa,
                self.layer)
        return y.reshape(*x.shape[:-1], self.n)


def _shape(stack: tuple, layer, shape: tuple) -> tuple:
    """A native leaf's shape: one weight's after its free stack axes (`_free`)."""
    return (*_free(stack, layer), *shape)


@pytree.dataclass
class NativeEmbedding:
    """A tied embedding table [V, D] kept as the packed LM head for `isa`'s kernels: panels of
    table^T, so x @ table^T runs the kernel; rows for the lookup are gathered from the panels."""

    panels: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    isa: str = _isa_field()

    @classmethod
    def from_table(cls, table: jax.Array, isa: str | None = None) -> NativeEmbedding:
        """table [V, D] packed for `isa` (default: the process's ISA)."""
        return cls(panels=pack(np.asarray(table).T), n=int(table.shape[0]), isa=_require(isa))

    shape = property(lambda self: (self.n, self.panels.shape[1]))
    dtype = property(lambda self: self.panels.dtype)
    nbytes = property(lambda self: self.panels.nbytes)

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] -> [..., D]."""
        return self.panels[tokens // STRIP, :, tokens % STRIP]

    def matmul_transposed(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., V]."""
        return _dot(x, self.panels, self.n, self.isa)


def _panels(rows: np.ndarray) -> np.ndarray:
    """rows [N, X] -> panels [ceil(N / STRIP), X, STRIP] on the host: `pack` of rows^T (the
    rows are W's columns)."""
    return np.asarray(pack(np.asarray(rows).T))


ACT_BLOCK = 32  # inputs per block of the activations of 4-bit weights (kBlock in quant.cc)


def q8_activations(x: jax.Array) -> jax.Array:
    """x [..., K] (K a multiple of ACT_BLOCK) as the 4-bit kernels see it: per block of 32
    inputs, d = max |x| / 127 and x -> d * round(x * 127 / max |x|), in float32."""
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // ACT_BLOCK, ACT_BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    xq = jnp.clip(jnp.round(blocks * inv), -127, 127)
    return (xq * (amax / 127.0)).reshape(x.shape)


def _nibble_panels(q: np.ndarray) -> np.ndarray:
    """4-bit panels q [P, K, 48] (0..15) -> uint8 [P, K / 8, 48, 4]: byte i of (j, c) holds row
    8j + i in its low nibble and 8j + 4 + i in its high one (quant.cc's layout)."""
    p, k, s = q.shape
    eight = q.reshape(p, k // 8, 2, 4, s)
    return (eight[:, :, 0] | (eight[:, :, 1] << 4)).astype(np.uint8).transpose(0, 1, 3, 2)


def _nibble_values(q: jax.Array) -> jax.Array:
    """The inverse along the last axes: q [..., K / 8, 4] -> values [..., K] (0..15, uint8)."""
    both = jnp.stack([q & 0x0F, q >> 4], axis=-2)  # [..., K / 8, 2, 4]
    return both.reshape(*q.shape[:-2], q.shape[-2] * 8)


@pytree.dataclass
class NativeQuant:
    """A quantized weight W [K, n] in panels for `isa`'s quantized matmul (quant.cc), made from
    any quantized leaf's `kernel_rows()`:
      q       int8 [P, K, 48] (8-bit), or uint8 [P, K / 8, 48, 4] (4-bit: byte i of (j, col)
              holds row 8j + i of k in the low nibble and 8j + 4 + i in the high one, values
              0..15), P = ceil(n / 48)
      scales  float32 or float16 [P, K / G, 48];  mins float16 [P, K / G, 48] (4-bit only)
    with W[k, col] = q * scales[k // G] (+ mins[k // G]). The kernel runs for float32 inputs,
    XLA's dot on the dequantized weight for other dtypes. 8-bit weights take the activations
    as they are; 4-bit weights (G a multiple of 32) take them quantized per block of 32
    (`q8_activations`), on the kernel and on XLA alike, so a row's result does not depend on
    which of them runs.
    A stack has each child with the leading stack axes S (shape [*S, K, n]), as NativeWeight:
    every layer's weights ([L]: a scan over the layers multiplies layer `layer`, `at_layer`,
    in place), a layer's experts ([E]) or every layer's ([L, E])."""

    q: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    n: int = flax.struct.field(pytree_node=False)
    isa: str = _isa_field()
    layer: jax.Array | None = _layer_field()

    @classmethod
    def from_rows(cls, rows, isa: str | None = None) -> NativeQuant:
        """From a `jaxinfer.quant.base.KernelRows` (numpy, N rows of K) for `isa` (default: the
        process's ISA; RuntimeError if none runs). ValueError for 4-bit rows whose group is
        not a multiple of ACT_BLOCK."""
        if not cls.takes(rows):
            raise ValueError(f"4-bit kernel weights need a group of a multiple of {ACT_BLOCK}, "
                             f"got {rows.group}")
        q, scales, mins = cls.host_children(rows)
        return cls(q=jax.device_put(q), scales=jax.device_put(scales),
                   mins=None if mins is None else jax.device_put(mins),
                   n=int(rows.q.shape[0]), isa=_require(isa))

    @classmethod
    def stack(cls, layers, isa: str | None = None, axes: tuple[int, ...] | None = None
              ) -> NativeQuant:
        """One stack from a sequence of every layer's KernelRows (all of one format and shape;
        a lazy sequence makes one layer's rows at a time), filled one layer at a time. axes:
        the stack axes S (default [len(layers)]; e.g. [L, E], the rows then given flat in
        row-major order). ValueError as `from_rows`."""
        parts, n = None, None
        for i in range(len(layers)):
            rows = layers[i]
            if not cls.takes(rows):
                raise ValueError(f"4-bit kernel weights need a group of a multiple of "
                                 f"{ACT_BLOCK}, got {rows.group}")
            one = cls.host_children(rows)
            if parts is None:
                parts = [None if a is None else np.empty((len(layers), *a.shape), a.dtype)
                         for a in one]
            for out, a in zip(parts, one, strict=True):
                if out is not None:
                    out[i] = a
            n = int(rows.q.shape[0])
        axes = (len(layers),) if axes is None else tuple(axes)
        q, scales, mins = (None if a is None else jax.device_put(a.reshape(*axes, *a.shape[1:]))
                           for a in parts)
        return cls(q=q, scales=scales, mins=mins, n=n, isa=_require(isa))

    @staticmethod
    def host_children(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(q, scales, mins) panels of one weight's KernelRows, in numpy (see the class)."""
        q = _panels(np.asarray(rows.q))
        if rows.mins is not None:
            q = _nibble_panels(q)
        return q, _panels(rows.scales), None if rows.mins is None else _panels(rows.mins)

    @staticmethod
    def takes(rows) -> bool:
        """Whether the kernels take these KernelRows (4-bit: groups of whole ACT_BLOCKs)."""
        return rows.mins is None or rows.group % ACT_BLOCK == 0

    bits = property(lambda self: 8 if self.q.dtype == jnp.int8 else 4)
    rank = property(lambda self: 3 if self.bits == 8 else 4)  # of one layer's q
    shape = property(lambda self: _shape(
        self.scales.shape[:-3], self.layer,
        (self.scales.shape[-2] * self.group, self.n)))
    group = property(lambda self: (self.q.shape[-2] if self.bits == 8 else self.q.shape[-3] * 8)
                     // self.scales.shape[-2])
    free = property(lambda self: _free(self.scales.shape[:-3], self.layer))
    dtype = property(lambda self: jnp.dtype(jnp.float32))
    nbytes = property(lambda self: sum(int(a.nbytes) for a in (self.q, self.scales, self.mins)
                                       if a is not None))

    def values_along(self, q: jax.Array, scales: jax.Array, mins: jax.Array | None,
                     axis: int) -> jax.Array:
        """Float32 weights from (parts of) the children, k running along `axis` (1 for whole
        panels [P, K, 48] (4-bit q [P, K / 8, 48, 4]), -1 for gathered columns [..., K] (4-bit
        q [..., K / 8, 4]))."""
        if self.bits == 4:
            if axis == 1:  # [P, K / 8, 48, 4] -> [P, 48, K] -> [P, K, 48]
                q = jnp.swapaxes(_nibble_values(jnp.transpose(q, (0, 2, 1, 3))), 1, 2)
            else:
                q = _nibble_values(q)
        w = q.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), self.group, axis)
        if mins is not None:
            w = w + jnp.repeat(mins.astype(jnp.float32), self.group, axis)
        return w

    def at_layer(self, layer) -> NativeQuant:
        """Layer `layer` (int32 scalar) of a stack, still reading the whole stack's buffers."""
        return self.replace(layer=layer)

    def entry(self, index) -> NativeQuant:
        """Entry `index` of the flat stack (see `_per_entry`), read in place."""
        return self.replace(q=_flat(self.q, self.layer), scales=_flat(self.scales, self.layer),
                            mins=_flat(self.mins, self.layer), layer=index)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """W [K, n] (of `layer` for a stack; [*free, K, n] with free stack axes)."""
        if self.free:
            count = self.free[0]
            return jnp.stack([self.entry(e if self.layer is None else self.layer * count + e)
                              .dequantize(dtype) for e in range(count)])
        q, s, m = (_at(a, self.layer, r) for a, r in ((self.q, self.rank), (self.scales, 3),
                                                       (self.mins, 3)))
        return unpack(self.values_along(q, s, m, 1), self.n).astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> [..., n]; with a free stack axis [E, K, n], x [..., M, K] ->
        [..., E, M, n] (broadcast as x @ W)."""
        if self.free:
            return _per_entry(x, [self], lambda xe, v: [v[0].matmul(xe)])[0]
        return _qdot(x, [self], False)[0]

    def matmul_many(self, x: jax.Array, others: list[NativeQuant]) -> list[jax.Array]:
        """[x @ W for W in (self, *others)] in one call: x [..., K] -> [..., n] each (one call
        per entry of a free stack axis)."""
        ws = [self, *others]
        apart = _many_apart(x, ws)
        return apart if apart is not None else _qdot(x, ws, False)

    def glu(self, x: jax.Array, up: NativeQuant) -> jax.Array:
        """silu(x @ self) * (x @ up) in one call: x [..., K] -> [..., n] (one call per entry
        of a free stack axis)."""
        if up.n != self.n or up.shape != self.shape or not _one_stack([self, up]):
            return jax.nn.silu(self.matmul(x)) * up.matmul(x)
        if self.free:
            return _per_entry(x, [self, up], lambda xe, v: [v[0].glu(xe, v[1])])[0]
        return _qdot(x, [self, up], True)[0]


def _qdot(x: jax.Array, ws: list[NativeQuant], glu: bool) -> list[jax.Array]:
    """x [..., K] against quantized panels: the kernel for float32 rows (one call for all of
    ws; glu: ws = (gate, up) -> [silu(x @ gate) * (x @ up)]), else XLA on dequantized weights
    (more than MAX_KERNEL_ROWS rows with an 8-bit weight among ws)."""
    rows = _kernel_rows(x, None if all(w.bits == 4 for w in ws) else MAX_KERNEL_ROWS)
    if rows is None:
        ys = [(q8_activations(x).astype(x.dtype) if w.bits == 4 else x) @ w.dequantize(x.dtype)
              for w in ws]
        return [jax.nn.silu(ys[0]) * ys[1]] if glu else ys
    args = []
    for w in ws:
        args += [w.q, w.scales, jnp.zeros((0,), jnp.float16) if w.mins is None else w.mins]
    outs = [jax.ShapeDtypeStruct((rows, w.n), jnp.float32) for w in ws[:1 if glu else None]]
    call = jax.ffi.ffi_call(target("qmatmul", _require(ws[0].isa)), outs)
    ys = call(_layer_arg(ws[0].layer), x.reshape(rows, x.shape[-1]), *args, glu=np.int64(glu))
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


@pytree.dataclass
class NativeQuantEmbedding:
    """A quantized tied embedding table [V, D] kept as the LM head's NativeQuant panels
    (W = table^T [D, V]); rows for the lookup are gathered from the panels and dequantized to
    `dtype`."""

    head: NativeQuant
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    shape = property(lambda self: (self.head.n, self.head.shape[0]))
    nbytes = property(lambda self: self.head.nbytes)
    isa = property(lambda self: self.head.isa)

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """tokens [...] -> [..., D]."""
        h = self.head
        p, c = tokens // STRIP, tokens % STRIP
        mins = None if h.mins is None else h.mins[p, :, c]
        return h.values_along(h.q[p, :, c], h.scales[p, :, c], mins, -1).astype(self.dtype)

    def matmul_transposed(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., V]."""
        return self.head.matmul(x)


def cache_attention(q, k, v, k_buf, v_buf, positions, k_pos, window, slots, inv_freq=None,
                    layer=None, isa=None):
    """The KVCache.attention kernel: each row's new tokens are rotated by RoPE (when inv_freq
    [H/2] is given), written into this layer's cache and attend over the row's slots. The
    cache is float32 or float16 (new tokens rounded to it, the attention in float32).

    q [B, T, N, H]; k, v [B, T, K, H] (new, q and k before RoPE); k_buf [R, K, H, S], v_buf
    [R, K, S, H] with R >= B (the B rows attending are the buffers' first: models.cache.
    head_rows), or stacks of every layer's [L, R, ...] of which `layer` (an int32 scalar) is
    this one; positions [B, T]; k_pos [B, S]; window (int); slots [B, T] (where the new tokens
    go) -> (out [B, T, N * H], k_buf, v_buf), as models.layers.self_attention's XLA path, except
    that a padding query (position -1, whose output is never read) gets zeros on the kernel.
    One call updates the buffers in place and reads only the slots each query sees: for a
    decode step the row's used slots; for several tokens per row (a prefill chunk) up to the
    last slot a query of its group sees, about half the keys of XLA's dense, masked attention
    for a causal chunk.
    Each token gets what it gets from one-token calls, bit for bit. Float32 q, k, v over a
    float32 or float16 cache with H a multiple of 16 (at most 256) runs `isa`'s kernel
    (default: the process's, when one runs); anything else XLA.
    """
    from models.layers import rope_tables, self_attention

    b, t, n, h = q.shape
    isa = isa or _active()
    kind = _ATTEND.get(jnp.dtype(k_buf.dtype)) if k_buf.dtype == v_buf.dtype else None
    stacked = k_buf.ndim == 5
    if not (h % 16 == 0 and h <= 256 and isa is not None and kind is not None and
            all(a.dtype == jnp.float32 for a in (q, k, v))):
        # The model's own XLA path, on this layer's buffers (a stack, or one layer's as a
        # one-layer cache).
        buffers = (k_buf, v_buf) if stacked else ((k_buf,), (v_buf,))
        out, (kb, vb, _, _) = self_attention(q, k, v, positions, k_pos, window,
                                             layer if stacked else 0, slots,
                                             (*buffers, None, None), None, inv_freq)
        return (out, kb, vb) if stacked else (out, kb[0], vb[0])
    i32 = jnp.int32
    if inv_freq is None:  # no rotation: cos 1, sin 0
        cs = jnp.concatenate([jnp.ones((b, t, h // 2)), jnp.zeros((b, t, h // 2))], axis=-1)
    else:
        cs = jnp.concatenate(rope_tables(positions, inv_freq), axis=-1)
    shapes = (jax.ShapeDtypeStruct((b, t, n, h) if t > 1 else (b, n, h), jnp.float32),
              jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
              jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype))
    call = jax.ffi.ffi_call(target(kind, _require(isa)), shapes,
                            input_output_aliases={1: 1, 2: 2})
    one = (lambda a: a[:, 0]) if t == 1 else (lambda a: a)  # the one-token kernel's shapes
    out, k_buf, v_buf = call(_layer_arg(layer), k_buf, v_buf, one(q), one(k), one(v),
                             one(cs).astype(jnp.float32), one(positions).astype(i32),
                             k_pos.astype(i32), jnp.reshape(jnp.asarray(window, i32), (1,)),
                             one(slots).astype(i32))
    return out.reshape(b, t, n * h), k_buf, v_buf


_ATTEND = {jnp.dtype(jnp.float32): "attend", jnp.dtype(jnp.float16): "attend_half"}  # cache dtype


@functools.cache
def _attention(isa: str):
    """cache_attention on `isa`'s kernel: one object per ISA, since KVCache.attention is a
    static field (a new object each call would recompile the decode step)."""
    return functools.partial(cache_attention, isa=isa)


def _is_native(x) -> bool:
    return isinstance(x, NativeWeight | NativeEmbedding | NativeQuant | NativeQuantEmbedding)


def attention_for(params, dtype):
    """The decode attention kernel for a cache of `dtype` next to `params`: cache_attention on
    the ISA of the packed leaves when params were prepared by native_params and the cache is
    float32 or float16, else None (the model's own attention)."""
    native = [x for x in jax.tree.leaves(params, is_leaf=_is_native) if _is_native(x)]
    return _attention(native[0].isa) if native and jnp.dtype(dtype) in _ATTEND else None


def packed_shape(k: int, n: int) -> tuple[int, int, int]:
    """The shape `pack` gives a [K, N] weight: [ceil(N / STRIP), K, STRIP]."""
    return (-(-n // STRIP), k, STRIP)


def native_params(params, tied_key: str | None, prefix: str = "", cached=None):
    """params with every float32 matmul weight (top level, stacked layers [L, K, N] or
    per-layer trees, see `models.unstack_layers`; a MoE layer's experts [(L,) E, K, N] too)
    packed as NativeWeight, every quantized one with `kernel_rows` as NativeQuant (a stack of
    layers or experts as one stacked leaf), and the tied
    embedding `tied_key` (if any) as the packed head (NativeEmbedding / NativeQuantEmbedding),
    for the process's ISA. Other leaves (lookup tables, other schemes, norms and biases)
    unchanged. Returns params itself when no kernel runs here. prefix: the path of `params`
    within the whole tree (e.g. "layers/3" for one layer's tree).

    cached: optional {name: panels} of weights packed earlier (numpy, e.g. memory maps of the
    converted cache, see `packed_leaves`); a leaf's panels are taken from it when their shape
    and dtype are what packing would give, and packed here otherwise.
    """
    chosen = _active()
    if chosen is None:
        return params
    cached = cached or {}

    def panels(path: str, w) -> jax.Array:  # w [K, N] (or a stack [*S, K, N]) -> its panels
        got = cached.get(path)
        want = (*w.shape[:-2], *packed_shape(*w.shape[-2:]))
        if got is not None and got.shape == want and got.dtype == w.dtype:
            return jax.device_put(got)  # aligned host memory: aliased, not copied
        return pack(w)

    def wrap(path: str, leaf):
        if hasattr(leaf, "kernel_rows"):
            return _native_quantized(path, leaf, tied_key, chosen, cached)
        if not isinstance(leaf, jax.Array) or leaf.dtype != jnp.float32:
            return leaf
        lead = _stack_axes(path, leaf.ndim)
        if lead is None:  # norms and biases
            return leaf
        if path == tied_key:
            return NativeEmbedding(panels=panels(path, np.asarray(leaf).T), n=int(leaf.shape[0]),
                                   isa=chosen)
        # A layer's matrices are all multiplied (the lookup tables are the model's, never a
        # layer's), so only top-level ones ask the declared axes (tracing the models' init
        # for them costs ~0.4 s at start-up).
        if not lead and paths.split_layer(path)[0] is None and paths.is_lookup_table(path):
            return leaf  # looked up, never multiplied
        return NativeWeight(panels=panels(path, leaf), n=int(leaf.shape[-1]), isa=chosen)

    return paths.map_leaves(wrap, params, prefix)


def _stack_axes(path: str, ndim: int) -> int | None:
    """How many stack axes lead the matrix of the `ndim`-dimensional leaf at `path`: 0 for a
    matrix, 1 for stacked layers [L, K, N] or a layer's experts [E, K, N], 2 for stacked
    experts [L, E, K, N]; None for a leaf that is no matrix (norms, biases). Only a leaf of
    more axes than a (stacked) projection asks the declared axes (`paths.matrix_lead`)."""
    plain = int(paths.is_stacked(path))
    if ndim == 2 + plain:
        return plain
    return ndim - 2 if ndim > 2 + plain and paths.matrix_lead(path) == ndim - 2 else None


def _native_quantized(path: str, leaf, tied_key: str | None, isa: str, cached: dict):
    """A quantized leaf's native form: NativeQuant for a projection (a stack for stacked
    layers or experts), NativeQuantEmbedding for the tied embedding; the leaf itself where the
    kernels do not take it (a lookup table, a scheme without `kernel_rows`). cached: as
    `native_params` takes it; the children are taken from it when they fit the leaf."""
    lead = _stack_axes(path, len(leaf.shape))
    if lead:
        if leaf.layout != "in_out":
            return leaf
        known = _cached_quant(cached, path, leaf.shape, isa)
        if known is not None:
            return known
        entries = _StackRows(leaf, lead)
        first = entries[0]
        if first is None or not NativeQuant.takes(first):
            return leaf
        return NativeQuant.stack(entries, isa, leaf.shape[:lead])
    tied = path == tied_key and leaf.layout == "out_in"
    if not tied and (paths.is_lookup_table(path) or leaf.layout != "in_out"):
        return leaf
    shape = tuple(leaf.shape)[::-1] if tied else tuple(leaf.shape)  # W [K, n]
    head = _cached_quant(cached, path, shape, isa)
    if head is None:
        rows = leaf.kernel_rows()
        if rows is None or not NativeQuant.takes(rows):
            return leaf
        head = NativeQuant.from_rows(rows, isa)
    return NativeQuantEmbedding(head=head, dtype=leaf.dtype) if tied else head


def _cached_quant(cached: dict, path: str, shape: tuple, isa: str) -> NativeQuant | None:
    """The NativeQuant of W `shape` [*S, K, n] from `cached` (see `packed_leaves`: children
    under path + ".q" / ".scales" / ".mins"), or None when they are missing or do not fit."""
    q, scales, mins = (cached.get(f"{path}.{c}") for c in ("q", "scales", "mins"))
    if q is None or scales is None:
        return None
    *stack, k, n = shape
    lead = (*stack, -(-n // STRIP))
    eight = q.dtype == np.int8
    want_q = (*lead, k, STRIP) if eight else (*lead, k // 8, STRIP, 4)
    fits = (tuple(q.shape) == want_q and (eight or q.dtype == np.uint8)
            and tuple(scales.shape[:len(lead)]) == lead and scales.ndim == len(lead) + 2
            and scales.shape[-1] == STRIP and k % scales.shape[-2] == 0
            and (mins is None) == eight
            and (mins is None or (mins.shape == scales.shape and mins.dtype == np.float16)))
    if not fits:
        return None
    put = jax.device_put  # aligned host memory: aliased, not copied
    return NativeQuant(q=put(q), scales=put(scales), mins=None if mins is None else put(mins),
                       n=int(n), isa=isa)


class _StackRows:
    """The KernelRows of each matrix of a stacked quantized leaf (`lead` stack axes: layers,
    experts or both, flat in row-major order), made when asked for (from host views of its
    children: no XLA program per slice)."""

    def __init__(self, leaf, lead: int):
        self.leaf = jax.tree.map(np.asarray, leaf)
        self.axes = tuple(leaf.shape[:lead])

    def __len__(self) -> int:
        return int(np.prod(self.axes))

    def __getitem__(self, i: int):
        at = np.unravel_index(i, self.axes)
        return jax.tree.map(lambda c: c[at], self.leaf).kernel_rows()


def packed_leaves(params) -> dict[str, jax.Array]:
    """{name: array} of every packed leaf of params (what `native_params(..., cached=)`
    takes back): a float32 leaf's panels under its path, a quantized one's children under
    path + ".q" / ".scales" / ".mins"."""
    out = {}
    for path, leaf in paths.iter_leaves(params):
        if isinstance(leaf, NativeWeight | NativeEmbedding):
            out[path] = leaf.panels
        leaf = leaf.head if isinstance(leaf, NativeQuantEmbedding) else leaf
        if isinstance(leaf, NativeQuant):
            for name in ("q", "scales", "mins"):
                if getattr(leaf, name) is not None:
                    out[f"{path}.{name}"] = getattr(leaf, name)
    return out
