"""The pmap path: data-parallel generation over local devices with replicated params.

The slots are split into one equal share per device; `engine.init_state`, `engine.admit` and
`engine.decode` run under `jax.pmap`, each device on its own slots with its own copy of the
params and its own KV cache. No collectives: every device runs its decode loop until its own
rows finish. `PmapState` shows the stacked per-device state [n, B/n, ...] to the host side
(`jaxinfer.generate.Engine`) as one batch [B, ...]: global slot s is slot s % (B/n) of
device s // (B/n).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import engine
from jaxinfer.parallel.sharding import field_axes


def replicate(params, mesh: Mesh):
    """Params copied onto every device of `mesh` (arrays only; other values unchanged)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array | np.ndarray) else x,
        params)


@functools.lru_cache(maxsize=32)
def _init_fn(devices: tuple, static: tuple):
    def f(_, params):
        return engine.init_state(params, **dict(static))

    return jax.pmap(f, in_axes=(0, None), devices=list(devices))


@functools.lru_cache(maxsize=32)
def _admit_fn(devices: tuple, static: tuple):
    f = functools.partial(engine.admit, **dict(static))
    # params, state, slots, tokens, positions, first, last, sampling, stop_ids, max_new
    return jax.pmap(f, in_axes=(None,) + (0,) * 9, devices=list(devices), donate_argnums=(1,))


@functools.lru_cache(maxsize=32)
def _decode_fn(devices: tuple, static: tuple):
    f = functools.partial(engine.decode, **dict(static))
    return jax.pmap(f, in_axes=(None, 0, None, None), devices=list(devices), donate_argnums=(1,))


def _split(x, n: int):
    return jnp.reshape(x, (n, x.shape[0] // n) + tuple(x.shape[1:]))


def _merge(x):
    return jnp.reshape(x, (x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))


class PmapState:
    """A stacked per-device DecodeState seen as one batch by the host side of generation.

    Per-row fields (first logical axis "batch", see DecodeState) read as one [B, ...] batch;
    the others are equal on every device, except `step`: devices stop stepping once their rows
    finish, so the furthest one counts (the maximum over devices is read).
    """

    def __init__(self, stacked):
        self.stacked = stacked

    @property
    def n(self) -> int:
        return self.stacked.length.shape[0]

    def __getattr__(self, name: str):
        axes = field_axes(engine.DecodeState).get(name)
        if axes is None:
            raise AttributeError(name)
        value = getattr(self.stacked, name)
        if axes[0][:1] == ("batch",):
            return jax.tree.map(_merge, value)
        return jax.tree.map(lambda a: jnp.max(a, axis=0), value)

    def replace(self, **fields) -> PmapState:
        """Replace per-row fields given as [B, ...] arrays (e.g. `done` set from the host)."""
        return PmapState(self.stacked.replace(**{k: _split(jnp.asarray(v), self.n)
                                                 for k, v in fields.items()}))


def init_state(devices: tuple, params, **static) -> PmapState:
    """engine.init_state on every device: static["slots"] slots split evenly over them."""
    n = len(devices)
    static = dict(static, slots=static["slots"] // n)
    fn = _init_fn(devices, tuple(sorted(static.items())))
    return PmapState(fn(jnp.arange(n), params))


def admit(devices: tuple, params, state: PmapState, slots, *group, **static) -> PmapState:
    """engine.admit with the group [G, ...] (global slot indices) regrouped per device:
    [n, G', ...] with local slot indices (filler rows out of range)."""
    n = len(devices)
    local = state.stacked.length.shape[1]
    slots = np.asarray(slots)
    mine = [np.flatnonzero(slots // local == d) for d in range(n)]
    g = max(1, 1 << (max(len(m) for m in mine) - 1).bit_length()) if any(len(m) for m in mine) \
        else 1

    def regroup(a, filler):
        a = np.asarray(a)
        out = np.broadcast_to(np.asarray(filler, a.dtype), (n, g) + a.shape[1:]).copy()
        for d, rows in enumerate(mine):
            out[d, :len(rows)] = a[rows]
        return out

    local_slots = regroup(slots % local, local)
    for d, rows in enumerate(mine):
        local_slots[d, len(rows):] = local
    fillers = (0, -1, True, False)  # tokens, positions, first, last
    parts = [regroup(a, f) for a, f in zip(group[:4], fillers, strict=True)]
    sampling = jax.tree.map(lambda a: regroup(a, 0), group[4])
    rest = [regroup(group[5], -1), regroup(group[6], 1)]  # stop_ids, max_new
    fn = _admit_fn(devices, tuple(sorted(static.items())))
    return PmapState(fn(params, state.stacked, local_slots, *parts, sampling, *rest))


def decode(devices: tuple, params, state: PmapState, limit, until_free, **static) -> PmapState:
    """engine.decode on every device until its rows finish or the step limit (until_free:
    each device until one of its own slots frees)."""
    fn = _decode_fn(devices, tuple(sorted(static.items())))
    mesh = Mesh(np.array(devices, dtype=object).reshape(-1, 1), ("data", "model"))  # as params
    return PmapState(fn(params, state.stacked, replicate(limit, mesh),
                        replicate(until_free, mesh)))
