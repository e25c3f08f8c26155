"""Logical-axis sharding: one rules table maps the models' logical axis names to mesh axes.

Mesh axes are `data` (batch rows) and `model` (tensor parallelism, and expert parallelism: a
MoE layer's `experts` axis goes on `model`, so each device holds and runs whole experts while
the attention heads split over the same devices). Every array that is
sharded — a weight, a KV cache buffer, a batch input — is described by a tuple of logical axis
names, one per dimension, and `spec_for` turns that tuple into a `PartitionSpec` on a mesh:

  * a logical axis maps to the mesh axis given by `RULES` (or to nothing: replicated);
  * two dimensions of one array may not map to the same mesh axis (an InputError: a rules
    table that does this is wrong for that array);
  * a dimension whose size does not divide the mesh axis size is *replicated* instead, and a
    note is added to the report (`notes`); with `strict=True` it is an InputError naming the
    array, the dimension and the sizes. For the flattened head dimensions of projection
    weights (`heads`, `kv_heads`, `qkv`: size = number of heads x head_dim) divisibility is
    checked in whole heads, so a mesh never splits a head between devices (SmolLM2's 9 query
    heads and 3 KV heads shard over model=3, not model=2).

Quantized / sparse weights (any params leaf that is not an array but a pytree of arrays) are
sharded child by child, generically: each child array's dimensions are aligned with the float
weight's dimensions by size, from the last dimension backwards (a child dimension matches the
nearest float dimension at or before the previous match that has the same size). A matched
child dimension takes the float dimension's mesh axis (when it divides, as above); unmatched
dimensions (packed nibbles, groups, block counts ...) are replicated. So an int8 weight
[L, D, F] takes the float weight's spec, its per-channel scales [L, F] or [L, 1, F] shard with
it on F, and metadata that matches nothing is replicated. Static (aux-data) fields are not
arrays and are untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import models
from jaxinfer import paths
from jaxinfer.errors import InputError

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# The one rules table: logical axis -> mesh axis (None = replicated).
RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vocab": MODEL,
    "qkv": MODEL,
    "experts": MODEL,  # expert parallelism
    "expert_mlp": None,  # an expert's hidden width: whole experts per device
    "embed": None,
    "layers": None,
    "positions": None,
    "head_dim": None,
    "sequence": None,
}


def make_mesh(data: int = 1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, model) mesh over the first data*model devices (all processes' devices,
    ordered by process then id, so the model axis stays inside a host when it can).

    InputError when the mesh needs more devices than exist.
    """
    for name, size in ((DATA, data), (MODEL, model)):
        if not isinstance(size, int | np.integer) or size < 1:
            raise InputError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    devs = sorted(jax.devices() if devices is None else devices,
                  key=lambda d: (d.process_index, d.id))
    need = data * model
    if need > len(devs):
        raise InputError(f"mesh data={data},model={model} needs {need} devices, but only "
                         f"{len(devs)} are available ({_device_summary(devs)})")
    grid = np.array(devs[:need], dtype=object).reshape(data, model)
    auto = jax.sharding.AxisType.Auto
    return Mesh(grid, MESH_AXES, axis_types=(auto, auto))


def _device_summary(devs) -> str:
    kinds = sorted({d.platform for d in devs})
    procs = len({d.process_index for d in devs})
    return f"{'/'.join(kinds)} devices over {procs} process{'es' if procs != 1 else ''}"


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis: size} of a mesh (every axis, in order)."""
    return {name: int(size) for name, size in mesh.shape.items()}


@dataclasses.dataclass
class Report:
    """Dimensions that could not be sharded as the rules asked and were replicated instead."""

    replicated: dict[tuple[str, int, str, int], list[str]] = dataclasses.field(default_factory=dict)

    def add(self, logical: str, units: int, axis: str, axis_size: int, where: str) -> None:
        self.replicated.setdefault((logical, units, axis, axis_size), []).append(where)

    def notes(self) -> list[str]:
        out = []
        for (logical, units, axis, size), where in self.replicated.items():
            shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
            out.append(f"{logical!r} = {units} does not divide over mesh axis {axis!r} = {size}: "
                       f"replicated in {shown}")
        return out


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *,
             rules: Mapping[str, str | None] = RULES, units: Mapping[str, int] | None = None,
             strict: bool = False, where: str = "array", report: Report | None = None
             ) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes` and `shape` on `mesh`.

    units: size of one unit of a logical axis (e.g. head_dim for flattened `heads`): a
    dimension is sharded only when its number of units divides the mesh axis size.
    Unknown logical names and mesh axes missing from `mesh` (or of size 1) replicate.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{where}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    units = units or {}
    sizes = mesh_shape(mesh)
    used: dict[str, str] = {}
    out: list[str | None] = []
    for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
        target = rules.get(name) if name is not None else None
        if target is None or sizes.get(target, 1) == 1:
            out.append(None)
            continue
        if target in used:
            raise InputError(f"{where}: logical axes {used[target]!r} and {name!r} both map to "
                             f"mesh axis {target!r}; one array cannot be split twice over one "
                             "mesh axis (fix the sharding rules)")
        used[target] = name
        unit = units.get(name, 1)
        count = size // unit if size % unit == 0 else size
        n = sizes[target]
        if count % n:
            if strict:
                what = f"{count} heads" if unit > 1 else f"size {size}"
                raise InputError(f"{where}: dimension {dim} ({name!r}, {what}) does not divide "
                                 f"evenly over mesh axis {target!r} of size {n}")
            if report is not None:
                report.add(name, count, target, n, where)
            out.append(None)
            continue
        out.append(target)
    return PartitionSpec(*out)


def weight_units(config) -> dict[str, int]:
    """Unit sizes of flattened weight dimensions: heads / kv_heads / qkv count whole heads."""
    h = config.head_dim
    return {"heads": h, "kv_heads": h, "qkv": h}


def child_spec(child_shape: Sequence[int], float_shape: Sequence[int],
               float_spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Spec of one child array of a structured (quantized / sparse) leaf; see module doc."""
    sizes = mesh_shape(mesh)
    fspec = tuple(float_spec) + (None,) * (len(float_shape) - len(float_spec))
    out: list[str | None] = [None] * len(child_shape)
    j = len(float_shape) - 1
    used = set()
    for i in range(len(child_shape) - 1, -1, -1):
        for k in range(j, -1, -1):
            if child_shape[i] == float_shape[k]:
                target = fspec[k]
                if target is not None and target not in used and child_shape[i] % sizes[target] == 0:
                    out[i] = target
                    used.add(target)
                j = k - 1
                break
    return PartitionSpec(*out)


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def _map_params(fn, params, config, mesh, rules, strict, report):
    """fn(value, NamedSharding) over every array of params (children of structured leaves
    too); other values (Python scalars inside a structured leaf) pass through unchanged."""
    axes = models.logical_axes(config)
    shapes = models.abstract_params(config)
    units = weight_units(config)

    def one(path, ax, shp, leaf):
        where = paths.from_key_path(path)
        spec = spec_for(ax, shp.shape, mesh, rules=rules, units=units, strict=strict,
                        where=where, report=report)
        if _is_array(leaf):
            return fn(leaf, NamedSharding(mesh, spec))

        def child(c):
            if not _is_array(c):
                return c
            return fn(c, NamedSharding(mesh, child_spec(c.shape, shp.shape, spec, mesh)))

        return jax.tree.map(child, leaf)

    return jax.tree_util.tree_map_with_path(one, axes, shapes, params,
                                            is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(params, config, mesh: Mesh, *, rules: Mapping[str, str | None] = RULES,
                    strict: bool = False, report: Report | None = None):
    """A tree of NamedShardings with the structure of `params` (children of structured
    leaves included), from `models.logical_axes(config)` and the rules."""
    return _map_params(lambda x, s: s, params, config, mesh, rules, strict, report)


def place(x, sharding: NamedSharding) -> jax.Array:
    """Put a host or device array onto `sharding`; works when the sharding spans devices of
    other processes too (every process must pass the same value)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, config, mesh: Mesh, *, rules: Mapping[str, str | None] = RULES,
                 strict: bool = False, report: Report | None = None):
    """Params placed on `mesh` by the rules (structured leaves child by child).

    strict: a dimension that does not divide its mesh axis is an InputError instead of being
    replicated (and noted in `report`).
    """
    shardings = param_shardings(params, config, mesh, rules=rules, strict=strict, report=report)
    return jax.tree.map(lambda x, s: place(x, s) if isinstance(s, NamedSharding) else x,
                        params, shardings)


def field_axes(struct_type) -> dict[str, tuple]:
    """{field: (logical axes, host)} of a pytree struct type (`models.cache.logical` fields).

    Fields holding a struct whose own fields carry the axes (metadata "struct", e.g.
    DecodeState.cache) are left out. TypeError for a field that declares neither, so a new
    field cannot silently go unsharded.
    """
    out = {}
    for f in dataclasses.fields(struct_type):
        if not f.metadata.get("pytree_node", True) or f.metadata.get("struct"):
            continue
        if "axes" not in f.metadata:
            raise TypeError(f"{struct_type.__name__}.{f.name} declares no logical axes "
                            "(use models.cache.logical)")
        out[f.name] = (tuple(f.metadata["axes"]), bool(f.metadata.get("host")))
    return out


def cache_specs(config, mesh: Mesh, *, rules: Mapping[str, str | None] = RULES,
                strict: bool = False, report: Report | None = None) -> dict[str, PartitionSpec]:
    """Specs of the KV cache fields (from the axes KVCache declares): k [L, B, K, H, S],
    v [L, B, K, S, H], scales [L, B, K, S] (B on data, K on model when the KV head count
    divides), pos [B, S], end [B]. The batch is padded to a multiple of `data`."""
    sizes = {"layers": config.n_layers, "batch": mesh_shape(mesh).get(DATA, 1),
             "kv_heads": config.n_kv_heads, "sequence": 1, "head_dim": config.head_dim}
    return {name: spec_for(axes, [sizes[a] for a in axes], mesh, rules=rules, strict=strict,
                           where=f"kv_cache/{name}", report=report)
            for name, (axes, _) in field_axes(models.KVCache).items()}


def batch_spec(ndim: int, mesh: Mesh) -> PartitionSpec:
    """Batch inputs [B, ...]: rows on `data`, the rest replicated."""
    if mesh_shape(mesh).get(DATA, 1) == 1:
        return PartitionSpec()
    return PartitionSpec(DATA, *([None] * (ndim - 1)))


@dataclasses.dataclass(frozen=True)
class StateSharding:
    """The engine's sharding hook (hashable, a static jit argument): constrains a KVCache or
    a DecodeState, field by field, to the specs of the logical axes each field declares
    (`models.cache.logical`) under the rules, with `jax.lax.with_sharding_constraint`.

    Fields the host reads (host=True: tokens, lengths, flags) are replicated when the mesh
    spans processes, so every process can read them.
    """

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...]
    multi_process: bool

    @classmethod
    def build(cls, config, mesh: Mesh, *, rules: Mapping[str, str | None] = RULES,
              report: Report | None = None) -> StateSharding:
        cache_specs(config, mesh, rules=rules, report=report)  # notes replicated KV heads
        multi = len({d.process_index for d in mesh.devices.flat}) > 1
        return cls(mesh=mesh, rules=tuple(rules.items()), multi_process=multi)

    def sharding(self, x, axes: tuple, host: bool = False) -> NamedSharding:
        """Where array x of a field with logical `axes` lives; a per-layer buffer (fewer
        dims) drops the leading axes, a per-row array of a struct field takes the leading ones."""
        if host and self.multi_process:
            return NamedSharding(self.mesh, PartitionSpec())
        ax = axes[len(axes) - x.ndim:] if axes[:1] == ("layers",) else axes[:x.ndim]
        return NamedSharding(self.mesh, spec_for(ax, x.shape, self.mesh, rules=dict(self.rules)))

    def _c(self, x, axes: tuple, host: bool):
        return jax.lax.with_sharding_constraint(x, self.sharding(x, axes, host))

    def __call__(self, x):
        """x with every array field constrained (struct fields without axes recursively)."""
        axes = field_axes(type(x))
        new = {}
        for f in dataclasses.fields(x):
            value = getattr(x, f.name)
            if f.name in axes and value is not None:
                ax, host = axes[f.name]
                new[f.name] = jax.tree.map(lambda a, ax=ax, host=host: self._c(a, ax, host), value)
            elif f.metadata.get("struct"):
                new[f.name] = self(value)
        return x.replace(**new)


def default_mesh_shape(config, num_devices: int, local_devices: int | None = None
                       ) -> tuple[int, int]:
    """(data, model) chosen from the device count and the model's shapes.

    model = the largest size that divides the query heads, KV heads, MLP width, vocabulary (and experts)
    and divides the devices of one process (tensor parallelism stays inside a host and never
    splits a head); data = num_devices // model (all devices used).
    """
    local = local_devices or num_devices
    dims = (config.n_heads, config.n_kv_heads, config.d_ff, config.vocab_size,
            getattr(config, "n_experts", 0))
    model = max(m for m in range(1, local + 1)
                if local % m == 0 and num_devices % m == 0 and all(d % m == 0 for d in dims))
    return num_devices // model, model
