"""Checkpoint tensor names and layouts -> the params tree of `models`, one leaf at a time.

One table per family (`NAMES`) gives, for every param path, the Hugging Face tensor name, whether
its layout is transposed (HF Linear weights are [out, in], params are [in, out]) and the GGUF
tensor name. Per-layer entries ("layers/...") name the tensor of one layer; `hf_name` and
`gguf_name` add the layer prefix.

A `TensorSource` is anything with `names() -> set[str]`, `get(name) -> np.ndarray` (HF names and
layout) and `describe(name) -> str` (the file, for errors). `build_params` is the one builder of
a params tree: it asks for each declared leaf in turn, checks its shape against the config and
moves it to the device before the next one is read, so the weights are never held twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from jaxinfer import paths
from jaxinfer.errors import CheckpointError
from models import GPT2Config, LlamaConfig, ModelConfig


class TensorSource(Protocol):
    def names(self) -> set[str]: ...
    def get(self, name: str) -> np.ndarray: ...
    def describe(self, name: str) -> str: ...


class Name(NamedTuple):
    """Where a param lives in checkpoint files (per-layer names without the layer prefix)."""

    hf: str
    transpose: bool = False  # HF [out, in] -> params [in, out]
    gguf: str | None = None  # None: GGUF files of the family do not hold it


NAMES: dict[str, dict[str, Name]] = {
    "llama": {
        "embed": Name("model.embed_tokens.weight", gguf="token_embd.weight"),
        "final_norm": Name("model.norm.weight", gguf="output_norm.weight"),
        "lm_head": Name("lm_head.weight", True, "output.weight"),
        "layers/attn/q": Name("self_attn.q_proj.weight", True, "attn_q.weight"),
        "layers/attn/k": Name("self_attn.k_proj.weight", True, "attn_k.weight"),
        "layers/attn/v": Name("self_attn.v_proj.weight", True, "attn_v.weight"),
        "layers/attn/o": Name("self_attn.o_proj.weight", True, "attn_output.weight"),
        "layers/attn/q_bias": Name("self_attn.q_proj.bias"),
        "layers/attn/k_bias": Name("self_attn.k_proj.bias"),
        "layers/attn/v_bias": Name("self_attn.v_proj.bias"),
        "layers/attn/o_bias": Name("self_attn.o_proj.bias"),
        "layers/mlp/gate": Name("mlp.gate_proj.weight", True, "ffn_gate.weight"),
        "layers/mlp/up": Name("mlp.up_proj.weight", True, "ffn_up.weight"),
        "layers/mlp/down": Name("mlp.down_proj.weight", True, "ffn_down.weight"),
        "layers/mlp/gate_bias": Name("mlp.gate_proj.bias"),
        "layers/mlp/up_bias": Name("mlp.up_proj.bias"),
        "layers/mlp/down_bias": Name("mlp.down_proj.bias"),
        "layers/attn_norm": Name("input_layernorm.weight", gguf="attn_norm.weight"),
        "layers/mlp_norm": Name("post_attention_layernorm.weight", gguf="ffn_norm.weight"),
        "layers/attn/q_norm": Name("self_attn.q_norm.weight", gguf="attn_q_norm.weight"),
        "layers/attn/k_norm": Name("self_attn.k_norm.weight", gguf="attn_k_norm.weight"),
    },
    # GPT-2 uses Conv1D modules whose weights are already [in, out].
    "gpt2": {
        "wte": Name("wte.weight"), "wpe": Name("wpe.weight"),
        "ln_f_scale": Name("ln_f.weight"), "ln_f_bias": Name("ln_f.bias"),
        "layers/attn/qkv": Name("attn.c_attn.weight"),
        "layers/attn/qkv_bias": Name("attn.c_attn.bias"),
        "layers/attn/o": Name("attn.c_proj.weight"), "layers/attn/o_bias": Name("attn.c_proj.bias"),
        "layers/mlp/fc": Name("mlp.c_fc.weight"), "layers/mlp/fc_bias": Name("mlp.c_fc.bias"),
        "layers/mlp/proj": Name("mlp.c_proj.weight"),
        "layers/mlp/proj_bias": Name("mlp.c_proj.bias"),
        "layers/ln1_scale": Name("ln_1.weight"), "layers/ln1_bias": Name("ln_1.bias"),
        "layers/ln2_scale": Name("ln_2.weight"), "layers/ln2_bias": Name("ln_2.bias"),
    },
}
# Gemma 3 (LlamaConfig with post_norms): norms before and after attention and the MLP, so HF's
# post_attention_layernorm is the attention output's norm and the MLP's input norm has a name
# of its own. GGUF names agree with Llama's (ffn_norm is the MLP's input norm in both).
NAMES["gemma3"] = {
    **NAMES["llama"],
    "layers/mlp_norm": Name("pre_feedforward_layernorm.weight", gguf="ffn_norm.weight"),
    "layers/attn_post_norm": Name("post_attention_layernorm.weight",
                                  gguf="post_attention_norm.weight"),
    "layers/mlp_post_norm": Name("post_feedforward_layernorm.weight", gguf="post_ffw_norm.weight"),
}
_LAYER_PREFIX = {"llama": "model.layers.{i}.", "gemma3": "model.layers.{i}.", "gpt2": "h.{i}."}


def table_name(config: ModelConfig) -> str:
    """The key of `NAMES` that names `config`'s checkpoint tensors."""
    if isinstance(config, GPT2Config):
        return "gpt2"
    return "gemma3" if config.post_norms else "llama"


def hf_name(family: str, path: str, layer: int | None = None) -> str:
    """The HF tensor name of param `path` ("layers/..." entries: of layer `layer`), as a
    checkpoint of the family's text model names it (see `_family` for nested checkpoints)."""
    name = NAMES[family][path].hf
    if path.startswith("layers/"):
        name = _LAYER_PREFIX[family].format(i=layer) + name
    return name


def gguf_name(family: str, path: str, layer: int | None = None) -> str | None:
    """The GGUF tensor name of param `path` (of layer `layer`), or None if GGUF lacks it."""
    name = NAMES[family][path].gguf
    if name is None or not path.startswith("layers/"):
        return name
    return f"blk.{layer}.{name}"


def build_params(config: ModelConfig, make_leaf: Callable, where: str, *,
                 progress: bool = False):
    """The params tree of `config`, built leaf by leaf in declaration order.

    make_leaf(path, spec) -> an array or weight object of shape spec.shape (spec: the declared
    jax.ShapeDtypeStruct; stacked layers [L, ...]). Each leaf is checked against the declared
    shape (CheckpointError naming `where` and the path) and moved to the device before the
    next one is made.
    """
    items = list(paths.iter_leaves(models.abstract_params(config)))
    out = []
    for path, spec in tqdm(items, desc="load weights", unit="tensor", delay=1.0,
                           disable=not progress):
        leaf = make_leaf(path, spec)
        if tuple(leaf.shape) != tuple(spec.shape):
            raise CheckpointError(f"{where}: {path} has shape {tuple(leaf.shape)}, expected "
                                  f"{tuple(spec.shape)} from the config")
        out.append((path, jax.tree.map(jax.device_put, leaf)))
        del leaf
    return paths.nest(out)


# Where a multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its language model's
# "model.*" tensors: transformers 5 layout first, then the older one of the published files.
_NESTED = ("model.language_model.", "language_model.model.")


def _family(config: ModelConfig, names: set[str]) -> tuple[str, Callable[[str], str]]:
    """(family, how the checkpoint spells a table's HF name) of the config's checkpoint: GPT-2
    checkpoints may nest everything in "transformer.", multimodal ones their language model."""
    if isinstance(config, GPT2Config):
        prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
        return "gpt2", lambda name: prefix + name
    if not isinstance(config, LlamaConfig):
        raise TypeError(type(config).__name__)
    family = table_name(config)
    nested = next((n for n in _NESTED if hf_name(family, "embed") not in names
                   and n + "embed_tokens.weight" in names), None)
    if nested is None:
        return family, lambda name: name

    def spell(name: str) -> str:
        if name.startswith("model."):
            return nested + name.removeprefix("model.")
        return name if nested.startswith("model.") else "language_model." + name  # lm_head

    return family, spell


def _fetch(src: TensorSource, names: set[str], name: str, transpose: bool, shape, dtype):
    """Read one tensor, transposing if asked, and check its shape."""
    if name not in names:
        raise CheckpointError(f"{src.describe(name)}: missing tensor {name!r}")
    arr = src.get(name)
    if transpose:
        arr = arr.T
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(
            f"{src.describe(name)}: tensor {name!r} has shape {tuple(arr.shape)} "
            f"(after layout conversion), expected {tuple(shape)} from the config")
    return np.asarray(arr, dtype=dtype)


def source_leaf(config: ModelConfig, src: TensorSource, dtype=jnp.float32) -> Callable:
    """make_leaf (see `build_params`) reading float arrays from `src` in HF names/layout:
    per-layer tensors are stacked into one [L, ...] buffer."""
    names = set(src.names())
    family, spell = _family(config, names)
    np_dtype = np.dtype(dtype)

    def make_leaf(path, spec):
        transpose = NAMES[family][path].transpose
        if not paths.is_stacked(path):
            return _fetch(src, names, spell(hf_name(family, path)), transpose,
                          spec.shape, np_dtype)
        buf = np.empty(spec.shape, np_dtype)
        for i in range(config.n_layers):
            buf[i] = _fetch(src, names, spell(hf_name(family, path, i)), transpose,
                            spec.shape[1:], np_dtype)
        return buf

    return make_leaf
