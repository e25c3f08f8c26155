"""`Model`: a loaded checkpoint — config, params, tokenizer — and its uncached forward pass."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from jaxinfer.errors import InputError


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(config, params, tokens, positions):
    return models.forward(config, params, tokens, positions)[0]


def _rows(token_ids) -> list[np.ndarray]:
    """token_ids as a list of 1-D arrays (one per row; InputError if it is not a sequence)."""
    if isinstance(token_ids, np.ndarray | jax.Array):
        arr = np.asarray(token_ids)
        return [arr] if arr.ndim <= 1 else list(arr)
    try:
        items = list(token_ids)
        if items and all(isinstance(t, int | np.integer) for t in items):
            return [np.asarray(items)]
        return [np.asarray(r) for r in items]
    except (TypeError, ValueError):
        raise InputError("token ids must be a list of ints, a list of such rows or an int "
                         "array [B, T]") from None


def pad_batch(token_ids, config=None) -> tuple[np.ndarray, np.ndarray]:
    """list[int] (one row) | list[list[int]] | int array [T] or [B, T] -> (tokens [B, T],
    positions [B, T]) int32, the one builder of token batches (Model.logits, calibration).

    Ragged rows are right-padded with token 0 at position -1 (masked out). InputError unless
    every row is a non-empty 1-D sequence of integers; with a model `config`, also unless the
    ids lie in [0, vocab_size) and no row is longer than max_seq_len.
    """
    rows = _rows(token_ids)
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise InputError("token ids must hold one or more non-empty rows of token ids")
    bad = next((r.dtype for r in rows if not np.issubdtype(r.dtype, np.integer)), None)
    if bad is not None:
        raise InputError(f"token ids must be integers, got {bad}")
    t = max(len(r) for r in rows)
    if config is not None:
        if any(r.min() < 0 or r.max() >= config.vocab_size for r in rows):
            raise InputError(f"token ids must lie in [0, {config.vocab_size})")
        if t > config.max_seq_len:
            raise InputError(f"a row of {t} tokens exceeds the model's context of "
                             f"{config.max_seq_len}")
    tokens = np.zeros((len(rows), t), np.int32)
    positions = np.full((len(rows), t), -1, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        positions[i, :len(r)] = np.arange(len(r))
    return tokens, positions


@dataclasses.dataclass
class Model:
    """A loaded model. `params` is a pytree that transforms (quantize, shard) may replace."""

    config: models.ModelConfig
    params: Any
    tokenizer: Any | None  # jaxinfer.tokenizer.Tokenizer, or None when the checkpoint has none
    source: str = ""
    eos_token_ids: tuple[int, ...] = ()
    # sampling knobs the checkpoint sets (jaxinfer.sampling.checkpoint_defaults); the CLI and
    # the server fill the others from jaxinfer.sampling.FALLBACK
    sampling_defaults: dict = dataclasses.field(default_factory=dict)
    # (params, the same params in the layout generation runs with): made on first use by
    # `jaxinfer.generate.run_params`; not an init field, so dataclasses.replace(model, ...)
    # starts without it.
    run_cache: tuple | None = dataclasses.field(default=None, init=False, repr=False,
                                                compare=False)
    # (params, the converted-cache entry they are a memory map of or were written to): set by
    # the loader, so that `run_params` can keep the run layout beside that entry; not an init
    # field either, so a model with other params does not claim it.
    converted: tuple | None = dataclasses.field(default=None, init=False, repr=False,
                                                compare=False)

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [B, T, V] of one full uncached forward pass over token_ids.

        token_ids: list[int] (one row), list[list[int]] or an int array [B, T]. Ragged rows are
        right-padded; logits at padded positions are meaningless.
        """
        tokens, positions = pad_batch(token_ids, self.config)
        out = _full_logits(self.config, self.params, jnp.asarray(tokens), jnp.asarray(positions))
        return np.asarray(out, dtype=np.float32)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render chat messages with the checkpoint's own template."""
        if self.tokenizer is None:
            raise InputError(f"{self.source}: this checkpoint has no tokenizer or chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, **kwargs)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all parameter buffers."""
        return sum(x.nbytes for x in jax.tree.leaves(self.params))
