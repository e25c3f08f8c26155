"""Loading a llama GGUF with its Q8_0 / Q4_0 / Q4_1 tensors kept packed (`GGUFBlockWeight`).

The params tree has the usual paths and logical shapes; weight matrices whose every layer is one
of the packed types become `GGUFBlockWeight` leaves (stacked [L, ...] under "layers"), with
llama.cpp's Q/K row permutation undone on the packed rows. Everything else (norms, F32/F16 and
k-quant tensors) is dequantized to float arrays as `jaxinfer.load` does.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import models
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.convert import LLAMA_LAYER, LLAMA_TOP, T
from jaxinfer.loading.gguf import GGUFSource
from jaxinfer.loading.hf_config import config_from_hf, eos_ids_from_hf
from jaxinfer.model import Model
from jaxinfer.precision import resolve_dtype
from jaxinfer.quant.base import IN_OUT, OUT_IN, stack_leaves
from jaxinfer.quant.gguf_blocks import KINDS, GGUFBlockWeight

# param path (within a layer, or top level) -> GGUF tensor name (blk.{i}. prefix for layers)
GGUF_LAYER = {
    ("attn", "q"): "attn_q.weight", ("attn", "k"): "attn_k.weight",
    ("attn", "v"): "attn_v.weight", ("attn", "o"): "attn_output.weight",
    ("mlp", "gate"): "ffn_gate.weight", ("mlp", "up"): "ffn_up.weight",
    ("mlp", "down"): "ffn_down.weight",
}
GGUF_TOP = {("embed",): "token_embd.weight", ("lm_head",): "output.weight"}


def _packed_leaf(f, names: list[str], layout: str, heads: int | None, dtype: str):
    """A GGUFBlockWeight for the tensors `names` (one per layer, stacked when several)."""
    kinds = {f.tensor_type(n) for n in names}
    if len(kinds) != 1 or next(iter(kinds)) not in KINDS:
        return None
    kind = kinds.pop()
    leaves = []
    for n in names:
        leaf = GGUFBlockWeight.from_raw(f.raw(n), kind, layout=layout, dtype=dtype)
        if heads is not None:
            leaf = leaf.unpermute_qk(heads)
        leaves.append(leaf)
    return stack_leaves(leaves) if len(leaves) > 1 else leaves[0]


def _float_leaf(src: GGUFSource, keys: tuple[str, ...], n_layers: int, np_dtype):
    """A float array built from the Hugging Face view of the file (as `jaxinfer.load` does)."""
    if keys[0] == "layers":
        name, transform = LLAMA_LAYER[keys[1:]]
        parts = [src.get(f"model.layers.{i}.{name}") for i in range(n_layers)]
        parts = [p.T if transform == T else p for p in parts]
        return np.stack(parts).astype(np_dtype)
    name, transform = LLAMA_TOP[keys]
    arr = src.get(name)
    return (arr.T if transform == T else arr).astype(np_dtype)


def params_from_gguf(path: str | os.PathLike[str], dtype=None):
    """(config, params, source) of a llama GGUF with packed block weights kept packed.

    dtype: the float dtype of unpacked leaves and of what packed leaves dequantize to.
    CheckpointError for files `jaxinfer.load` would also refuse.
    """
    src = GGUFSource(path)  # validates metadata and the tensor list
    f = src.file
    config = config_from_hf(src.hf_config, str(f.path))
    dtype = jnp.dtype(resolve_dtype(dtype))
    heads = {"q": config.n_heads, "k": config.n_kv_heads}
    flat = jax.tree_util.tree_flatten_with_path(models.abstract_params(config))[0]
    params: dict = {}
    for path, spec in flat:
        keys = tuple(k.key for k in path)
        leaf = None
        if keys[0] == "layers" and keys[1:] in GGUF_LAYER:
            names = [f"blk.{i}.{GGUF_LAYER[keys[1:]]}" for i in range(config.n_layers)]
            leaf = _packed_leaf(f, names, IN_OUT, heads.get(keys[-1]), dtype.name)
        elif keys in GGUF_TOP:
            layout = OUT_IN if keys == ("embed",) else IN_OUT
            leaf = _packed_leaf(f, [GGUF_TOP[keys]], layout, None, dtype.name)
        if leaf is None:
            leaf = _float_leaf(src, keys, config.n_layers, dtype)
        if tuple(leaf.shape) != tuple(spec.shape):
            raise CheckpointError(f"{f.path}: {'/'.join(keys)} has shape {tuple(leaf.shape)}, "
                                  f"expected {tuple(spec.shape)} from the config")
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.tree.map(jax.device_put, leaf)
    return config, params, src


def load_gguf_packed(path: str | os.PathLike[str], dtype=None) -> Model:
    """Like `jaxinfer.load(gguf_path)` but keeping Q8_0 / Q4_0 / Q4_1 weights packed."""
    from jaxinfer.loading import resolve_source
    from jaxinfer.tokenizer import Tokenizer

    path = resolve_source(path)
    config, params, src = params_from_gguf(path, dtype)
    tokenizer = Tokenizer.from_gguf_metadata(src.file.metadata, str(path))
    eos = eos_ids_from_hf(src.hf_config) or tuple(tokenizer.eos_token_ids)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(path),
                 eos_token_ids=eos)
