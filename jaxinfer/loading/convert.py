"""Hugging Face tensor names and layouts -> the params tree of `models`.

A `TensorSource` is anything with `names() -> set[str]`, `get(name) -> np.ndarray` (PyTorch
layout: Linear weights [out, in]) and `describe(name) -> str` (the file, for errors). Params are
built one leaf at a time: per-layer tensors are stacked into a [L, ...] buffer, checked against
the model's declared shape, and moved to the device before the next leaf is read, so the
weights are never held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxinfer.errors import CheckpointError
from models import GPT2Config, LlamaConfig, ModelConfig, abstract_params


class TensorSource(Protocol):
    def names(self) -> set[str]: ...
    def get(self, name: str) -> np.ndarray: ...
    def describe(self, name: str) -> str: ...


T = "T"  # marker: transpose [out, in] -> [in, out]

LLAMA_LAYER = {
    ("attn", "q"): ("self_attn.q_proj.weight", T), ("attn", "k"): ("self_attn.k_proj.weight", T),
    ("attn", "v"): ("self_attn.v_proj.weight", T), ("attn", "o"): ("self_attn.o_proj.weight", T),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", None),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", None),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", None),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", None),
    ("mlp", "gate"): ("mlp.gate_proj.weight", T), ("mlp", "up"): ("mlp.up_proj.weight", T),
    ("mlp", "down"): ("mlp.down_proj.weight", T),
    ("mlp", "gate_bias"): ("mlp.gate_proj.bias", None),
    ("mlp", "up_bias"): ("mlp.up_proj.bias", None),
    ("mlp", "down_bias"): ("mlp.down_proj.bias", None),
    ("attn_norm",): ("input_layernorm.weight", None),
    ("mlp_norm",): ("post_attention_layernorm.weight", None),
}
LLAMA_TOP = {("embed",): ("model.embed_tokens.weight", None), ("final_norm",): ("model.norm.weight", None),
             ("lm_head",): ("lm_head.weight", T)}

# GPT-2 uses Conv1D modules whose weights are already [in, out].
GPT2_LAYER = {
    ("attn", "qkv"): ("attn.c_attn.weight", None), ("attn", "qkv_bias"): ("attn.c_attn.bias", None),
    ("attn", "o"): ("attn.c_proj.weight", None), ("attn", "o_bias"): ("attn.c_proj.bias", None),
    ("mlp", "fc"): ("mlp.c_fc.weight", None), ("mlp", "fc_bias"): ("mlp.c_fc.bias", None),
    ("mlp", "proj"): ("mlp.c_proj.weight", None), ("mlp", "proj_bias"): ("mlp.c_proj.bias", None),
    ("ln1_scale",): ("ln_1.weight", None), ("ln1_bias",): ("ln_1.bias", None),
    ("ln2_scale",): ("ln_2.weight", None), ("ln2_bias",): ("ln_2.bias", None),
}
GPT2_TOP = {("wte",): ("wte.weight", None), ("wpe",): ("wpe.weight", None),
            ("ln_f_scale",): ("ln_f.weight", None), ("ln_f_bias",): ("ln_f.bias", None)}


def _naming(config: ModelConfig, names: set[str]):
    """(top-level map, per-layer map, layer-name function) for the config's family."""
    if isinstance(config, LlamaConfig):
        return LLAMA_TOP, LLAMA_LAYER, lambda i, n: f"model.layers.{i}.{n}"
    if isinstance(config, GPT2Config):
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        top = {k: (prefix + v, t) for k, (v, t) in GPT2_TOP.items()}
        return top, GPT2_LAYER, lambda i, n: f"{prefix}h.{i}.{n}"
    raise TypeError(type(config).__name__)


def _fetch(src: TensorSource, names: set[str], name: str, transform, shape, dtype):
    """Read one tensor, transposing if asked, and check its shape."""
    if name not in names:
        raise CheckpointError(f"{src.describe(name)}: missing tensor {name!r}")
    arr = src.get(name)
    if transform == T:
        arr = arr.T
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(
            f"{src.describe(name)}: tensor {name!r} has shape {tuple(arr.shape)} "
            f"(after layout conversion), expected {tuple(shape)} from the config")
    return np.asarray(arr, dtype=dtype)


def params_from_source(config: ModelConfig, src: TensorSource, dtype=jnp.float32,
                       progress: bool = True, place: Callable | None = None):
    """Build the params tree of `config` from `src`, one leaf at a time.

    `place(path, np_array) -> jax.Array` puts a leaf on device (default `jax.device_put`);
    the sharding code passes its own. Returns the params tree of arrays in `dtype`.
    """
    names = set(src.names())
    top, per_layer, layer_name = _naming(config, names)
    abstract = abstract_params(config)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    place = place or (lambda path, a: jax.device_put(a))
    np_dtype = np.dtype(dtype)
    out = {}
    for path, leaf in tqdm(flat, desc="load weights", unit="tensor", delay=1.0,
                           disable=not progress):
        keys = tuple(k.key for k in path)
        if keys[0] == "layers":
            name, transform = per_layer[keys[1:]]
            buf = np.empty(leaf.shape, np_dtype)
            for i in range(config.n_layers):
                buf[i] = _fetch(src, names, layer_name(i, name), transform, leaf.shape[1:],
                                np_dtype)
        else:
            name, transform = top[keys]
            buf = _fetch(src, names, name, transform, leaf.shape, np_dtype)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = place(keys, buf)
        del buf
    return out
