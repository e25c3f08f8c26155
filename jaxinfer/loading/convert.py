"""Checkpoint tensor names and layouts -> the params tree of `models`, one leaf at a time.

One table per family (`NAMES`) gives, for every param path, the Hugging Face tensor name, whether
its layout is transposed (HF Linear weights are [out, in], params are [in, out]) and the GGUF
tensor name. Per-layer entries ("layers/...") name the tensor of one layer; `hf_name` and
`gguf_name` add the layer prefix. Two more shapes of checkpoint tensor are named the same way:
  * fused projections (Phi-3's qkv_proj and gate_up_proj): several params name one HF tensor
    and `Name.fused` lists them in the order the tensor concatenates their outputs; each takes
    its own columns, split off when it is loaded (the models only know q, k, v, gate, up);
  * experts (Mixtral, Qwen3-MoE): a name with "{e}" is one tensor per expert, stacked on the
    param's experts axis [E, ...] (within a layer: [L, E, ...] stacked).

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

    hf: str  # with "{e}": one tensor per expert
    transpose: bool = False  # HF [out, in] -> params [in, out]
    gguf: str | None = None  # None: GGUF files of the family do not hold it
    fused: tuple[str, ...] = ()  # params whose outputs the HF tensor concatenates, in order


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
# Phi-3: q, k, v in one qkv_proj [(N + 2K) * H, D] and gate, up in one gate_up_proj [2F, D].
_QKV = ("layers/attn/q", "layers/attn/k", "layers/attn/v")
_GATE_UP = ("layers/mlp/gate", "layers/mlp/up")
NAMES["phi3"] = {
    **NAMES["llama"],
    **{p: Name("self_attn.qkv_proj.weight", True, fused=_QKV) for p in _QKV},
    **{p: Name("mlp.gate_up_proj.weight", True, fused=_GATE_UP) for p in _GATE_UP},
}
# Mixture of experts: the router (HF [E, D]) and one gate/up/down per expert, as the published
# checkpoints and transformers' save_pretrained write them.
NAMES["mixtral"] = {
    **NAMES["llama"],
    "layers/moe/router": Name("block_sparse_moe.gate.weight", True),
    "layers/moe/gate": Name("block_sparse_moe.experts.{e}.w1.weight", True),
    "layers/moe/up": Name("block_sparse_moe.experts.{e}.w3.weight", True),
    "layers/moe/down": Name("block_sparse_moe.experts.{e}.w2.weight", True),
}
NAMES["qwen3_moe"] = {
    **NAMES["llama"],
    "layers/moe/router": Name("mlp.gate.weight", True),
    "layers/moe/gate": Name("mlp.experts.{e}.gate_proj.weight", True),
    "layers/moe/up": Name("mlp.experts.{e}.up_proj.weight", True),
    "layers/moe/down": Name("mlp.experts.{e}.down_proj.weight", True),
}
_LAYER_PREFIX = {"gpt2": "h.{i}."} | {f: "model.layers.{i}." for f in (
    "llama", "gemma3", "phi3", "mixtral", "qwen3_moe")}


def table_name(config: ModelConfig, names: set[str] | None = None) -> str:
    """The key of `NAMES` that names `config`'s checkpoint tensors; `names` (the checkpoint's
    tensor names) tells apart tables of one config: Phi-3's fused projections from Llama's,
    Mixtral's MoE names from Qwen3-MoE's."""
    if isinstance(config, GPT2Config):
        return "gpt2"
    if config.post_norms:
        return "gemma3"
    names = names or set()
    if config.n_experts:
        return "mixtral" if any(".block_sparse_moe." in n for n in names) else "qwen3_moe"
    return "phi3" if any(n.endswith(".self_attn.qkv_proj.weight") for n in names) else "llama"


def hf_name(family: str, path: str, layer: int | None = None, expert: int | None = None) -> str:
    """The HF tensor name of param `path` ("layers/..." entries: of layer `layer`; expert
    entries: of expert `expert`), as a checkpoint of the family's text model names it (see
    `_family` for nested checkpoints)."""
    name = NAMES[family][path].hf
    if expert is not None:
        name = name.format(e=expert)
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
    family = table_name(config, names)
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
    per-layer tensors are stacked into one [L, ...] buffer, per-expert ones into [.., E, ...],
    and a param of a fused HF tensor takes its own columns of it."""
    names = set(src.names())
    family, spell = _family(config, names)
    np_dtype = np.dtype(dtype)
    abstract = models.abstract_params(config)

    def read(path, shape, layer=None):
        """One layer's (or a top-level) param of shape `shape` (without L)."""
        entry = NAMES[family][path]
        if "{e}" in entry.hf:
            buf = np.empty(shape, np_dtype)
            for e in range(shape[0]):
                buf[e] = _fetch(src, names, spell(hf_name(family, path, layer, e)),
                                entry.transpose, shape[1:], np_dtype)
            return buf
        if not entry.fused:
            return _fetch(src, names, spell(hf_name(family, path, layer)), entry.transpose,
                          shape, np_dtype)
        widths = [paths.get(abstract, p).shape[-1] for p in entry.fused]  # [in, out] params
        start = sum(widths[:entry.fused.index(path)])
        whole = _fetch(src, names, spell(hf_name(family, path, layer)), entry.transpose,
                       (*shape[:-1], sum(widths)), np_dtype)
        return np.ascontiguousarray(whole[..., start:start + shape[-1]])

    def make_leaf(path, spec):
        if not paths.is_stacked(path):
            return read(path, spec.shape)
        buf = np.empty(spec.shape, np_dtype)
        for i in range(config.n_layers):
            buf[i] = read(path, spec.shape[1:], i)
        return buf

    return make_leaf
