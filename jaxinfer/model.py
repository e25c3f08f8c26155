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


def pad_batch(token_ids) -> tuple[np.ndarray, np.ndarray]:
    """list[int] | list[list[int]] | array -> (tokens [B, T], positions [B, T]).

    Ragged rows are right-padded with token 0 at position -1 (masked out).
    """
    if isinstance(token_ids, np.ndarray | jax.Array):
        arr = np.asarray(token_ids)
        rows = [arr] if arr.ndim == 1 else list(arr)
    elif len(token_ids) and isinstance(token_ids[0], int | np.integer):
        rows = [token_ids]
    else:
        rows = list(token_ids)
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("token_ids must hold at least one non-empty row")
    t = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), t), np.int32)
    positions = np.full((len(rows), t), -1, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = np.asarray(r, np.int32)
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

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [B, T, V] of one full uncached forward pass over token_ids.

        token_ids: list[int] (one row), list[list[int]] or an int array [B, T]. Ragged rows are
        right-padded; logits at padded positions are meaningless.
        """
        tokens, positions = pad_batch(token_ids)
        vocab = self.config.vocab_size
        if tokens.max() >= vocab or tokens.min() < 0:
            raise InputError(f"token ids must lie in [0, {vocab})")
        if tokens.shape[1] > self.config.max_seq_len:
            raise InputError(f"sequence of {tokens.shape[1]} tokens exceeds the model's "
                             f"context of {self.config.max_seq_len}")
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
