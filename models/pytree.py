"""`dataclass`: a frozen dataclass registered as a pytree whose structure knows its class.

Like `flax.struct.dataclass` (fields marked `flax.struct.field(pytree_node=False)` are static
and go into the tree structure, the others are children; instances get `.replace(**updates)`),
but registered as a custom pytree node rather than through `jax.tree_util.register_dataclass`.
In jax 0.10.2 the structures of two different classes registered that way compare equal when
they have the same number of children and equal static values (`Int8Weight` and `W8A8Weight`,
`NativeWeight` and `NativeEmbedding`), while their hashes differ: a jit cache keyed by the
structure then runs one class's program for the other whenever two entries share a hash
bucket, which is rare and depends on the process. A custom node's structure compares its type.
"""

from __future__ import annotations

import dataclasses

import jax


def dataclass(cls):
    """Make `cls` a frozen dataclass and register it as a pytree (see the module docstring)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
    meta = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten_with_keys(x):
        children = [(k, getattr(x, n)) for k, n in zip(keys, data, strict=True)]
        return children, tuple(getattr(x, n) for n in meta)

    def flatten(x):
        return [getattr(x, n) for n in data], tuple(getattr(x, n) for n in meta)

    def unflatten(aux, children):
        obj = object.__new__(cls)  # no __init__/__post_init__: children may be tracers or None
        for n, v in zip(data, children, strict=True):
            object.__setattr__(obj, n, v)
        for n, v in zip(meta, aux, strict=True):
            object.__setattr__(obj, n, v)
        return obj

    def replace(self, **updates):
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **updates)

    cls.replace = replace
    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
