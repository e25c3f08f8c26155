"""Paths into a params tree: the one vocabulary every transform, loader and placement uses.

A params tree is nested dicts whose "layers" entry is either a dict of stacked [L, ...] leaves or
a tuple of L per-layer dicts (`models.unstack_layers`). Anything that is not a dict, tuple or
list is a leaf: arrays, and weight objects (quantized, sparse, native) with their own children.

A path joins the keys with "/" and tuple indices as decimals:
  "embed", "final_norm", "layers/attn/q" (stacked), "layers/3/attn/q" (layer 3, per-layer).

What a leaf is comes from the logical axes the models declare for it (`models.declared_axes`), not
from its name: lookup tables are the matrices whose rows are gathered (first axis "vocab" or
"positions"), vocabulary matrices are those with a "vocab" axis (embeddings, LM heads), and a
leaf with an "experts" axis before its last two is a stack of matrices, one per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import models

_CONTAINERS = (dict, tuple, list)


def is_leaf(x) -> bool:
    """True for everything a params tree holds that is not a dict, tuple or list."""
    return not isinstance(x, _CONTAINERS)


def _items(node):
    if isinstance(node, Mapping):
        return node.items()
    return enumerate(node)


def iter_leaves(tree, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, leaf) for every leaf of `tree`, dict keys in order, tuple items by index."""
    for key, value in _items(tree):
        path = f"{prefix}/{key}" if prefix else str(key)
        if is_leaf(value):
            yield path, value
        else:
            yield from iter_leaves(value, path)


def map_leaves(fn: Callable[[str, object], object], tree, prefix: str = ""):
    """A new tree of the same structure with fn(path, leaf) at every leaf."""
    def one(key, value):
        path = f"{prefix}/{key}" if prefix else str(key)
        return fn(path, value) if is_leaf(value) else map_leaves(fn, value, path)

    if isinstance(tree, Mapping):
        return {k: one(k, v) for k, v in tree.items()}
    return type(tree)(one(i, v) for i, v in enumerate(tree))


def nest(items) -> dict:
    """A nested-dict tree from (path, leaf) pairs (the inverse of `iter_leaves` on dicts)."""
    out: dict = {}
    for path, leaf in items:
        *parents, last = path.split("/")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = leaf
    return out


def from_key_path(key_path) -> str:
    """A jax key path (DictKey / SequenceKey / GetAttrKey entries) -> "a/0/b"."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _key(node, part: str):
    return part if isinstance(node, Mapping) else int(part)


def get(tree, path: str):
    """The leaf (or subtree) of `tree` at `path`."""
    for part in path.split("/"):
        tree = tree[_key(tree, part)]
    return tree


def replace(tree, path: str, value):
    """A copy of `tree` with the entry at `path` replaced (everything else shared)."""
    head, _, rest = path.partition("/")
    k = _key(tree, head)
    new = replace(tree[k], rest, value) if rest else value
    if isinstance(tree, Mapping):
        return {**tree, k: new}
    items = list(tree)
    items[k] = new
    return type(tree)(items)


def split_layer(path: str) -> tuple[int | None, str]:
    """(layer index or None, the path without it): "layers/3/attn/q" -> (3, "layers/attn/q")."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), "/".join(parts[:1] + parts[2:])
    return None, path


def is_stacked(path: str) -> bool:
    """A leaf under "layers" with no layer index: it carries a leading [L] axis."""
    return path.split("/", 1)[0] == "layers" and split_layer(path)[0] is None


def axes(path: str, config=None) -> tuple[str, ...] | None:
    """The logical axes the models declare for the weight at `path`, one per dimension of a
    single layer's leaf (no "layers" axis); None for a path no model declares. config: the
    model's config, when known (cheaper, see `models.declared_axes`)."""
    return models.declared_axes(split_layer(path)[1], config)


def matrix_lead(path: str) -> int:
    """How many leading axes the leaf at `path` has before its 2-D matrix (for a matrix): the
    stacked "layers" axis, and the "experts" axis of a MoE layer's experts (one matrix each)."""
    ax = axes(path) or ()
    return int(is_stacked(path)) + sum(a == "experts" for a in ax[:-2])


def is_lookup_table(path: str, config=None) -> bool:
    """A [rows, dim] table whose rows are gathered: token and position embeddings. config:
    as `axes` takes it."""
    ax = axes(path, config)
    return bool(ax) and len(ax) == 2 and ax[0] in ("vocab", "positions")


def is_vocab_matrix(path: str) -> bool:
    """A matrix with a vocabulary axis: the token embedding or the LM head."""
    ax = axes(path)
    return bool(ax) and len(ax) == 2 and "vocab" in ax
