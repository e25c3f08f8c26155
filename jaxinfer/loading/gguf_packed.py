"""GGUF Q8_0 / Q4_0 / Q4_1 tensors kept packed (`GGUFBlockWeight` leaves) instead of dequantized.

The params tree keeps its usual paths and logical shapes: a weight matrix whose every layer is
one of the packed types becomes a `GGUFBlockWeight` leaf (stacked [L, ...] under "layers"), with
llama.cpp's Q/K row permutation undone on the packed rows. Everything else (norms, F32/F16 and
k-quant tensors) is dequantized to a float array exactly as a plain load does (`source_leaf`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jaxinfer import paths
from jaxinfer.loading.convert import gguf_name, source_leaf
from jaxinfer.loading.gguf import GGUFSource, names_table
from jaxinfer.quant.base import IN_OUT, OUT_IN, stack_leaves
from jaxinfer.quant.gguf_blocks import BLOCK, KINDS, GGUFBlockWeight


def _packed(f, names: list[str], layout: str, heads: int | None, dtype: str, kept=None):
    """A GGUFBlockWeight for the tensors `names` (one per layer, stacked when several), or
    None unless all of them have one packed type. kept: its children as an earlier load made
    them ({child: array}, see `children`), used when they fit."""
    kinds = {f.tensor_type(n) for n in names}
    if len(kinds) != 1 or next(iter(kinds)) not in KINDS:
        return None
    kind = kinds.pop()
    if kept is not None:
        leaf = _from_kept(kept, kind, layout, dtype, (len(names),) if len(names) > 1 else (),
                          f.tensor_shape(names[0]))
        if leaf is not None:
            return leaf
    leaves = []
    for n in names:
        leaf = GGUFBlockWeight.from_raw(f.raw(n), kind, layout=layout, dtype=dtype)
        if heads is not None:
            leaf = leaf.unpermute_qk(heads)
        leaves.append(leaf)
        f.release(n)  # copied: the mapped pages need not stay resident
    return stack_leaves(leaves) if len(leaves) > 1 else leaves[0]


def _from_kept(kept: dict, kind: str, layout: str, dtype: str, lead: tuple, rows_in: tuple):
    """The GGUFBlockWeight of children kept earlier, or None unless they are those of a
    `kind` tensor of numpy shape rows_in (out, in) with stack axes `lead`."""
    leaf = GGUFBlockWeight(qs=kept.get("qs"), d=kept.get("d"), m=kept.get("m"), kind=kind,
                           layout=layout, dtype=dtype)
    if leaf.qs is None or leaf.d is None or tuple(leaf.d.shape) != (
            *lead, rows_in[0], rows_in[1] // BLOCK):
        return None
    try:
        leaf.validate()
    except ValueError:
        return None
    return leaf


def children(params) -> dict:
    """{name: array} of a packed load's params, as `packed_leaf(kept=)` takes them back: a
    GGUFBlockWeight's children under path + ".qs" / ".d" / ".m", other leaves under their
    path."""
    out = {}
    for path, leaf in paths.iter_leaves(params):
        if isinstance(leaf, GGUFBlockWeight):
            out.update({f"{path}.{c}": a for c, a in leaf.children().items() if a is not None})
        else:
            out[path] = leaf
    return out


def packed_leaf(config, src: GGUFSource, dtype, kept=None) -> Callable:
    """make_leaf (see `convert.build_params`) keeping packed matrices packed; dtype is what
    the other leaves are, and what packed ones dequantize to. kept: a checked
    `SafetensorsFile` of an earlier load's `children`, whose arrays are used where they fit
    (memory maps: nothing is converted or copied)."""
    float_leaf = source_leaf(config, src, dtype)
    dtype_name = jnp.dtype(dtype).name
    family = names_table(src.hf_config)
    # llama.cpp permutes a llama's q and k rows (not Gemma's: it rotates those in halves)
    heads = ({"layers/attn/q": config.n_heads, "layers/attn/k": config.n_kv_heads}
             if family == "llama" else {})

    names_kept = set() if kept is None else set(kept.names())

    def make_leaf(path, spec):
        stacked = paths.is_stacked(path)
        names = ([gguf_name(family, path, i) for i in range(config.n_layers)] if stacked
                 else [gguf_name(family, path)])
        leaf = None
        if spec.ndim == (3 if stacked else 2) and None not in names:
            layout = OUT_IN if paths.is_lookup_table(path, config) else IN_OUT
            mine = {c: kept.get(f"{path}.{c}") for c in ("qs", "d", "m")
                    if f"{path}.{c}" in names_kept} or None
            leaf = _packed(src.file, names, layout, heads.get(path), dtype_name, mine)
        elif path in names_kept:
            known = kept.get(path)
            if tuple(known.shape) == tuple(spec.shape) and known.dtype == jnp.dtype(dtype):
                return known
        return float_leaf(path, spec) if leaf is None else leaf

    return make_leaf
