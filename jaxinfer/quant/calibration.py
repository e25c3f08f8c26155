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

Hessians per site: [in, in] of the site's input width (attn_in, mlp_in: D; o_in: N*H;
down_in: F).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.model import pad_batch


def sites(config) -> dict[str, tuple[str, ...]]:
    """`models.input_sites(config)`: site -> the projection paths (under one layer's params)
    reading it, the first one recording. InputError for a family that declares none."""
    if getattr(config, "n_experts", 0):
        raise InputError("calibration (GPTQ, Wanda, structured pruning) does not run on "
                         "mixture-of-experts layers (each expert sees only the tokens routed "
                         "to it); quantize with round-to-nearest (--method rtn) or prune by "
                         "magnitude instead")
    try:
        return models.input_sites(config)
    except TypeError:
        raise InputError(f"calibration needs a model family that declares its layers' input "
                         f"sites; {type(config).__name__} declares none") from None


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


def _gram(x, mask):
    """x [..., d] (rows where mask is 0 left out) -> x^T x [d, d] float32."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * mask.reshape(-1, 1)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


class HessianRecorder:
    """A weight leaf for `models.layers.linear`: returns x @ w, and when it has a `site`, puts
    x^T x (over the tokens where `mask` is 1) into `grams[site]`.

    It is made inside a traced (jitted) function, so `grams` collects traced values that the
    function returns: recording is a side effect at trace time only.
    """

    def __init__(self, w, grams: dict, site: str | None, mask):
        self.w, self.grams, self.site, self.mask = w, grams, site, mask

    def matmul(self, x: jax.Array) -> jax.Array:
        if self.site is not None:
            self.grams[self.site] = _gram(x, self.mask)
        return x @ self.w.astype(x.dtype)


class Hessian:
    """H = sum over tokens of x^T x (float64) for one input site."""

    def __init__(self, dim: int):
        self.h = np.zeros((dim, dim), np.float64)
        self.tokens = 0

    def add(self, gram, tokens: int) -> None:
        self.h += np.asarray(gram, np.float64)
        self.tokens += int(tokens)

    def mean(self) -> np.ndarray:
        """H / number of tokens (GPTQ's damping is relative to diag(H) anyway)."""
        return self.h / max(self.tokens, 1)


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
    """Layer output [B, T, D] and {site: x^T x} of one batch (padding, position -1, left out)."""
    grams: dict = {}
    mask = (positions >= 0).astype(jnp.float32)
    rec = lp
    for site, site_paths in sites(config).items():
        for j, path in enumerate(site_paths):
            recorder = HessianRecorder(paths.get(lp, path), grams, site if j == 0 else None, mask)
            rec = paths.replace(rec, path, recorder)
    return models.apply_layer(config, rec, x, positions, layer), grams


def layer_hessians(config, lp, x, positions, layer: int, batch_size: int = 8):
    """Run layer `layer` (float params lp) over x [n, T, D] with every projection recording
    its input. Returns ({site: Hessian}, the layer's output [n, T, D])."""
    positions = np.asarray(positions)
    hessians = {site: Hessian(paths.get(lp, site_paths[0]).shape[0])
                for site, site_paths in sites(config).items()}
    outs = []
    for i in range(0, x.shape[0], batch_size):
        pos = positions[i:i + batch_size]
        y, grams = _recorded_layer(config, lp, x[i:i + batch_size], jnp.asarray(pos),
                                   jnp.int32(layer))
        for site, h in hessians.items():
            h.add(grams[site], (pos >= 0).sum())
        outs.append(y)
    return hessians, jnp.concatenate(outs, axis=0)


def run_layerwise(model, calib_ids, visit, *, sequential: bool = True, batch_size: int = 8,
                  progress: bool = True, desc: str = "calibrate") -> None:
    """Run a model's layers one at a time over calibration windows (any family with input
    sites, see `sites`; calib_ids: token windows as `jaxinfer.model.pad_batch` takes them).

    For each layer: record the Hessians of its input sites on the current inputs x [n, T, D],
    then call `visit(layer, lp, hessians) -> lp2`, where lp is the layer's params (float32) and
    lp2 the params the layer continues with (quantized, pruned, or lp itself). sequential: the
    next layer's inputs are lp2's outputs (one more pass over the layer); otherwise lp's
    outputs, recorded in the same pass as the Hessians.
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
    quantization: every layer's inputs come from the float layers before it)."""
    out = []

    def visit(layer, lp, hessians):
        out.append({site: h.mean() for site, h in hessians.items()})
        return lp

    run_layerwise(model, calib_ids, visit, sequential=False, batch_size=batch_size,
                  progress=False)
    return out
