"""`sparsify(params, rules, method, sparsity)`: pruning as a transform of the params pytree.

Selected weight matrices (default: every attention and MLP projection, `DEFAULT_PATTERNS`) are
returned with pruned entries set to zero, in their own dtype and layout; everything else is
returned as it is. The models never change. Methods (scores and masks: see `masks.py`):
  magnitude  unstructured, |W| per output column
  wanda      unstructured, |W| * ||X_in|| (needs `norms`: per path, the L2 norm of each input
             feature over calibration tokens, [L, in] for stacked leaves)
  nm         N:M semi-structured (n of every m consecutive inputs kept), scored by magnitude or,
             when `norms` are given, by Wanda's score
The zeros of an N:M result can then be stored compressed (`compress_nm`), which the dispatching
matmul runs through `NMSparseWeight`.

`wanda_sparsify(model, calib_ids, ...)` computes Wanda's norms on real text one layer at a time:
layer l's inputs are recorded on the outputs of the already pruned layers 0..l-1 (as the Wanda
reference does), reusing the calibration machinery of GPTQ (any family with input sites,
`models.input_sites`: Llama and GPT-2; Wanda's per-column comparison needs nothing more, so
GPT-2's fused qkv is pruned like any other projection). On a mixture-of-experts layer each
expert's norms are taken over the tokens routed to it; an expert no calibration token reached
is pruned by magnitude (norms of 1), with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.paths import is_stacked, iter_leaves
from jaxinfer.quant.base import IN_OUT, QuantizedWeight, stack_leaves
from jaxinfer.quant.calibration import report_unrouted, run_layerwise, sites
from jaxinfer.quant.nm import NMSparseWeight, check_nm
from jaxinfer.quant.transform import DEFAULT_PATTERNS, glob_regex, is_matrix, matrix_layout
from jaxinfer.sparse.masks import (
    apply_mask,
    magnitude_scores,
    nm_mask,
    pruned_count,
    unstructured_mask,
    wanda_scores,
)

METHODS = ("magnitude", "wanda", "nm")


def check_sparsity(sparsity) -> float:
    """sparsity as a float in [0, 1) (InputError otherwise)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def select(params, rules=None) -> list[str]:
    """Paths of the weight matrices `rules` (glob patterns, default: the projections) select.

    InputError for a pattern that selects no weight matrix, or an embedding / non-[in, out]
    matrix (pruning applies to projections).
    """
    patterns = list(DEFAULT_PATTERNS if rules is None else
                    ([rules] if isinstance(rules, str) else rules))
    if not patterns:
        raise InputError("rules is empty")
    regexes = [(p, glob_regex(p)) for p in patterns]
    hits: dict[str, list[str]] = {p: [] for p in patterns}
    for path, leaf in iter_leaves(params):
        for p, rx in regexes:
            if rx.match(path):
                if isinstance(leaf, QuantizedWeight):
                    raise InputError(f"{path}: is {type(leaf).__name__}; prune before "
                                     "quantizing or compressing")
                if not is_matrix(path, leaf):
                    continue
                if matrix_layout(path) != IN_OUT:
                    raise InputError(f"{path}: embedding tables are not pruned (only "
                                     "[in, out] projections)")
                hits[p].append(path)
                break
    if rules is not None:
        empty = [p for p, found in hits.items() if not found]
        if empty:
            raise InputError(f"rule pattern(s) {', '.join(map(repr, empty))} match no weight matrix")
    return sorted({path for found in hits.values() for path in found})


def leaf_mask(w, method: str, sparsity: float | None, n: int | None, m: int | None,
              norms=None):
    """The keep-mask of one matrix w [..., in, out] (see the module docstring)."""
    scores = magnitude_scores(w) if norms is None else wanda_scores(w, norms)
    if method == "nm":
        return nm_mask(scores, n, m)
    return unstructured_mask(scores, pruned_count(sparsity, w.shape[-2]))


def _check_nm_fits(path: str, w, n: int, m: int) -> None:
    """InputError naming `path` unless n:m fits the matrix w [..., in, out]."""
    reason = check_nm(n, m, int(w.shape[-2]))
    if reason:
        raise InputError(f"{path}: {reason}")


def _check_args(method, sparsity, n, m, norms):
    if method not in METHODS:
        raise InputError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "nm":
        reason = check_nm(n, m)
        if reason:
            raise InputError(reason)
        return None
    sparsity = check_sparsity(sparsity)
    if method == "wanda" and norms is None:
        raise InputError("method 'wanda' needs input-feature norms (see wanda_sparsify)")
    return sparsity


def sparsify(params, rules=None, *, method: str = "magnitude", sparsity: float | None = None,
             n: int | None = None, m: int | None = None, norms: Mapping | None = None,
             return_masks: bool = False):
    """A new params tree with the selected matrices pruned (zeros in place).

    method: "magnitude" | "wanda" (unstructured, `sparsity` in [0, 1)) | "nm" (`n`:`m`).
    norms: path -> input-feature norms [..., in] (Wanda's score; optional for "nm").
    return_masks: also return {path: bool mask} (True = kept) for recovery fine-tuning.
    InputError for bad arguments, a pattern matching nothing, N:M that does not fit a matrix,
    or norms of the wrong shape.
    """
    sparsity = _check_args(method, sparsity, n, m, norms)
    norms = dict(norms or {})
    masks = {}
    for path in select(params, rules):
        w = paths.get(params, path)
        if method == "nm":
            _check_nm_fits(path, w, n, m)
        nv = norms.get(path)
        if method == "wanda" and nv is None:
            raise InputError(f"{path}: no input norms given for Wanda")
        if nv is not None and tuple(np.shape(nv)) != tuple(w.shape[:-1]):
            raise InputError(f"{path}: norms have shape {tuple(np.shape(nv))}, expected "
                             f"{tuple(w.shape[:-1])}")
        masks[path] = leaf_mask(w, method, sparsity, n, m, nv)
    out = params
    for path, mask in masks.items():
        out = paths.replace(out, path, apply_mask(paths.get(params, path), mask))
    return (out, masks) if return_masks else out


def compress_nm(params, n: int, m: int, rules=None, int8: bool = False):
    """The params tree with the selected N:M-sparse matrices stored as `NMSparseWeight`
    (InputError if one of them is not n:m sparse)."""
    out = params
    for path in select(params, rules):
        try:
            leaf = NMSparseWeight.from_dense(paths.get(params, path), n, m, int8=int8)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
        out = paths.replace(out, path, leaf)
    return out


def sparsity_report(params) -> dict[str, float]:
    """path -> fraction of zeros of every per-layer weight matrix (compressed N:M leaves
    included; other quantized leaves left out)."""
    out = {}
    for path, leaf in iter_leaves(params):
        if isinstance(leaf, NMSparseWeight):
            out[path] = float(np.mean(np.asarray(leaf.dequantize(jnp.float32)) == 0))
        elif is_matrix(path, leaf) and is_stacked(path):
            out[path] = float(np.mean(np.asarray(leaf) == 0))
    return out


# ----------------------------------------------------------------------------- calibrated


def site_norms(hessians) -> dict[str, np.ndarray]:
    """{site: Hessian} of one layer -> {site: input-feature L2 norms [in]} (root mean square
    over the calibration tokens; Wanda's comparison is per column, so the scale is irrelevant).
    An expert site gives [E, in], each expert's over its routed tokens; an expert that no token
    reached gets norms of 1, so Wanda's score for it is the magnitude |W|."""
    out = {}
    for site, h in hessians.items():
        norms = np.sqrt(np.maximum(np.diagonal(h.mean(), axis1=-2, axis2=-1), 0.0))
        norms[h.unrouted()] = 1.0
        out[site] = norms
    return out


def wanda_sparsify(model, calib_ids, *, sparsity: float | None = None, n: int | None = None,
                   m: int | None = None, batch_size: int = 8, progress: bool = True,
                   return_masks: bool = False, stats: dict | None = None):
    """Params of `model` with every projection of `models.input_sites` pruned by Wanda's score,
    computed layer by layer on `calib_ids` (token windows). Unstructured with `sparsity`, or N:M
    when n and m are given. The result keeps the original dtypes; with return_masks also
    {"layers/<projection>": bool [L, (E,) in, out]} (True = kept). MoE experts are pruned on
    their routed tokens' norms (see `site_norms`); stats: if a dict, gets "unrouted" (the
    experts pruned by magnitude, see `calibration.report_unrouted`)."""
    method = "nm" if n is not None or m is not None else "wanda"
    sparsity = _check_args(method, sparsity, n, m, {})
    params = model.params
    site_of = {p: site for site, ps in sites(model.config).items() for p in ps}
    projections = list(site_of)
    for path in select(params, [f"layers/{p}" for p in projections]):
        if method == "nm":
            _check_nm_fits(path, paths.get(params, path), n, m)
    per_layer_masks: dict[str, list] = {p: [] for p in projections}

    def prune_layer(layer, lp, hessians):
        report_unrouted(hessians, layer, "magnitude pruning", stats)
        norms = site_norms(hessians)
        for p in projections:
            w = paths.get(lp, p)
            mask = leaf_mask(w, method, sparsity, n, m, norms[site_of[p]])
            per_layer_masks[p].append(np.asarray(mask))
            lp = paths.replace(lp, p, apply_mask(w, mask))
        return lp

    run_layerwise(model, calib_ids, prune_layer, batch_size=batch_size, progress=progress,
                  desc="wanda")
    out, masks = params, {}
    for p, ms in per_layer_masks.items():
        mask = stack_leaves(ms)
        masks["layers/" + p] = mask
        out = paths.replace(out, "layers/" + p, apply_mask(paths.get(params, "layers/" + p), mask))
    return (out, masks) if return_masks else out
