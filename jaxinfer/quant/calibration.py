"""Calibration for GPTQ, Wanda and structured pruning: token windows of real text, and the
inputs each projection sees.

`calibration_ids(model, text, n_samples, seq_len)` cuts the tokenized text into windows.

The layers of a Llama-family model are run one at a time (not scanned) by applying
`models.llama.Block` to one layer's slice of the stacked params, feeding the residual stream
forward (no cache, positions 0..T-1). To see what each projection multiplies, its weight is
replaced in that layer's params by a `HessianRecorder`: a leaf whose `matmul(x)` (called by
`models.layers.linear`) returns x @ w, so the layer computes what it always computes, and also
emits x^T x. The recorders are built inside a jitted function, which returns the layer output
and the per-batch x^T x; those are summed in float64 numpy over all calibration tokens.
Projections that share an input (q/k/v, gate/up) share one Hessian, computed once.
`run_layerwise` drives this layer by layer and hands each layer's Hessians to a callback
(GPTQ quantizes the layer, Wanda prunes it, structured pruning only reads them).

Sites (per layer) and the projections that read them:
  attn_in   rms_norm(x) -> attn/q, attn/k, attn/v       [D, D]
  o_in      attention output -> attn/o                 [N*H, N*H]
  mlp_in    rms_norm(x) -> mlp/gate, mlp/up              [D, D]
  down_in   silu(gate) * up -> mlp/down                 [F, F]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from jaxinfer.errors import InputError
from models.layers import NO_WINDOW, embed_lookup
from models.llama import Block

# site -> projections (paths under a layer's params) reading it; the first one records.
SITES = {
    "attn_in": ("attn/q", "attn/k", "attn/v"),
    "o_in": ("attn/o",),
    "mlp_in": ("mlp/gate", "mlp/up"),
    "down_in": ("mlp/down",),
}
PROJECTIONS = tuple(p for paths in SITES.values() for p in paths)


def check_family(config) -> None:
    """InputError unless `config` is a Llama-family config (the only one GPTQ supports)."""
    if not isinstance(config, models.LlamaConfig):
        raise InputError(f"GPTQ supports the Llama family, not {type(config).__name__} "
                         f"({getattr(config, 'family', '?')})")


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


def as_token_batch(calib_ids, config) -> tuple[np.ndarray, np.ndarray]:
    """Windows (list of lists of ids, or an int array [n, T]) -> (tokens, positions) [n, T].

    Ragged windows are right-padded with position -1 (left out of every Hessian).
    """
    if isinstance(calib_ids, np.ndarray | jax.Array):
        arr = np.asarray(calib_ids)
        rows = [arr] if arr.ndim == 1 else list(arr)
    else:
        try:
            rows = [np.asarray(r) for r in calib_ids]
        except TypeError:
            raise InputError("calibration ids must be a list of token windows") from None
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise InputError("calibration ids must be one or more non-empty windows of token ids")
    if any(not np.issubdtype(r.dtype, np.integer) for r in rows):
        raise InputError("calibration token ids must be integers")
    t = max(len(r) for r in rows)
    if t > config.max_seq_len:
        raise InputError(f"a calibration window of {t} tokens exceeds the model's context of "
                         f"{config.max_seq_len}")
    tokens = np.zeros((len(rows), t), np.int32)
    positions = np.full((len(rows), t), -1, np.int32)
    for i, r in enumerate(rows):
        if r.min() < 0 or r.max() >= config.vocab_size:
            raise InputError(f"calibration token ids must lie in [0, {config.vocab_size})")
        tokens[i, :len(r)] = r
        positions[i, :len(r)] = np.arange(len(r))
    return tokens, positions


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


def get_path(tree, path: str):
    """The leaf of nested dict `tree` at "a/b/c"."""
    for k in path.split("/"):
        tree = tree[k]
    return tree


def with_path(tree, path: str, value):
    """A copy of nested dict `tree` with the leaf at `path` replaced (other leaves shared)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = with_path(tree[head], rest, value) if rest else value
    return out


def layer_params(params, layer: int, float32: bool = False):
    """Layer `layer`'s slice of the stacked per-layer params (quantized leaves sliced too);
    float32: float arrays cast to float32 (calibration runs in float32)."""
    def take(a):
        a = a[layer]
        return a.astype(jnp.float32) if float32 and jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(take, params["layers"])


def layer_window(config, layer: int) -> int:
    windows = config.sliding_windows
    w = None if windows is None else windows[layer]
    return NO_WINDOW if w is None else int(w)


def embed_tokens(config, params, tokens: np.ndarray) -> jax.Array:
    """The residual stream entering layer 0: x [n, T, D] float32."""
    return embed_lookup(params["embed"], jnp.asarray(tokens)).astype(jnp.float32)


def _apply_block(config, lp, x, positions, layer, window):
    """One decoder layer, no cache: x [B, T, D] -> [B, T, D]."""
    pos = jnp.asarray(positions)
    (y, _), _ = Block(config).apply({"params": lp}, (x, None),
                                    (jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)),
                                    pos, pos, None)
    return y


_apply_block_jit = jax.jit(_apply_block, static_argnums=(0,))


def run_layer(config, lp, x, positions, layer: int, batch_size: int = 8) -> jax.Array:
    """Layer `layer` (params lp, float or quantized leaves) over x [n, T, D], in batches."""
    window = jnp.int32(layer_window(config, layer))
    positions = jnp.asarray(positions)
    outs = [_apply_block_jit(config, lp, x[i:i + batch_size], positions[i:i + batch_size],
                             jnp.int32(layer), window)
            for i in range(0, x.shape[0], batch_size)]
    return jnp.concatenate(outs, axis=0)


@functools.partial(jax.jit, static_argnums=(0,))
def _recorded_block(config, lp, x, positions, layer, window):
    """Layer output and {site: x^T x} of one batch (padding, position -1, left out)."""
    grams: dict = {}
    mask = (positions >= 0).astype(jnp.float32)
    rec = lp
    for site, paths in SITES.items():
        for j, path in enumerate(paths):
            recorder = HessianRecorder(get_path(lp, path), grams, site if j == 0 else None, mask)
            rec = with_path(rec, path, recorder)
    y = _apply_block(config, rec, x, positions, layer, window)
    return y, grams


def layer_hessians(config, lp, x, positions, layer: int, batch_size: int = 8):
    """Run layer `layer` (float params lp) over x [n, T, D] with every projection recording
    its input. Returns ({site: Hessian}, the layer's output [n, T, D])."""
    positions = np.asarray(positions)
    hessians = {site: Hessian(get_path(lp, paths[0]).shape[0]) for site, paths in SITES.items()}
    window = layer_window(config, layer)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        pos = positions[i:i + batch_size]
        y, grams = _recorded_block(config, lp, x[i:i + batch_size], jnp.asarray(pos),
                                   jnp.int32(layer), jnp.int32(window))
        for site, h in hessians.items():
            h.add(grams[site], (pos >= 0).sum())
        outs.append(y)
    return hessians, jnp.concatenate(outs, axis=0)


def run_layerwise(model, calib_ids, visit, *, sequential: bool = True, batch_size: int = 8,
                  progress: bool = True, desc: str = "calibrate") -> None:
    """Run a Llama-family model's layers one at a time over calibration windows.

    For each layer: record the Hessians of its input sites on the current inputs x [n, T, D],
    then call `visit(layer, lp, hessians) -> lp2`, where lp is the layer's params (float32) and
    lp2 the params the layer continues with (quantized, pruned, or lp itself). sequential: the
    next layer's inputs are lp2's outputs (one more pass over the layer); otherwise lp's
    outputs, recorded in the same pass as the Hessians.
    """
    config, params = model.config, model.params
    check_family(config)
    tokens, positions = as_token_batch(calib_ids, config)
    x = embed_tokens(config, params, tokens)
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
