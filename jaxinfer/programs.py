"""Serialized engine programs: a warm start neither traces nor lowers the model.

JAX's persistent compilation cache is keyed by the lowered program, so even when every
executable comes from it, each start still traces the engine's functions in Python (the model's
30 layers, once per program) and lowers them to StableHLO — seconds on a small CPU. Here the
lowered program itself is kept: `call(fn, args, static)` exports `fn` (a `jax.jit` function of
`jaxinfer.engine`) once per argument signature with `jax.export`, writes it to the programs
directory, and from then on runs the deserialized program (`Exported.call` under `jax.jit`,
whose executable the compilation cache then serves) without tracing `fn`.

The key of an entry is everything the program depends on: the function, its static arguments
(the model config ...), the tree structure, shapes and dtypes of its arguments, the jax and
jaxlib versions, the JAX options that change tracing, the kernel environment variables and a
digest of this package's and `models`' source files (any edit makes new entries). A tree whose
structure prints an object address (it would never match again; module-level functions are
named instead) is not cached. Entries are
written to a temporary name and renamed when complete (`convert_cache.atomic_write`; a cache
directory that cannot be written only costs the speed-up), and carry the sha256 of their payload:
a damaged or unreadable entry is deleted and rebuilt, never run.

Off until `enable(directory)` (the CLI turns it on beside the compilation cache); the
Python API traces as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import jax

_dir: Path | None = None
_memo: dict = {}  # signature -> jitted program of the flat leaves, or None (call fn itself)
ROOTS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "models")
_ENV = ("JAXINFER_NATIVE", "JAXINFER_CPU_ISA")
_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion")
_TARGET = re.compile(rb"jaxinfer_[a-z_]+_f32_([a-z0-9]+)")
_FUNCTION = re.compile(r"<function ([\w.]+) at 0x[0-9a-f]+>")  # module-level functions only


def enable(directory: str | os.PathLike | None) -> None:
    """Keep and reuse serialized programs under `directory` (None: off)."""
    global _dir
    _dir = None if directory is None else Path(directory)
    _memo.clear()


def enabled() -> bool:
    return _dir is not None


def _source_digest() -> str:
    """sha256 over this package's and `models`' .py/.cc/.h files (names and contents)."""
    if not hasattr(_source_digest, "value"):
        h = hashlib.sha256()
        for root in ROOTS:
            for p in sorted(root.rglob("*")):
                if p.suffix in (".py", ".cc", ".h") and "__pycache__" not in p.parts:
                    h.update(str(p.relative_to(root.parent)).encode() + b"\0" + p.read_bytes())
        _source_digest.value = h.hexdigest()
    return _source_digest.value


def _key(fn, static: dict, tree_text: str, avals) -> str:
    import jaxlib

    parts = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)),
             repr(sorted(static.items())), tree_text, repr(avals), jax.__version__,
             jaxlib.__version__, _source_digest(), jax.default_backend(),
             repr([(k, os.environ.get(k)) for k in _ENV]),
             repr([(k, getattr(jax.config, k, None)) for k in _OPTIONS])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:40]


def _read_entry(path: Path, parse):
    """parse(meta, payload) of the entry at `path` (a JSON head with the payload's sha256, a
    newline, the payload); None if there is none, or if it is damaged or parse raises (then
    it is deleted)."""
    try:
        blob = path.read_bytes()
    except OSError:  # no entry, or a directory that cannot be read: make it
        return None
    try:
        head, payload = blob.split(b"\n", 1)
        meta = json.loads(head)
        if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise ValueError("checksum mismatch")
        return parse(meta, payload)
    except Exception:  # noqa: BLE001 - any damage means: rebuild, never use it
        path.unlink(missing_ok=True)
        return None


def _write_entry(path: Path, payload: bytes, what: str, **meta) -> None:
    """Write an entry `_read_entry` reads, atomically (a warning where the directory cannot
    be written)."""
    from jaxinfer.loading.convert_cache import atomic_write

    head = json.dumps({"sha256": hashlib.sha256(payload).hexdigest(), **meta}).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(head + b"\n" + payload),
                 what=what, then="the next start traces them again")


def _read(path: Path):
    """(Exported, ISAs of the kernels it calls) from an entry, or None (see `_read_entry`)."""
    return _read_entry(path, lambda meta, payload: (
        jax.export.deserialize(bytearray(payload)), meta["isas"]))


def _write(path: Path, exported) -> list[str]:
    """Write `exported`; returns the kernel ISAs it calls."""
    payload = bytes(exported.serialize())
    isas = sorted({m.decode() for m in _TARGET.findall(bytes(exported.mlir_module_serialized))})
    _write_entry(path, payload, "the engine programs", isas=isas)
    return isas


def _export(fn, static: dict, in_tree, leaves, want_tree):
    """Export fn on these arguments; None where its result's tree is not `want_tree`."""
    from jaxinfer import kernels

    out_trees = []

    def flat(*xs):
        out = fn(*jax.tree.unflatten(in_tree, xs), **static)
        leaves_out, tree = jax.tree.flatten(out)
        out_trees.append(tree)
        return leaves_out

    flat.__name__ = flat.__qualname__ = getattr(fn, "__name__", "program")  # as jit logs it
    checks = [jax.export.DisabledSafetyCheck.custom_call(kernels.target(kind, isa))
              for kind in kernels.KINDS for isa in kernels.ISA_FLAGS]
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type) for x in leaves]
    exported = jax.export.export(jax.jit(flat), disabled_checks=checks)(*specs)
    return exported if out_trees[-1] == want_tree else None


def _runner(name: str, exported, isas, donate: tuple[int, ...]):
    """The deserialized program as a jitted function of the flat leaves, named
    `exported_<name>` (in compile logs and profiles)."""
    from jaxinfer import kernels

    for isa in isas:  # the program calls these kernels: register them before compiling
        if not kernels.register(isa):
            return None
    lapack = b"lapack" in bytes(exported.mlir_module_serialized)
    _patch_lapack_init()

    def run(*leaves):
        return exported.call(*leaves)

    run.__name__ = run.__qualname__ = f"exported_{name}"
    jitted = jax.jit(run, donate_argnums=donate)

    def call(*leaves):  # lowered (on the first call) while this context is on
        with _lowering_without_lapack(not lapack):
            return jitted(*leaves)

    return call


def call(fn, args: tuple, static: dict, *, donate: int | None = None, out_like: int = 0):
    """fn(*args, **static) through a serialized program where programs are enabled.

    fn's result must have the tree structure of args[out_like] (the engine's state); donate:
    the index of the argument fn donates (its leaves are donated to the program). Falls back
    to calling fn where programs are off or the arguments cannot be keyed.
    """
    if _dir is None:
        return fn(*args, **static)
    leaves, in_tree = jax.tree.flatten(args)
    avals = tuple((x.shape, str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)
    sig = (fn, in_tree, avals, tuple(sorted(static.items())))
    if sig not in _memo:
        _memo[sig] = _prepare(fn, args, static, leaves, in_tree, avals, donate, out_like)
    run = _memo[sig]
    if run is None:
        return fn(*args, **static)
    out = run(*leaves)
    return jax.tree.unflatten(jax.tree.structure(args[out_like]), out)


def _prepare(fn, args, static, leaves, in_tree, avals, donate, out_like):
    """The runner for one signature: from its entry, or exported and written now."""
    tree_text = _FUNCTION.sub(r"<function \1>", str(in_tree))  # e.g. the cache's attention
    if " at 0x" in tree_text:  # another object's address: the key would never match again
        return None
    path = _dir / f"{_key(fn, static, tree_text, avals)}.jaxprog"
    donated = ()
    if donate is not None:
        start = len(jax.tree.leaves(args[:donate]))
        donated = tuple(range(start, start + len(jax.tree.leaves(args[donate]))))
    entry = _read(path)
    if entry is None:
        exported = _export(fn, static, in_tree, leaves, jax.tree.structure(args[out_like]))
        if exported is None:
            return None
        entry = exported, _write(path, exported)
    return _runner(getattr(fn, "__name__", "program"), *entry, donated)


def declare_abstract(config) -> None:
    """Give `models` config's abstract params from the programs directory, so that a warm
    start does not trace the model's init for them (~0.15 s): read from an entry keyed by the
    config and the source digest, or made now and written. Nothing where programs are off; a
    damaged entry is deleted and made again."""
    if _dir is None:
        return
    import flax

    import models

    def declare(meta, payload) -> bool:
        models.declare_abstract(config, json.loads(payload))
        return True

    parts = ["abstract params", repr(config), _source_digest(), jax.__version__, flax.__version__]
    path = _dir / f"{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:40]}.abstract.json"
    if _read_entry(path, declare) is None:
        _write_entry(path, json.dumps(models.abstract_declaration(config)).encode(),
                     "the abstract params")


_local = threading.local()


@contextlib.contextmanager
def _lowering_without_lapack(on: bool):
    """While `on`, lowering an `Exported.call` in this thread does not initialize the CPU
    LAPACK handlers: jax does that for every exported program it lowers for the CPU, and it
    imports scipy.linalg (0.2-0.4 s of a 3 s warm start here). Only for programs whose module
    calls no LAPACK target (see `_runner`, which routes jax's hook through here first);
    other threads and callers are left as they are."""
    before, _local.skip = getattr(_local, "skip", False), on
    try:
        yield
    finally:
        _local.skip = before


def _patch_lapack_init() -> None:
    """Route jax.export's backend initialization through `_local.skip` (once; nothing where
    this jax has no such hook)."""
    from jax._src.export import _export

    original = getattr(_export, "_ensure_backends_initialized", None)
    if original is None or getattr(original, "_jaxinfer", False):
        return

    def ensure(platforms):
        if not getattr(_local, "skip", False):
            original(platforms)

    ensure._jaxinfer = True
    _export._ensure_backends_initialized = ensure
