"""The pmap path: data-parallel generation over local devices with replicated params.

The (bucketed, padded) batch is split into one equal slice per device; `engine.prefill` and
`engine.decode` run under `jax.pmap`, each device on its own rows with its own copy of the
params and its own KV cache. No collectives: every device runs its decode loop until its own
rows finish. `PmapState` shows the stacked per-device state [n, B/n, ...] to the host side
(`jaxinfer.generate.Run`) as one batch [B, ...].
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
def _prefill_fn(devices: tuple, static: tuple):
    f = functools.partial(engine.prefill, **dict(static))
    # params, prompt, positions, sampling, stop_ids, max_new, active
    return jax.pmap(f, in_axes=(None, 0, 0, 0, None, None, 0), devices=list(devices))


@functools.lru_cache(maxsize=32)
def _decode_fn(devices: tuple, static: tuple):
    f = functools.partial(engine.decode, **dict(static))
    return jax.pmap(f, in_axes=(None, 0, None), devices=list(devices), donate_argnums=(1,))


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


def prefill(devices: tuple, params, prompt, positions, sampling, stop_ids, max_new, active,
            **static) -> PmapState:
    """engine.prefill over len(devices) slices of the batch (params already replicated)."""
    n = len(devices)
    fn = _prefill_fn(devices, tuple(sorted(static.items())))
    rows = functools.partial(_split, n=n)
    stacked = fn(params, rows(prompt), rows(positions), jax.tree.map(rows, sampling), stop_ids,
                 max_new, rows(active))
    return PmapState(stacked)


def decode(devices: tuple, params, state: PmapState, limit, **static) -> PmapState:
    """engine.decode on every device until its rows finish or the step limit."""
    fn = _decode_fn(devices, tuple(sorted(static.items())))
    mesh = Mesh(np.array(devices, dtype=object).reshape(-1, 1), ("data", "model"))  # as params
    return PmapState(fn(params, state.stacked, replicate(limit, mesh)))
