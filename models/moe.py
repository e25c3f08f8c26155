"""Sparse mixture-of-experts MLP of the Llama family (Mixtral, Qwen3-MoE).

Parameters of one layer (stacked: a leading L axis), the experts on their own logical axis
`experts` (E), the expert hidden width on `expert_mlp` (F):
  moe/router [D, E]
  moe/gate [E, D, F], moe/up [E, D, F], moe/down [E, F, D]

Routing, as transformers' MixtralTopKRouter / Qwen3MoeTopKRouter: p = softmax(x @ router) in
float32 over the E experts; each token keeps its k largest p (k = n_experts_per_token),
renormalised to sum to 1 when norm_topk_prob (Mixtral always, Qwen3-MoE as its config says);
the other experts get weight 0.

Dense formulation: every expert runs on every token and the expert outputs are summed with
those weights. Why this one:
  * the experts are one [E, ...] stack multiplied through the dispatching matmul
    (`layers.linear`, x [1, N, D] @ w [E, D, F] -> [E, N, F] by broadcasting), so float,
    quantized and sparse leaves, and the native CPU kernels' stacks (one kernel call per
    expert), run them with no code of their own;
  * shapes are static (no gather whose size depends on the routing, nothing recompiles);
  * with `experts` sharded over a mesh axis (expert parallelism) each device runs its own
    experts on all tokens, and the weighted sum over experts (one all-reduce) is the only
    communication; tokens equal one device's.
The price: E / k times the expert FLOPs and weight reads of a formulation that gathers only the
chosen experts (4x for Mixtral's 8 experts, top 2; 16x for Qwen3-MoE's 128, top 8): a batch-1
decode step reads all E experts' weights where a gather would read k. For many experts a
gather/segment formulation is the faster next step (docs/MOE.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import LlamaConfig
from models.layers import gated_mlp_hidden, linear, weight


def route(logits: jax.Array, k: int, renormalise: bool) -> jax.Array:
    """Router weights from router logits [..., E]: softmax (float32), the top k kept
    (renormalised to sum to 1 when asked), 0 elsewhere -> float32 [..., E]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, k)  # [..., k]
    if renormalise:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32)  # [..., k, E]
    return jnp.sum(onehot * top[..., None], axis=-2)


def routing(config: LlamaConfig, logits: jax.Array) -> jax.Array:
    """The routing a MoE layer of `config` applies: router logits [..., E] -> float32 weights
    [..., E] (`route` with the config's k and renormalisation). A token is routed to expert e
    where its weight is > 0 (calibration records each expert's inputs on those tokens)."""
    return route(logits, config.n_experts_per_token, config.norm_topk_prob)


class MoE(nn.Module):
    """Router + n_experts gated MLPs (SwiGLU or GeGLU, as `config.activation`), dense."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        c = self.config
        d, f, e = c.d_model, c.d_ff, c.n_experts
        router = weight(self, "router", (d, e), ("embed", "experts"))
        gate = weight(self, "gate", (e, d, f), ("experts", "embed", "expert_mlp"))
        up = weight(self, "up", (e, d, f), ("experts", "embed", "expert_mlp"))
        down = weight(self, "down", (e, f, d), ("experts", "expert_mlp", "embed"))
        b, t, _ = x.shape
        xs = x.reshape(1, b * t, d)  # one token axis N = B*T; the 1 broadcasts over E
        w = routing(c, linear(xs[0], router))  # [N, E]
        h = gated_mlp_hidden(xs, gate, up, c.activation)  # [E, N, F]
        y = linear(h, down)  # [E, N, D]
        out = jnp.einsum("end,ne->nd", y.astype(jnp.float32), w)
        return out.astype(x.dtype).reshape(b, t, d)
