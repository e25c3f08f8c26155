"""Where start-up time goes: `with phase("tokenizer"): ...` timers, printed as one table.

Off by default (a `phase` then costs one attribute lookup). `enable()` turns it on, as do
`jaxinfer --profile ...` and the environment variable `JAXINFER_PROFILE=1`; `report()` prints the
phases in the order they ended, with their wall-clock seconds, to stderr. Phases may nest: a
nested phase's time is also part of its parent's (the table indents it).

The first row, "imports", is the time from this module's import (`jaxinfer` imports it first) to
`mark_imports_done()`; Python's own start-up before that is not counted. `watch_jax()` adds run
totals of JAX's compile events (tracing, lowering, XLA compile or persistent-cache load, hits and
misses) below the phases.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

_T0 = time.perf_counter()
_enabled = os.environ.get("JAXINFER_PROFILE", "") not in ("", "0")
_records: list[tuple[int, str, float]] = []  # (depth, name, seconds) in the order phases ended
_depth = 0
_WIDTH = 54  # of the name column
_totals: dict[str, list[float]] = {}  # name -> [seconds, count], summed over a whole run
# JAX's monitoring events -> our names (all jitted functions of the run, summed)
_JAX_DURATIONS = {
    "/jax/core/compile/jaxpr_trace_duration": "jax: trace to jaxpr",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax: lower to StableHLO",
    "/jax/core/compile/backend_compile_duration": "jax: XLA compile or cache load",
    "/jax/compilation_cache/cache_retrieval_time_sec": "jax: persistent cache reads",
}
_JAX_EVENTS = {"/jax/compilation_cache/cache_hits": "jax: persistent cache hits",
               "/jax/compilation_cache/cache_misses": "jax: persistent cache misses"}


def enable(on: bool = True) -> None:
    """Turn recording on (or off)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def reset() -> None:
    """Turn recording off and forget everything recorded (tests, repeated runs)."""
    global _depth
    enable(False)
    _records.clear()
    _totals.clear()
    _depth = 0


def mark_imports_done() -> None:
    """Record the "imports" row: seconds since this module was imported."""
    if _enabled:
        _records.append((0, "imports", time.perf_counter() - _T0))


@contextlib.contextmanager
def phase(name: str):
    """Time the block as phase `name` when profiling is on (an exception still records it)."""
    global _depth
    if not _enabled:
        yield
        return
    t = time.perf_counter()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        _records.append((_depth, name, time.perf_counter() - t))


def record(name: str, seconds: float) -> None:
    """Record a top-level phase measured elsewhere (e.g. time to a generator's first item)."""
    if _enabled:
        _records.append((_depth, name, seconds))


def add(name: str, seconds: float = 0.0) -> None:
    """Add `seconds` (and one to the count) to the run total `name` when profiling is on."""
    if not _enabled:
        return
    total = _totals.setdefault(name, [0.0, 0])
    total[0] += seconds
    total[1] += 1


def watch_jax() -> None:
    """Sum JAX's compile-time events (tracing, lowering, XLA compile or persistent-cache load,
    cache hits and misses) into run totals. Imports jax; call it once, when enabled."""
    from jax import monitoring

    def on_duration(event: str, seconds: float, **_) -> None:
        if event in _JAX_DURATIONS:
            add(_JAX_DURATIONS[event], seconds)

    def on_event(event: str, **_) -> None:
        if event in _JAX_EVENTS:
            add(_JAX_EVENTS[event])

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)


def records() -> list[tuple[int, str, float]]:
    """(depth, name, seconds) of every finished phase, in the order they ended."""
    return list(_records)


def table() -> str:
    """The recorded phases as text lines, each parent above its (indented) children."""
    w = _WIDTH
    lines = [f"{'phase':<{w}} {'seconds':>8}"]
    lines += [f"{'  ' * d + n:<{w}} {s:8.3f}" for d, n, s in _parent_first(_records)]
    lines.append(f"{'total since jaxinfer.profile import':<{w}} {time.perf_counter() - _T0:8.3f}")
    if _totals:
        lines.append(f"{'summed over the run':<{w}} {'seconds':>8} {'count':>6}")
        lines += [f"{name:<{w}} {s:8.3f} {n:6d}" for name, (s, n) in _totals.items()]
    return "\n".join(lines)


def _parent_first(recs: list[tuple[int, str, float]]) -> list[tuple[int, str, float]]:
    """Records come in the order phases ended (children first); put each parent first."""
    done: dict[int, list] = {}  # depth -> finished subtrees waiting for their parent
    for depth, name, seconds in recs:
        subtree = [(depth, name, seconds), *done.pop(depth + 1, [])]
        done.setdefault(depth, []).extend(subtree)
    return [row for depth in sorted(done) for row in done[depth]]


def report(file=None) -> None:
    """Print the table to stderr (or `file`) if profiling is on and anything was recorded."""
    if _enabled and _records:
        print("jaxinfer profile (wall-clock seconds):\n" + table(), file=file or sys.stderr,
              flush=True)
