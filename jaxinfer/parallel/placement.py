"""`Placement`: where a model runs — a (data, model) mesh with sharded params, or pmap.

    placement = Placement(mesh=(2, 4))        # or Placement() to choose from the model's shapes
    model = placement.apply(model)            # shards the params; model.placement = placement
    jaxinfer.text.generate(model, prompts)    # runs sharded, same tokens as one device
    placement.info()                          # {"mesh": {...}, "num_devices": ..., ...}

`apply` returns a `PlacedModel` (a `jaxinfer.model.Model` carrying the placement), whose
params are NamedSharded arrays; `jaxinfer.generate.Engine` calls the placement's
`init_state` / `admit` / `decode` / `release`, which run the jitted engine with a sharding hook
on the KV cache and decode state (slots over `data`), or pmap it. The slot count is a multiple of
`data`.
A placement on one device (and no pmap) leaves the model untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import engine
from jaxinfer.errors import InputError
from jaxinfer.model import Model
from jaxinfer.parallel import pmap as pmap_path
from jaxinfer.parallel.sharding import (
    DATA,
    MODEL,
    RULES,
    Report,
    StateSharding,
    default_mesh_shape,
    make_mesh,
    mesh_shape,
    param_shardings,
    place,
    shard_params,
)


@dataclasses.dataclass
class PlacedModel(Model):
    """A Model whose params were placed by `placement` (generation goes through it)."""

    placement: Any = None


class Placement:
    """A (data, model) mesh, or pmap over local devices, and what it did to a model.

    mesh: (data, model) sizes, or None to choose from the devices and the model's shapes at
    `apply` (see `sharding.default_mesh_shape`; in a one-process CPU run, one device: virtual
    CPU devices share the host's cores). pmap: data parallelism with `jax.pmap` over
    `data` local devices (all local devices when mesh is None; model must be 1).
    strict: a dimension that does not divide its mesh axis is an InputError (default:
    replicated and noted in `notes`). prints: whether this process prints results (False on
    the secondary processes of a multi-process run, see `cli_support.setup_parallel`).
    """

    def __init__(self, mesh: tuple[int, int] | None = None, *, pmap: bool = False,
                 strict: bool = False, rules: Mapping[str, str | None] = RULES,
                 prints: bool = True):
        self.requested, self.pmap, self.strict, self.rules = mesh, pmap, strict, rules
        self.prints = prints
        self.mesh: Mesh | None = None
        self.hook: StateSharding | None = None
        self.notes: list[str] = []
        self.devices: tuple = ()
        if mesh is not None:
            data, model = mesh
            if pmap:
                if model != 1:
                    raise InputError("--pmap is data parallel only: the mesh must have model=1 "
                                     f"(got model={model}); use --mesh without --pmap for "
                                     "tensor parallelism")
                local = jax.local_device_count()
                if data > local:
                    raise InputError(f"--pmap over data={data} devices, but this process has "
                                     f"only {local} local devices")
            else:
                make_mesh(data, model)  # validates the device count now
        if pmap and jax.process_count() > 1:
            raise InputError("--pmap runs on one process's local devices; for a multi-process "
                             "run use --mesh (sharded) instead")

    # -- resolution -------------------------------------------------------------------------

    def resolve(self, config) -> Placement:
        """Fix the mesh (from the request, or the devices and `config`'s shapes)."""
        if self.mesh is not None:
            return self
        if self.pmap:
            data = self.requested[0] if self.requested else jax.local_device_count()
            self.devices = tuple(jax.local_devices()[:data])
            self.mesh = Mesh(np.array(self.devices, dtype=object).reshape(data, 1), (DATA, MODEL))
            return self
        shape = self.requested
        if self.one_cpu_device:
            # virtual CPU devices share one host's cores and memory: sharding cannot help
            shape = (1, 1)
            if jax.device_count() > 1:
                self.notes.append(f"{jax.device_count()} CPU devices share this host's cores: "
                                  "running on one (pass --mesh or --pmap to shard anyway)")
        elif shape is None:
            shape = default_mesh_shape(config, jax.device_count(), jax.local_device_count())
        self.mesh = make_mesh(*shape)
        self.devices = tuple(self.mesh.devices.flat)
        return self

    @property
    def one_cpu_device(self) -> bool:
        """Whether `resolve` gives one CPU device for any model: no mesh or pmap asked for,
        one process, a CPU backend (virtual CPU devices share the host's cores)."""
        return (self.requested is None and not self.pmap and jax.process_count() == 1
                and jax.devices()[0].platform == "cpu")

    @property
    def shape(self) -> dict[str, int]:
        if self.mesh is None:
            raise RuntimeError("placement not resolved yet: call apply(model) or resolve(config)")
        return mesh_shape(self.mesh)

    @property
    def trivial(self) -> bool:
        """One device and no pmap: nothing to place."""
        return not self.pmap and len(self.devices) == 1

    @property
    def batch_multiple(self) -> int:
        return self.shape[DATA]

    def info(self) -> dict:
        """What ran: {"mesh": {axis: size}, "num_devices", "num_processes", "pmap"}."""
        return {"mesh": self.shape, "num_devices": len(self.devices),
                "num_processes": jax.process_count(), "pmap": self.pmap}

    def describe(self) -> str:
        s = self.shape
        how = "pmap over" if self.pmap else "mesh"
        text = (f"{how} data={s[DATA]},model={s[MODEL]} on {len(self.devices)} of "
                f"{jax.device_count()} devices, {jax.process_count()} process(es)")
        return "\n".join([text] + [f"note: {n}" for n in self.notes])

    def check(self, config) -> Placement:
        """Resolve for `config` and work out the notes (or strict errors) without any params."""
        self.resolve(config)
        if not self.pmap and not self.trivial:
            import models

            report = Report()
            param_shardings(models.abstract_params(config), config, self.mesh, rules=self.rules,
                            strict=self.strict, report=report)
            StateSharding.build(config, self.mesh, rules=self.rules, report=report)
            self.notes = report.notes()
        return self

    # -- placing a model --------------------------------------------------------------------

    def apply(self, model: Model) -> Model:
        """The model with its params placed (a PlacedModel), or `model` itself when trivial."""
        self.resolve(model.config)
        if self.trivial:
            return model
        if self.pmap:
            params = pmap_path.replicate(model.params, self.mesh)
        else:
            report = Report()
            params = shard_params(model.params, model.config, self.mesh, rules=self.rules,
                                  strict=self.strict, report=report)
            self.hook = StateSharding.build(model.config, self.mesh, rules=self.rules,
                                            report=report)
            self.notes = report.notes()
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(Model) if f.init}
        return PlacedModel(**(fields | {"params": params}), placement=self)

    # -- the engine functions used by jaxinfer.generate.Engine ---------------------------------

    def init_state(self, params, **static):
        """engine.init_state with the state placed (or one per device under pmap)."""
        if self.pmap:
            return pmap_path.init_state(self.devices, params, **static)
        return engine.init_state(params, shard=self.hook, **static)

    def admit(self, params, state, slots, *group, **static):
        """engine.admit with the (small, host-built) group inputs replicated, or regrouped per
        device under pmap."""
        if self.pmap:
            return pmap_path.admit(self.devices, params, state, slots, *group, **static)
        return engine.admit(params, state, *self._replicated(slots, *group), shard=self.hook,
                            **static)

    def decode(self, params, state, limit, until_free, **static):
        """engine.decode on the placed state (or pmapped)."""
        if self.pmap:
            return pmap_path.decode(self.devices, params, state, limit, until_free, **static)
        scalar = NamedSharding(self.mesh, PartitionSpec())
        return engine.decode(params, state, place(limit, scalar), place(until_free, scalar),
                             shard=self.hook, **static)

    @property
    def prefix_cache(self) -> bool:
        """Whether the engine may keep prompt prefixes (a mesh; not pmap's per-device states)."""
        return not self.pmap

    def save_prefix(self, state, slot: int, length: int):
        """engine.save_prefix on the placed state (the KV stays sharded as the state is)."""
        (slot,) = self._replicated(np.int32(slot))
        return engine.save_prefix(state, slot, length=length)

    def load_prefix(self, state, slot: int, kv, used: int, seen: np.ndarray):
        """engine.load_prefix with the small host inputs replicated."""
        slot, used, seen = self._replicated(np.int32(slot), np.int32(used), seen)
        return engine.load_prefix(state, slot, kv, used, seen, shard=self.hook)

    def release(self, state, slots):
        """engine.release (under pmap: the done flags set from the host)."""
        if self.pmap:
            done = np.array(state.done)
            done[slots] = True
            return state.replace(done=done)
        (slots,) = self._replicated(np.asarray(slots, np.int32))
        return engine.release(state, slots, shard=self.hook)

    def _replicated(self, *host) -> tuple:
        """Small host inputs (arrays, or pytrees of them) replicated over the mesh."""
        rep = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda a: place(np.asarray(a), rep), host)


def place_model(model: Model, mesh: tuple[int, int] | None = None, *, pmap: bool = False,
                strict: bool = False) -> Model:
    """Shortcut: `Placement(mesh, pmap=pmap, strict=strict).apply(model)`."""
    return Placement(mesh, pmap=pmap, strict=strict).apply(model)
