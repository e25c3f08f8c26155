"""Structured pruning: remove whole FFN channels and whole attention heads, giving a smaller dense
model (a new config and smaller params) that every backend's dense kernels run faster.

Every layer keeps the same number of channels / heads (the params are stacked over layers, so all
layers share one config), but which ones it keeps is chosen per layer. The projections involved
come from the family's input sites (`models.input_sites`): the MLP's input projections (site
mlp_in: Llama gate and up, GPT-2 fc) and its output projection (site down_in: Llama down,
GPT-2 proj).
  FFN channel j of layer l (column j of every input projection and its bias, row j of the
  output projection), importance
    calibrated  rms(act_j) * ||out[j, :]||      act: the input of the output projection
    magnitude   prod over input projections of ||in[:, j]||, times ||out[j, :]||
  query head h (q columns and o rows of the head; Llama family only), importance
    calibrated  sum over the head's dims i of rms(attn_out_i) * ||o[i, :]||
    magnitude   ||q[:, head]||_F * ||o[head, :]||_F
Heads are removed per GQA group: each of the K key/value heads keeps the same number of its
G = N / K query heads, so the grouping (query head i reads kv head i // G') stays valid and
k/v are untouched. GPT-2's heads cannot be removed this way: its q, k and v are one fused qkv
projection, and its head dim is d_model / n_heads, so fewer heads would change the head dim
(InputError). rms(.) comes from calibration text (`structured_norms`); without it the
magnitude score is used.
Mixture-of-experts layers: every expert keeps the same number of channels (d_ff is one config
field), chosen per expert by the same scores over its own weights and, calibrated, over its
routed tokens (an expert no calibration token reached: rms taken as 1, so the score is
||out[j, :]|| alone).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.quant.base import QuantizedWeight
from jaxinfer.quant.calibration import report_unrouted, run_layerwise, sites
from jaxinfer.sparse.sparsify import check_sparsity, site_norms

Q, O = "attn/q", "attn/o"  # the projections head pruning cuts (a separate q: Llama family)


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """What `prune_structured` keeps: sorted indices per layer."""

    channels: np.ndarray | None  # int [L, F'] (MoE: [L, E, F']) kept FFN channels, or None
    heads: np.ndarray | None  # int [L, N'] kept query heads, or None (all kept)


def _norm(a, axis) -> np.ndarray:
    return np.sqrt(np.sum(np.square(np.asarray(a, np.float64)), axis=axis))


def _ffn_paths(config) -> tuple[tuple[str, ...], str]:
    """(the MLP's input projections, its output projection): paths under "layers"."""
    site_paths = sites(config)
    return site_paths["mlp_in"], site_paths["down_in"][0]


def channel_scores(config, layers, norms=None) -> np.ndarray:
    """Importance of each FFN channel: [L, F], or [L, E, F] for a MoE layer's experts (see
    the module docstring)."""
    ins, out = _ffn_paths(config)
    score = _norm(paths.get(layers, out), -1)  # [L, F]
    if norms is not None:
        return np.stack([n["down_in"] for n in norms]) * score
    for p in ins:
        score = score * _norm(paths.get(layers, p), -2)
    return score


def head_scores(layers, n_heads: int, norms=None) -> np.ndarray:
    """Importance of each query head: [L, N] (see the module docstring)."""
    o = np.asarray(paths.get(layers, O), np.float64)  # [L, N*H, D]
    n_layers, nh, _ = o.shape
    rows = _norm(o, -1)  # [L, N*H]
    if norms is not None:
        per_dim = np.stack([n["o_in"] for n in norms]) * rows
        return per_dim.reshape(n_layers, n_heads, nh // n_heads).sum(-1)
    q = np.asarray(paths.get(layers, Q), np.float64)  # [L, D, N*H]
    q_heads = _norm(q.reshape(n_layers, q.shape[1], n_heads, -1), (1, 3))
    return q_heads * _norm(rows.reshape(n_layers, n_heads, -1), -1)


def removed_count(sparsity: float, size: int, what: str) -> int:
    """round(sparsity * size), refusing 0 (for sparsity > 0) and size."""
    k = int(round(sparsity * size))
    if sparsity > 0 and k == 0:
        raise InputError(f"{what} sparsity {sparsity} removes nothing of {size}; use at least "
                         f"{0.5 / size:.3f}")
    if k >= size:
        raise InputError(f"{what} sparsity {sparsity} would remove all {size} {what}")
    return k


def check_structured(config, ffn_sparsity: float = 0.0, head_sparsity: float = 0.0):
    """(FFN channels removed, query heads removed per KV group); InputError for a family
    without input sites, a fraction outside [0, 1), one that removes nothing or everything,
    or head pruning of a family whose heads cannot be removed (GPT-2)."""
    site_paths = sites(config)
    ffn_sparsity, head_sparsity = check_sparsity(ffn_sparsity), check_sparsity(head_sparsity)
    if head_sparsity and Q not in site_paths["attn_in"]:
        raise InputError(f"head pruning does not apply to the {config.family} family: its q, k "
                         "and v are one fused projection and its head dim is d_model / n_heads, "
                         "so removing heads would change the head dim; prune FFN channels only "
                         "(head sparsity 0)")
    ffn = removed_count(ffn_sparsity, config.d_ff, "FFN channels") if ffn_sparsity else 0
    g = config.n_heads // config.n_kv_heads
    heads = removed_count(head_sparsity, g, "heads of each KV group") if head_sparsity else 0
    return ffn, heads


def plan_structured(config, params, ffn_sparsity: float = 0.0, head_sparsity: float = 0.0,
                    norms=None) -> StructuredPlan:
    """Choose the channels and heads to keep (InputError for bad arguments)."""
    n_ffn, n_heads = check_structured(config, ffn_sparsity, head_sparsity)
    layers = params["layers"]
    for path, leaf in paths.iter_leaves(layers, "layers"):
        if isinstance(leaf, QuantizedWeight):
            raise InputError(f"{path}: is {type(leaf).__name__}; prune before quantizing")
    channels = heads = None
    if n_ffn:
        scores = channel_scores(config, layers, norms)
        order = np.argsort(scores, axis=-1, kind="stable")
        channels = np.sort(order[..., n_ffn:], axis=-1)
    if n_heads:
        g = config.n_heads // config.n_kv_heads
        scores = head_scores(layers, config.n_heads, norms)
        per_group = scores.reshape(config.n_layers, config.n_kv_heads, g)
        keep = np.sort(np.argsort(per_group, axis=-1, kind="stable")[..., n_heads:], axis=-1)
        heads = (keep + g * np.arange(config.n_kv_heads)[:, None]).reshape(config.n_layers, -1)
    return StructuredPlan(channels=channels, heads=heads)


def _take(a, idx: np.ndarray, axis: int, unit: int = 1):
    """a [L, ...] with `axis` restricted, per layer, to units idx [L, k] of `unit` entries (an
    expert stack a [L, E, ...] per layer and expert: idx [L, E, k])."""
    a = jnp.asarray(a)
    axis = axis % a.ndim
    shape, lead = a.shape, idx.ndim - 1
    split = (*shape[:axis], shape[axis] // unit, unit, *shape[axis + 1:])
    ix = jnp.asarray(idx).reshape(*idx.shape[:-1], *([1] * (axis - lead)), idx.shape[-1],
                                  *([1] * (len(split) - axis - 1)))
    out = jnp.take_along_axis(a.reshape(split), ix, axis=axis)
    return out.reshape(*shape[:axis], idx.shape[-1] * unit, *shape[axis + 1:])


def _take_bias(layers, path: str, idx: np.ndarray, unit: int = 1):
    """layers with the bias of projection `path` (if it has one) restricted like its columns."""
    group, name = path.rsplit("/", 1)
    if name + "_bias" not in paths.get(layers, group):
        return layers
    bias = path + "_bias"
    return paths.replace(layers, bias, _take(paths.get(layers, bias), idx, -1, unit))


def apply_structured(config, params, plan: StructuredPlan):
    """(new config, new params) with only the planned channels and heads."""
    layers = params["layers"]
    new = {}
    if plan.channels is not None:
        c = plan.channels
        ins, out = _ffn_paths(config)
        for p in ins:
            layers = paths.replace(layers, p, _take(paths.get(layers, p), c, -1))
            layers = _take_bias(layers, p, c)
        layers = paths.replace(layers, out, _take(paths.get(layers, out), c, -2))
        new["d_ff"] = c.shape[-1]
    if plan.heads is not None:
        h, hd = plan.heads, config.head_dim
        layers = paths.replace(layers, Q, _take(paths.get(layers, Q), h, -1, hd))
        layers = _take_bias(layers, Q, h, hd)
        layers = paths.replace(layers, O, _take(paths.get(layers, O), h, 1, hd))
        new["n_heads"] = h.shape[1]
    return dataclasses.replace(config, **new), {**params, "layers": layers}


def structured_norms(model, calib_ids, batch_size: int = 8, progress: bool = True):
    """Per layer {site: rms of each input feature [in]} of the dense model on calibration
    windows (any family with input sites; expert sites [E, in], see `site_norms`)."""
    norms = []

    def record(layer, lp, hessians):
        report_unrouted(hessians, layer, "the output projection's row norms score their channels")
        norms.append(site_norms(hessians))
        return lp

    run_layerwise(model, calib_ids, record, sequential=False, batch_size=batch_size,
                  progress=progress)
    return norms


def prune_structured(model, *, ffn_sparsity: float = 0.0, head_sparsity: float = 0.0,
                     norms=None):
    """A smaller dense `Model` (new config and params) without the least important FFN channels
    and query heads. norms: from `structured_norms` (calibrated score) or None (magnitude)."""
    plan = plan_structured(model.config, model.params, ffn_sparsity, head_sparsity, norms)
    config, params = apply_structured(model.config, model.params, plan)
    return dataclasses.replace(model, config=config, params=params)
