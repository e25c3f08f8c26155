"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") to group-wise int4, stored exactly like `Int4Weight.from_float`.

For a weight W [in, out] whose inputs X [tokens, in] were recorded on calibration text
(H = X^T X / tokens), GPTQ picks the 4-bit values row by row (one input row at a time) so that
||X W - X Q||^2 stays small: after rounding row i it spreads the row's rounding error over the
rows not yet quantized, weighted by the inverse Hessian. In detail (numpy float64):

  * inputs never seen (H[i, i] == 0) get H[i, i] = 1 and a zero weight row;
  * damping: H += damp * mean(diag(H)) * I;
  * act_order: rows are processed by decreasing diag(H) (the order is undone at the end);
  * U = the upper Cholesky factor of H^-1 (H^-1 = U^T U);
  * rows are processed in blocks of `block_size`; within a block, row p is rounded to its
    group's grid, err = (w_p - q_p) / U[p, p] and the block's later rows get w -= U[p, r] err;
    after the block, the rows after it receive the whole block's update at once;
  * a group's grid (float16 scale, and minimum when asymmetric; formulas of `Int4Weight`) is
    fixed when its first row is about to be rounded, from the group's current, error-updated
    weights (with clip_search > 0: the best of several shrunken ranges, by diag(H)-weighted
    rounding error). Groups are always contiguous runs of `group_size` original input rows
    (the storage format has no group index), also with act_order.

Projections sharing one input (a site of `models.input_sites`: Llama's q/k/v and gate/up)
share H, and GPTQ treats output columns independently, so they are quantized together as one
[in, sum(out)] matrix (GPT-2's fused qkv already is one).

`gptq_quantize(model, calib_ids)` is sequential: layer l's Hessians are recorded on the
outputs of the already quantized layers 0..l-1 (sequential=False: of the float layers).
Within a layer, every projection sees the float layer's inputs (e.g. attn/o sees the
attention output of float q/k/v), as in the reference implementation.

Mixture-of-experts layers: each expert of an expert site (`calibration.is_expert_site`) is
quantized on its own Hessian, over the tokens routed to it (its gate and up merged as above).
An expert that no calibration token reached is quantized by round-to-nearest
(`Int4Weight.from_float`, the same grid) with a warning (`calibration.report_unrouted`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.quant.base import IN_OUT, QuantizedWeight, float_dtype_name, stack_leaves
from jaxinfer.quant.calibration import is_expert_site, report_unrouted, run_layerwise, sites
from jaxinfer.quant.int4 import Int4Weight
from jaxinfer.quant.packing import pack_nibbles
from jaxinfer.quant.schemes import Int4

# ----------------------------------------------------------------------------- the grid


def _f16_up(s: np.ndarray) -> np.ndarray:
    """float64 -> nearest float16 >= s, returned as float64 (as `base.f16_up`)."""
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float64) < s, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def _f16_down(s: np.ndarray) -> np.ndarray:
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float64) > s, np.nextafter(h, np.float16(-np.inf)), h)
    return h.astype(np.float64)


def group_grid(v: np.ndarray, symmetric: bool, shrink: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Grid of one group from its values v [rows, out]: (scale [out], min [out] | None), both
    exactly float16 values, by the formulas of `Int4Weight.from_float` applied to the range
    [min(v), max(v)] scaled by `shrink` (1: the whole range, < 1: clip the extremes)."""
    lo, hi = v.min(axis=0) * shrink, v.max(axis=0) * shrink
    if symmetric:
        return _f16_up(np.maximum(hi / 7.0, -lo / 8.0)), None
    m = _f16_down(lo)
    return _f16_up((hi - m) / 15.0), m


def search_grid(v: np.ndarray, weights: np.ndarray, symmetric: bool, shrinks):
    """The grid (see `group_grid`) whose rounding error sum(weights[r] (v - deq)^2) over the
    group's rows is smallest, chosen per output column among the range scales `shrinks`."""
    best_s, best_m = group_grid(v, symmetric)
    if len(shrinks) == 0:
        return best_s, best_m
    best_e = weights @ np.square(v - round_to_grid(v, best_s, best_m)[1])
    for r in shrinks:
        s, m = group_grid(v, symmetric, r)
        e = weights @ np.square(v - round_to_grid(v, s, m)[1])
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
        if m is not None:
            best_m = np.where(better, m, best_m)
    return best_s, best_m


def round_to_grid(w: np.ndarray, scale: np.ndarray, mn: np.ndarray | None):
    """w [..., out] -> (stored nibbles 0..15, dequantized values) on a group's grid."""
    div = np.where(scale == 0, 1.0, scale)
    if mn is None:
        q = np.clip(np.round(w / div), -8, 7)
        return q + 8, q * scale
    q = np.clip(np.round((w - mn) / div), 0, 15)
    return q, q * scale + mn


@dataclasses.dataclass
class GPTQResult:
    """One quantized matrix: nibbles uint8 [in, out] (0..15, symmetric stores q + 8), float16
    scales / mins [in / group_size, out], and GPTQ's loss sum((w - q)^2 / U[p, p]^2) / 2."""

    q: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    loss: float

    def leaf(self, group_size: int, dtype: str = "float32") -> Int4Weight:
        """The `Int4Weight` (IN_OUT) holding these values."""
        mins = None if self.mins is None else jnp.asarray(self.mins)
        return Int4Weight(values=pack_nibbles(jnp.asarray(self.q, jnp.uint8), -2),
                          scales=jnp.asarray(self.scales), mins=mins, layout=IN_OUT,
                          group_size=group_size, dtype=dtype)

    def dequantize(self, group_size: int) -> np.ndarray:
        """float64 [in, out]: the values the stored grid stands for."""
        s = np.repeat(self.scales.astype(np.float64), group_size, axis=0)
        if self.mins is None:
            return (self.q.astype(np.float64) - 8.0) * s
        return self.q * s + np.repeat(self.mins.astype(np.float64), group_size, axis=0)


# ----------------------------------------------------------------------------- one matrix


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = (H + damp * mean(diag H) I)^-1; more damping if H is singular.

    With J the order reversal and J H J = M M^T (Cholesky, M lower): H = R R^T for the upper
    R = J M J, so H^-1 = R^-T R^-1 and U = R^-1 = J M^-1 J. One Cholesky and one inverse of
    a triangular matrix (cheaper than inverting H and factoring the inverse).
    """
    mean_diag = float(np.mean(np.diag(h)))
    n = len(h)
    for extra in (1.0, 10.0, 100.0, 1000.0):
        hd = h + (damp * extra * mean_diag) * np.eye(n)
        try:
            m = np.linalg.cholesky(hd[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        u = np.linalg.solve(m, np.eye(n))[::-1, ::-1]
        return np.ascontiguousarray(np.triu(u))
    raise InputError("GPTQ: the calibration Hessian is not positive definite even with 1000x "
                     "damping (too little or degenerate calibration data?)")


def gptq_matrix(w, h, *, group_size: int = 128, symmetric: bool = True, damp: float = 0.01,
                block_size: int = 128, act_order: bool = False, clip_search: int = 0
                ) -> GPTQResult:
    """GPTQ of one weight w [in, out] with input Hessian h [in, in] (see the module docstring).

    clip_search: 0 uses each group's whole range; n > 0 also tries the range scaled by
    1 - k / (2n), k = 1..n (down to half), keeping per column the one with the least
    diag(H)-weighted rounding error of the group's current weights.
    """
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n_in, n_out = w.shape
    if h.shape != (n_in, n_in):
        raise ValueError(f"Hessian {h.shape} does not fit weight {w.shape}")
    if n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {n_in}")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    perm = (np.argsort(-np.diag(h), kind="stable") if act_order
            else np.arange(n_in))
    w = w[perm]
    u = _inverse_cholesky(h[perm][:, perm], damp)

    n_groups = n_in // group_size
    group = perm // group_size  # group of each (permuted) row
    rows_of = [np.flatnonzero(group == g) for g in range(n_groups)]
    entered = np.zeros(n_groups, bool)
    scales = np.zeros((n_groups, n_out))
    mins = None if symmetric else np.zeros((n_groups, n_out))
    q = np.zeros((n_in, n_out), np.uint8)
    shrinks = [1.0 - k / (2.0 * clip_search) for k in range(1, clip_search + 1)]
    hdiag = np.diag(h)[perm]
    loss = 0.0
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = w[i1:i2]  # a view: updates land in w
        err1 = np.zeros((i2 - i1, n_out))
        for i in range(i2 - i1):
            p = i1 + i
            g = group[p]
            if not entered[g]:
                rows = rows_of[g]
                cur = w[rows]
                later = rows >= i2  # not yet given this block's updates
                if later.any() and i:
                    cur[later] -= u[i1:p, rows[later]].T @ err1[:i]
                scales[g], mn = search_grid(cur, hdiag[rows], symmetric, shrinks)
                if mins is not None:
                    mins[g] = mn
                entered[g] = True
            stored, deq = round_to_grid(w1[i], scales[g], None if mins is None else mins[g])
            q[p] = stored
            d = u[p, p]
            err = (w1[i] - deq) / d
            loss += 0.5 * float(err @ err)
            w1[i:] -= np.outer(u[p, p:i2], err)
            err1[i] = err
        if i2 < n_in:
            w[i2:] -= u[i1:i2, i2:].T @ err1
    out = np.empty_like(q)
    out[perm] = q
    return GPTQResult(q=out, scales=scales.astype(np.float16),
                      mins=None if mins is None else mins.astype(np.float16), loss=loss)


# ----------------------------------------------------------------------------- the model


def _check_args(group_size, symmetric, damp, block_size, clip_search, batch_size):
    Int4(group_size, symmetric)  # InputError for a bad group size / symmetric flag
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 <= damp < 1e6:
        raise InputError(f"damp must be a non-negative number, got {damp!r}")
    for name, v, least in (("block_size", block_size, 1), ("clip_search", clip_search, 0),
                           ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise InputError(f"{name} must be an integer of at least {least}, got {v!r}")


def _gptq_site(ws: list[np.ndarray], h: np.ndarray, tokens: int, kwargs: dict
               ) -> tuple[list[Int4Weight], float]:
    """The projections ws ([in, out_i] each) of one site (or of one expert of it) with input
    Hessian h [in, in] over `tokens` tokens -> (an `Int4Weight` per projection, GPTQ's loss).
    GPTQ quantizes them as one [in, sum(out_i)] matrix; with no token, round-to-nearest."""
    group_size, symmetric = kwargs["group_size"], kwargs["symmetric"]
    if not tokens:
        return [Int4Weight.from_float(jnp.asarray(w, jnp.float32), group_size, symmetric)
                for w in ws], 0.0
    res = gptq_matrix(np.concatenate(ws, axis=1), h, **kwargs)
    leaves, start = [], 0
    for w in ws:
        cols = slice(start, start + w.shape[1])
        start += w.shape[1]
        part = GPTQResult(q=res.q[:, cols], scales=res.scales[:, cols],
                          mins=None if res.mins is None else res.mins[:, cols], loss=0.0)
        leaves.append(part.leaf(group_size))
    return leaves, res.loss


def gptq_quantize(model, calib_ids, *, group_size: int = 128, symmetric: bool = True,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  clip_search: int = 0, sequential: bool = True, batch_size: int = 8,
                  progress: bool = True, stats: dict | None = None):
    """Params of `model` with every attention and MLP projection (those of
    `models.input_sites`: Llama q k v o gate up down, GPT-2 qkv o fc proj) replaced by an
    `Int4Weight` (stacked over layers) chosen by GPTQ on `calib_ids`.

    model: a `Model` (anything with .config and .params) with float projections.
    calib_ids: token windows (e.g. from `calibration_ids`): a list of lists of ids or an int
      array [n, T]; ragged windows are padded and the padding is left out.
    group_size, symmetric: the `Int4` grid; damp: fraction of mean(diag H) added to diag H;
    block_size: rows per lazy-update block; act_order: process rows by decreasing H[i, i];
    clip_search: try n range scales per group (see `gptq_matrix`; 0: the whole range).
    (On SmolLM2, act_order=True with clip_search=10 gave the best perplexity.)
    sequential: record layer l's inputs on the quantized layers before it (else float ones).
    batch_size: calibration windows per forward pass. stats: if a dict, gets "loss" per
      "layer/path" (GPTQ's loss of the site's merged matrix, under its first path; summed over
      the experts of an expert site) and "unrouted" (see `calibration.report_unrouted`).
    On MoE layers each expert is quantized over its routed tokens (see the module docstring).
    Everything else in params (embedding, norms, biases, LM head) is returned unchanged.
    InputError for a family without input sites, bad arguments or an already quantized
    projection.
    """
    config, params = model.config, model.params
    site_paths = sites(config)
    _check_args(group_size, symmetric, damp, block_size, clip_search, batch_size)
    layers = params["layers"]
    for projections in site_paths.values():
        for path in projections:
            leaf = paths.get(layers, path)
            if isinstance(leaf, QuantizedWeight) or not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise InputError(f"layers/{path}: GPTQ needs float weights, got "
                                 f"{type(leaf).__name__}")
            if leaf.shape[-2] % group_size:
                raise InputError(f"layers/{path}: int4 group size {group_size} does not divide "
                                 f"the input dimension {leaf.shape[-2]}")
    per_path: dict[str, list[Int4Weight]] = {p: [] for ps in site_paths.values() for p in ps}
    dtypes = {p: float_dtype_name(paths.get(layers, p).dtype) for p in per_path}
    kwargs = dict(group_size=group_size, symmetric=symmetric, damp=damp, block_size=block_size,
                  act_order=act_order, clip_search=clip_search)

    def quantize_layer(layer, lp, hessians):
        if stats is not None:
            stats.setdefault("loss", {})
        report_unrouted(hessians, layer, "round-to-nearest int4", stats)
        qlp = lp
        for site, projections in site_paths.items():
            ws = [np.asarray(paths.get(lp, p), np.float64) for p in projections]
            h = hessians[site]
            mean = h.mean()  # [in, in], or [E, in, in] for an expert site
            if is_expert_site(projections):
                per_expert = [_gptq_site([w[e] for w in ws], mean[e], h.tokens[e], kwargs)
                              for e in range(len(h.tokens))]
                leaves = [stack_leaves(parts) for parts in zip(*(p for p, _ in per_expert),
                                                               strict=True)]
                loss = sum(loss for _, loss in per_expert)
            else:
                leaves, loss = _gptq_site(ws, mean, h.tokens, kwargs)
            if stats is not None:
                stats["loss"][f"{layer}/{projections[0]}"] = loss
            for path, leaf in zip(projections, leaves, strict=True):
                leaf = leaf.replace(dtype=dtypes[path])
                per_path[path].append(leaf)
                qlp = paths.replace(qlp, path, leaf)
        return qlp

    run_layerwise(model, calib_ids, quantize_layer, sequential=sequential,
                  batch_size=batch_size, progress=progress, desc="gptq")
    out = params
    for path, leaves in per_path.items():
        out = paths.replace(out, "layers/" + path, stack_leaves(leaves))
    return out
