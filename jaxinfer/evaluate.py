"""Perplexity of a model on a token sequence, by the sliding-window method.

This is the method of the Hugging Face guide "Perplexity of fixed-length models": windows of
`context` tokens start at 0, stride, 2*stride, ...; the last window is the first one that reaches
the end of the text (it may be shorter than `context`). Each window is one independent forward
pass over its own tokens (positions restart at 0), and it scores only the tokens that the
previous window did not score, each predicted from the logits of the token before it inside
the window. So the first window scores all its tokens but the first, and every token after the
first window is predicted with at least `context - stride` tokens of context.

With stride < context every token but the first is scored exactly once (len(ids) - 1 tokens).
With stride == context (non-overlapping windows) the first token of each window has no context
inside its window and is not scored, as in the guide: len(ids) - number_of_windows tokens.

Unlike the guide's loop, the result is the exact mean over the scored tokens (the guide weighs
each window's mean loss by an approximate token count).

Several windows run per call, always as a [batch_size, context] block (short windows and the
rows of a last, partial batch are padded with position -1 and excluded), so the forward pass
compiles once per (config, batch_size, context).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import models
from jaxinfer.errors import InputError


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(config, params, tokens, positions, targets, scored):
    """Summed negative log-likelihood per row: [B] float32.

    tokens, positions, targets [B, T] int32; scored [B, T] bool. targets[b, t] is the token that
    the logits at column t predict; only columns with scored set count.
    """
    logits = models.forward(config, params, tokens, positions)[0].astype(jnp.float32)
    # log_softmax(logits)[target] = logits[target] - logsumexp(logits), in float32, without
    # materialising the [B, T, V] log-probabilities.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.sum(jnp.where(scored, nll, 0.0), axis=-1)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window method: (begin, end, first_scored) per window.

    The window's tokens are ids[begin:end]; it scores the tokens ids[first_scored:end], each
    predicted from the logits at the position before it. Windows that would score nothing
    (a last window of one token when stride == context) are left out.
    """
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _check(model, ids: np.ndarray, context: int, stride: int, batch_size: int) -> None:
    max_len = model.config.max_seq_len
    if not isinstance(context, int | np.integer) or context < 2:
        raise InputError(f"context must be an integer of at least 2, got {context!r}")
    if context > max_len:
        raise InputError(f"context {context} exceeds the model's context of {max_len}")
    if not isinstance(stride, int | np.integer) or not 1 <= stride <= context:
        raise InputError(f"stride must be an integer in [1, context={context}], got {stride!r}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if ids.ndim != 1:
        raise InputError(f"token_ids must be one sequence of token ids, got shape {ids.shape}")
    if len(ids) < 2:
        raise InputError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"token ids must be integers, got {ids.dtype}")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"token ids must lie in [0, {vocab})")


def perplexity(model, token_ids, *, context: int = 512, stride: int = 256, batch_size: int = 4,
               progress: bool = True) -> dict:
    """Sliding-window perplexity of `model` on token_ids (see the module docstring).

    Returns {"perplexity": exp(nll), "tokens": number of tokens scored, "nll": mean negative
    log-likelihood per scored token (nats)}.
    """
    ids = np.asarray(token_ids)
    if ids.size == 0:
        ids = ids.astype(np.int32)
    _check(model, ids, context, stride, batch_size)
    ids = ids.astype(np.int32)
    windows = sliding_windows(len(ids), context, stride)

    total_nll = 0.0
    total_tokens = 0
    with tqdm(total=len(windows), desc="perplexity", unit="window", delay=1,
              disable=not progress) as bar:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            tokens = np.zeros((batch_size, context), np.int32)
            positions = np.full((batch_size, context), -1, np.int32)
            targets = np.zeros((batch_size, context), np.int32)
            scored = np.zeros((batch_size, context), bool)
            for row, (begin, end, first) in enumerate(chunk):
                n = end - begin
                tokens[row, :n] = ids[begin:end]
                positions[row, :n] = np.arange(n)
                targets[row, :n - 1] = ids[begin + 1:end]  # column t predicts token t + 1
                scored[row, first - begin - 1:n - 1] = True
                total_tokens += end - first
            sums = _window_nll(model.config, model.params, jnp.asarray(tokens),
                               jnp.asarray(positions), jnp.asarray(targets), jnp.asarray(scored))
            total_nll += float(np.sum(np.asarray(sums, np.float64)))
            bar.update(len(chunk))

    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "tokens": total_tokens, "nll": nll}


def perplexity_text(model, text: str, *, max_tokens: int | None = None, **kw) -> dict:
    """perplexity() of `text` encoded as every prompt is (`text.encode_prompt`: BOS first when
    the tokenizer adds one); max_tokens: score only the first N tokens. Keyword arguments go
    to perplexity()."""
    from jaxinfer.text import encode_prompt

    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    ids = encode_prompt(model, text)[:max_tokens] if text else []
    if len(ids) < 2:
        raise InputError(f"text encodes to {len(ids)} token(s); perplexity needs at least 2")
    return perplexity(model, ids, **kw)
