"""Calibration for GPTQ, Wanda and structured pruning: token windows of real text, and the
inputs each projection sees.

`calibration_ids(model, text, n_samples, seq_len)` cuts the tokenized text into windows.

The layers are run one at a time through the models' per-layer API (`models.embed`,
`models.apply_layer` on one layer's slice of the stacked params, no cache, positions 0..T-1),
feeding the residual stream forward. Which projections of a layer multiply which input is the
family's declaration, `models.input_sites` (Llama: attn_in -> q, k, v; o_in -> o; mlp_in ->
gate, up; down_in -> down. GPT-2: attn_in -> qkv; o_in -> o; mlp_in -> fc; down_in -> proj).
To see what each projection multiplies, its weight is replaced in that layer's params by a
`HessianRecorder`: a leaf whose `matmul(x)` (called by `models.layers.linear`) returns x @ w,
so the layer computes what it always computes, and also emits x^T x. The recorders are built
inside a jitted function, which returns the layer output and the per-batch x^T x; those are
summed in float64 numpy over all calibration tokens. Projections that share an input share one
Hessian, computed once. `run_layerwise` drives this layer by layer and hands each layer's
Hessians to a callback (GPTQ quantizes the layer, Wanda prunes it, structured pruning only
reads them).

Mixture-of-experts layers (`models.moe`, every expert run on every token): their mlp_in and
down_in sites are expert stacks [E, in, out], and expert e's Hessian sums x x^T over the tokens
routed to it only: the router's weight is replaced by a `RouterRecorder`, which routes its
logits with the model's own `models.moe.routing` (token n goes to expert e where its weight is
> 0: the tokens whose output expert e changes), and the experts' recorders keep those tokens.
For down_in, x is expert e's own hidden activation. An expert no calibration token reaches has
an empty Hessian (tokens 0): `report_unrouted` warns, and the caller falls back (GPTQ:
round-to-nearest; Wanda: magnitude).

Hessians per site: [in, in] of the site's input width (attn_in, mlp_in: D; o_in: N*H;
down_in: F), [E, in, in] for an expert site.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.model import pad_batch
from models.moe import routing


def sites(config) -> dict[str, tuple[str, ...]]:
    """`models.input_sites(config)`: site -> the projection paths (under one layer's params)
    reading it, the first one recording. InputError for a family that declares none."""
    try:
        return models.input_sites(config)
    except TypeError:
        raise InputError(f"calibration needs a model family that declares its layers' input "
                         f"sites; {type(config).__name__} declares none") from None


def is_expert_site(site_paths: tuple[str, ...]) -> bool:
    """Whether a site's projections are expert stacks [E, in, out] (an `experts` axis before
    their matrix, `paths.matrix_lead`), each expert seeing only its routed tokens."""
    return paths.matrix_lead("layers/" + site_paths[0]) > 1


# ----------------------------------------------------------------------------- calibration data


def calibration_ids(model, text: str, n_samples: int, seq_len: int) -> list[list[int]]:
    """`n_samples` windows of `seq_len` token ids cut from the start of `text`, one after another
    (no overlap), encoded by the model's tokenizer.

    InputError when the model has no tokenizer, the numbers are not positive, seq_len exceeds
    the model's context, or the text holds fewer than n_samples * seq_len tokens.
    """
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(text, str):
        raise InputError(f"calibration text must be a string, got {type(text).__name__}")
    if model.tokenizer is None:
        raise InputError(f"{model.source or 'model'}: this checkpoint has no tokenizer to "
                         "encode calibration text")
    if seq_len > model.config.max_seq_len:
        raise InputError(f"seq_len {seq_len} exceeds the model's context of "
                         f"{model.config.max_seq_len}")
    need = n_samples * seq_len
    # Encode only about as much text as needed (a generous 16 characters per token), then all.
    ids = model.tokenizer.encode(text[:need * 16]) if len(text) > need * 16 else None
    if ids is None or len(ids) < need:
        ids = model.tokenizer.encode(text)
    if len(ids) < need:
        raise InputError(f"calibration text is too short: {len(text)} characters encode to "
                         f"{len(ids)} tokens, but {n_samples} samples x {seq_len} tokens need "
                         f"{need}")
    return [list(map(int, ids[i * seq_len:(i + 1) * seq_len])) for i in range(n_samples)]


# ----------------------------------------------------------------------------- recording


_ROUTED = "routed"  # grams key of the routing mask [N, E], between the recorders of one layer


def _gram(x, mask):
    """x [..., d] (rows where mask is 0 left out) -> x^T x [d, d] float32."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * mask.reshape(-1, 1)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def _expert_gram(x, routed):
    """Per expert, x^T x over its routed tokens: x [1 or E, N, d] (one input for all experts,
    or each expert's own), routed [N, E] (1 = routed, padding 0) -> [E, d, d] float32."""
    x = jnp.broadcast_to(x.astype(jnp.float32), (routed.shape[1], *x.shape[-2:]))
    return jnp.einsum("enc,end->ecd", x * routed.T[:, :, None], x,
                      precision=jax.lax.Precision.HIGHEST)


class HessianRecorder:
    """A weight leaf for `models.layers.linear`: returns x @ w, and when it has a `site`, puts
    (x^T x, tokens) over the tokens where `mask` [B, T] is 1 into `grams[site]`.

    experts: w is an expert stack [E, in, out] and x [1 or E, N, in] (`models.moe`); x^T x is
    then per expert over its routed tokens ([E, in, in], tokens [E]), from the routing mask a
    `RouterRecorder` put in `grams` (the router runs before the experts).
    It is made inside a traced (jitted) function, so `grams` collects traced values that the
    function returns: recording is a side effect at trace time only.
    """

    def __init__(self, w, grams: dict, site: str | None, mask, experts: bool = False):
        self.w, self.grams, self.site, self.mask, self.experts = w, grams, site, mask, experts

    def matmul(self, x: jax.Array) -> jax.Array:
        if self.site is not None and self.experts:
            if _ROUTED not in self.grams:
                raise RuntimeError(f"{self.site}: the experts ran before their router")
            routed = self.grams[_ROUTED]
            self.grams[self.site] = (_expert_gram(x, routed), routed.sum(0))
        elif self.site is not None:
            self.grams[self.site] = (_gram(x, self.mask), self.mask.sum())
        return x @ self.w.astype(x.dtype)


class RouterRecorder:
    """The router's weight leaf [D, E]: returns its logits x @ w (x [N, D], the MoE layer's
    tokens in the order of `mask` [B, T]) and puts the routing mask [N, E] (1 where
    `models.moe.routing` gives the token a weight > 0 and it is not padding) in `grams`."""

    def __init__(self, w, grams: dict, config, mask):
        self.w, self.grams, self.config, self.mask = w, grams, config, mask

    def matmul(self, x: jax.Array) -> jax.Array:
        logits = x @ self.w.astype(x.dtype)
        chosen = (routing(self.config, logits) > 0).astype(jnp.float32)
        self.grams[_ROUTED] = chosen * self.mask.reshape(-1, 1)
        return logits


class Hessian:
    """H = sum over tokens of x^T x (float64) for one input site: h [in, in] and tokens (an
    int), or for an expert site (experts = E) h [E, in, in] and tokens [E], each expert's sum
    over the tokens routed to it."""

    def __init__(self, dim: int, experts: int = 0):
        self.h = np.zeros((experts, dim, dim) if experts else (dim, dim), np.float64)
        self.tokens = np.zeros(experts, np.int64) if experts else 0

    def add(self, gram, tokens) -> None:
        self.h += np.asarray(gram, np.float64)
        tokens = np.asarray(tokens).round().astype(np.int64)
        self.tokens = self.tokens + (tokens if tokens.ndim else int(tokens))

    def mean(self) -> np.ndarray:
        """H / number of tokens, per expert for an expert site (GPTQ's damping is relative to
        diag(H) anyway): [in, in] or [E, in, in]."""
        n = np.maximum(self.tokens, 1)
        return self.h / (n[:, None, None] if self.h.ndim == 3 else n)

    def unrouted(self) -> list[int]:
        """The experts no calibration token reached (empty for a dense site)."""
        return [int(e) for e in np.flatnonzero(self.tokens == 0)] if self.h.ndim == 3 else []


def report_unrouted(hessians: dict, layer: int, fallback: str, stats: dict | None = None):
    """Warn once about the experts of layer `layer` that no calibration token reached (their
    weights get `fallback`, e.g. "round-to-nearest int4"), and list them per site in
    stats["unrouted"]["<layer>/<site>"] when stats is a dict."""
    unrouted = {site: h.unrouted() for site, h in hessians.items() if h.unrouted()}
    if not unrouted:
        return
    experts = sorted(set().union(*unrouted.values()))
    warnings.warn(f"layer {layer}: experts {experts} received no calibration token; {fallback} "
                  "for them", stacklevel=2)
    if stats is not None:
        for site, ex in unrouted.items():
            stats.setdefault("unrouted", {})[f"{layer}/{site}"] = ex


# ----------------------------------------------------------------------------- layers


def layer_params(params, layer: int, float32: bool = False):
    """Layer `layer`'s slice of the stacked per-layer params (quantized leaves sliced too);
    float32: float arrays cast to float32 (calibration runs in float32)."""
    def take(a):
        a = a[layer]
        return a.astype(jnp.float32) if float32 and jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(take, params["layers"])


def embed_tokens(config, params, tokens: np.ndarray, positions: np.ndarray) -> jax.Array:
    """The residual stream entering layer 0 (`models.embed`): tokens, positions [n, T] ->
    x [n, T, D] float32."""
    x = models.embed(config, params, jnp.asarray(tokens), jnp.asarray(positions))
    return x.astype(jnp.float32)


_apply_layer = jax.jit(models.apply_layer, static_argnums=0)


def run_layer(config, lp, x, positions, layer: int, batch_size: int = 8) -> jax.Array:
    """Layer `layer` (params lp, float or quantized leaves) over x [n, T, D], in batches."""
    positions = jnp.asarray(positions)
    outs = [_apply_layer(config, lp, x[i:i + batch_size], positions[i:i + batch_size],
                         jnp.int32(layer))
            for i in range(0, x.shape[0], batch_size)]
    return jnp.concatenate(outs, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _recorded_layer(config, lp, x, positions, layer):
    """Layer output [B, T, D] and {site: (x^T x, tokens)} of one batch (padding, position -1,
    left out; see `HessianRecorder`)."""
    grams: dict = {}
    mask = (positions >= 0).astype(jnp.float32)
    rec = lp
    router = models.router(config)
    if router is not None:
        rec = paths.replace(rec, router, RouterRecorder(paths.get(lp, router), grams, config,
                                                        mask))
    for site, site_paths in sites(config).items():
        experts = is_expert_site(site_paths)
        for j, path in enumerate(site_paths):
            recorder = HessianRecorder(paths.get(lp, path), grams, site if j == 0 else None,
                                       mask, experts)
            rec = paths.replace(rec, path, recorder)
    y = models.apply_layer(config, rec, x, positions, layer)
    grams.pop(_ROUTED, None)
    return y, grams


def layer_hessians(config, lp, x, positions, layer: int, batch_size: int = 8):
    """Run layer `layer` (float params lp) over x [n, T, D] with every projection recording
    its input. Returns ({site: Hessian}, the layer's output [n, T, D])."""
    hessians = {}
    for site, site_paths in sites(config).items():
        shape = paths.get(lp, site_paths[0]).shape  # [in, out] or experts [E, in, out]
        hessians[site] = Hessian(shape[-2], shape[0] if is_expert_site(site_paths) else 0)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        y, grams = _recorded_layer(config, lp, x[i:i + batch_size],
                                   jnp.asarray(positions[i:i + batch_size]), jnp.int32(layer))
        for site, h in hessians.items():
            h.add(*grams[site])
        outs.append(y)
    return hessians, jnp.concatenate(outs, axis=0)


def run_layerwise(model, calib_ids, visit, *, sequential: bool = True, batch_size: int = 8,
                  progress: bool = True, desc: str = "calibrate") -> None:
    """Run a model's layers one at a time over calibration windows (any family with input
    sites, see `sites`; calib_ids: token windows as `jaxinfer.model.pad_batch` takes them).

    For each layer: record the Hessians of its input sites on the current inputs x [n, T, D]
    (per expert on a MoE layer's expert sites, see `Hessian`), then call
    `visit(layer, lp, hessians) -> lp2`, where lp is the layer's params (float32) and lp2 the
    params the layer continues with (quantized, pruned, or lp itself). sequential: the next
    layer's inputs are lp2's outputs (one more pass over the layer); otherwise lp's outputs,
    recorded in the same pass as the Hessians.
    """
    config, params = model.config, model.params
    sites(config)  # InputError for a family without sites, before any work
    tokens, positions = pad_batch(calib_ids, config)
    x = embed_tokens(config, params, tokens, positions)
    for layer in tqdm(range(config.n_layers), desc=desc, unit="layer", delay=1,
                      disable=not progress):
        lp = layer_params(params, layer, float32=True)
        hessians, y = layer_hessians(config, lp, x, positions, layer, batch_size)
        lp2 = visit(layer, lp, hessians)
        del hessians
        x = run_layer(config, lp2, x, positions, layer, batch_size) if sequential else y


def collect_hessians(model, calib_ids, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Per layer, {site: mean x^T x} of the float model on the calibration windows (no
    quantization: every layer's inputs come from the float layers before it): [in, in], or
    [E, in, in] for an expert site (each expert's mean over its routed tokens; zeros for an
    expert no token reached)."""
    out = []

    def visit(layer, lp, hessians):
        out.append({site: h.mean() for site, h in hessians.items()})
        return lp

    run_layerwise(model, calib_ids, visit, sequential=False, batch_size=batch_size,
                  progress=False)
    return out
