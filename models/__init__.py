"""Flax model definitions, one per family, and the pure forward function over them.

Shape glossary (einsum letters and docstrings):
  B batch rows (slots)      T tokens in this call     S cache slots per row
  L layers                  D model width             F MLP hidden width
  N query heads             K key/value heads         H head dim
  G query heads per KV head (N // K)                  V vocabulary size
  E experts of a MoE layer  k experts per token       N tokens of a call, flattened (B*T)

Logical axis names on parameters (mapped to mesh axes by the runtime's sharding rules):
  layers, vocab, embed, heads, kv_heads, mlp, qkv, positions, head_dim (q/k norms),
  experts, expert_mlp (a MoE layer's stacked experts and their hidden width).

Per-layer API (calibration, GPTQ, pruning run the model one layer at a time):
  embed(config, params, tokens, positions) -> x [B, T, D]
  apply_layer(config, layer_params, x, positions, layer) -> x [B, T, D]   (no cache)
  head(config, params, x) -> float32 logits [B, T, V]
compose to `forward` without a cache; `input_sites(config)` names the inputs of each layer's
projections (`router(config)`: the MoE router, which picks the tokens each expert sees).

This package imports only jax, flax and numpy: never the runtime (`jaxinfer`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import gpt2, llama
from models.cache import KVCache, init_cache
from models.config import GPT2Config, LlamaConfig, ModelConfig, RopeScaling
from models.gpt2 import GPT2
from models.llama import Llama

__all__ = [
    "GPT2Config", "KVCache", "LlamaConfig", "ModelConfig", "RopeScaling", "abstract_declaration",
    "abstract_params", "declare_abstract",
    "apply_layer", "declared_axes", "embed", "forward", "head", "init_cache", "init_params", "input_sites",
    "logical_axes", "module_for", "router", "tied_table", "unstack_layers", "weight_axes",
]

_FAMILIES = {LlamaConfig: llama, GPT2Config: gpt2}


def module_for(config: ModelConfig, scan_unroll: int = 1, unstacked: bool = False) -> nn.Module:
    """The Flax module of `config`'s family."""
    if isinstance(config, LlamaConfig):
        return Llama(config, scan_unroll=scan_unroll, unstacked=unstacked)
    if isinstance(config, GPT2Config):
        return GPT2(config, scan_unroll=scan_unroll, unstacked=unstacked)
    raise TypeError(f"unknown model config type {type(config).__name__}")


def forward(config: ModelConfig, params, tokens: jax.Array, positions: jax.Array,
            cache: KVCache | None = None, *, last_only: bool = False, scan_unroll: int = 1):
    """Pure forward pass: (params, tokens [B, T], positions [B, T], cache) -> (logits, cache).

    logits are float32 [B, T, V]. Positions of -1 mark padding tokens: they are neither
    attended to nor (meaningfully) scored. With a cache, the new keys/values are written at
    each row's next free slot and attention covers everything cached for that row.
    last_only (static) returns logits of each row's last real token only (its highest
    position; `layers.last_token`): [B, 1, V].
    params["layers"] may also be a tuple of per-layer trees (see `unstack_layers`): the same
    model, run with one weight buffer per layer instead of nn.scan over stacked ones.
    """
    unstacked = isinstance(params["layers"], tuple | list)
    if unstacked:
        params = {**{k: v for k, v in params.items() if k != "layers"},
                  **{f"layers_{i}": lp for i, lp in enumerate(params["layers"])}}
    module = module_for(config, scan_unroll, unstacked)
    return module.apply({"params": params}, tokens, positions, cache, last_only)


def _family(config: ModelConfig):
    """The family module (models.llama or models.gpt2) of `config`; TypeError for others."""
    family = _FAMILIES.get(type(config))
    if family is None:
        raise TypeError(f"unknown model config type {type(config).__name__}")
    return family


def embed(config: ModelConfig, params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """The residual stream entering layer 0: tokens, positions [B, T] -> x [B, T, D], in the
    embedding table's dtype (GPT-2 adds its learned position embeddings)."""
    return _family(config).embed(config, params, tokens, positions)


def apply_layer(config: ModelConfig, layer_params, x: jax.Array, positions: jax.Array,
                layer) -> jax.Array:
    """Decoder layer `layer` (int or int32 scalar) without a cache: x [B, T, D] -> [B, T, D].

    layer_params: that layer's params (no L axis; any leaf `layers.linear` runs); positions
    [B, T], -1 marking padding (never attended to); the layer's sliding window (if the config
    has one) applies. The same Flax block `forward` runs, so embed -> apply_layer for every
    layer -> head equals forward without a cache.
    """
    return _family(config).apply_layer(config, layer_params, x, positions, layer)


def head(config: ModelConfig, params, x: jax.Array) -> jax.Array:
    """Final norm and LM head (the embedding table when tied): x [B, T, D] -> float32 [B, T, V]."""
    return _family(config).head(config, params, x)


def input_sites(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The inputs of one layer's projections: site -> the paths (under a layer's params) of
    the projections that multiply it, first applied first. Every family names the same sites:
      attn_in  normed x [D]              -> the q/k/v projection(s)
      o_in     attention output [N*H]    -> attn/o
      mlp_in   normed x [D]              -> the MLP's input projection(s)
      down_in  MLP hidden activation [F] -> the MLP's output projection
    A mixture-of-experts layer's mlp_in and down_in name expert stacks [E, in, out] (logical
    axes `experts, ...`): expert e multiplies only the tokens routed to it (`router`).
    TypeError for a family without them.
    """
    family = _family(config)
    return family.MOE_SITES if getattr(config, "n_experts", 0) else family.SITES


def router(config: ModelConfig) -> str | None:
    """The path (under a layer's params) of a MoE layer's router [D, E], which multiplies the
    mlp_in site's input; its logits through `models.moe.routing` give each token's experts.
    None for dense layers."""
    return _family(config).ROUTER if getattr(config, "n_experts", 0) else None


def tied_table(config: ModelConfig) -> str | None:
    """Name of the embedding table the LM head multiplies by (tied embeddings), or None."""
    if isinstance(config, GPT2Config):
        return "wte"
    return "embed" if config.tie_embeddings else None


def unstack_layers(params):
    """params with the stacked "layers" subtree [L, ...] replaced by a tuple of L per-layer
    trees of jax arrays (non-array leaves such as quantized weights are sliced child by child).
    Stacked numpy leaves are sliced on the host, and each slice becomes a jax array without a
    copy where its buffer allows (jax.device_put); jax leaves are sliced and copied."""
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree.map(lambda a, i=i: jax.device_put(a[i]) if isinstance(a, np.ndarray)
                                   else jnp.array(a[i]), layers) for i in range(n))
    return {**params, "layers": per_layer}


def _boxed_params(config: ModelConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return module_for(config).init(rng, tokens, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32):
    """Randomly initialised params (plain arrays) of `config`, for tests and experiments."""
    params = nn.unbox(_boxed_params(config, rng))
    return jax.tree.map(lambda a: a.astype(dtype), params)


_ABSTRACT: dict = {}  # config -> its boxed abstract params (made or declared once)


def _abstract(config: ModelConfig):
    """The boxed abstract params of `config` (LogicallyPartitioned ShapeDtypeStruct leaves):
    a trace of its init (~0.15 s) the first time, unless `declare_abstract` gave them."""
    if config not in _ABSTRACT:
        _ABSTRACT[config] = jax.eval_shape(functools.partial(_boxed_params, config),
                                           jax.random.key(0))
    return _ABSTRACT[config]


def abstract_declaration(config: ModelConfig) -> dict[str, list]:
    """config's weights as plain data (JSON-able): weight path ("layers/attn/q") ->
    [shape, dtype name, logical axis names]. `declare_abstract` takes it back."""
    flat = jax.tree_util.tree_flatten_with_path(
        _abstract(config), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return {"/".join(str(k.key) for k in key_path): [list(b.value.shape), str(b.value.dtype),
                                                    list(b.names)]
            for key_path, b in flat}


def declare_abstract(config: ModelConfig, declaration: dict[str, list]) -> None:
    """Use `declaration` (from `abstract_declaration` of an equal config and the same model
    code) as config's abstract params, so that no init is traced for them. ValueError (and
    nothing kept) where it is not such a declaration."""
    tree: dict = {}
    try:
        for path, (shape, dtype, names) in declaration.items():
            *parents, name = path.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            value = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))
            if len(names) != len(value.shape) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: {len(names)} axis names for shape {value.shape}")
            node[name] = nn.LogicallyPartitioned(value, tuple(names))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not an abstract-params declaration: {e}") from e
    if not tree:
        raise ValueError("not an abstract-params declaration: no weights")
    _ABSTRACT[config] = tree


def abstract_params(config: ModelConfig):
    """Params tree of jax.ShapeDtypeStruct (float32), without allocating anything."""
    return nn.unbox(_abstract(config))


def logical_axes(config: ModelConfig):
    """Params tree of tuples of logical axis names, one per dimension of each weight."""
    return jax.tree.map(lambda p: tuple(p.names), _abstract(config),
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _declaring_configs() -> tuple[ModelConfig, ...]:
    """Tiny configs that between them declare every weight of every family (optional biases
    included): a llama with every optional weight, a MoE llama, a GPT-2."""
    return (LlamaConfig.tiny(qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True,
                             post_norms=True),
            LlamaConfig.tiny(n_experts=4, n_experts_per_token=2), GPT2Config.tiny())


@functools.lru_cache(maxsize=32)
def _config_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Weight path -> logical axes of one layer's leaf (no "layers" axis) of `config` (a trace
    of its init, ~0.15 s, unless its abstract params were made already)."""
    return {path: tuple(names[1:] if path.startswith("layers/") else names)
            for path, (_, _, names) in abstract_declaration(config).items()}


def declared_axes(path: str, config: ModelConfig | None = None) -> tuple[str, ...] | None:
    """The logical axes of one layer's leaf at weight path `path` ("embed", "layers/attn/q";
    no "layers" axis), or None for a path no family declares. config: the model's, whose own
    declaration is asked first (free once `abstract_params(config)` ran). Otherwise the
    families are traced only as far as needed: a llama's paths cost one trace, not three
    (0.43 s at every start of a native run before)."""
    if config is not None and path in _config_axes(config):
        return _config_axes(config)[path]
    for declaring in _declaring_configs():
        ax = _config_axes(declaring).get(path)
        if ax is not None:
            return ax
    return None


def weight_axes() -> dict[str, tuple[str, ...]]:
    """Weight path -> logical axes of one layer's leaf (no "layers" axis), for every weight
    any family declares; AssertionError when two families declare one path differently."""
    out: dict[str, tuple[str, ...]] = {}
    for declaring in _declaring_configs():
        for path, ax in _config_axes(declaring).items():
            if out.setdefault(path, ax) != ax:
                raise AssertionError(f"{path}: families declare different axes {out[path]}, {ax}")
    return out
