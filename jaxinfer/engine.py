"""The on-device decode loop, kept apart from the model: it only calls `models.forward`.

`prefill` runs the (left-padded) prompts through the model once, filling a preallocated KV
cache, and draws the first token. `decode` then runs `lax.while_loop` on the device until every
row is finished or the step limit of this call is reached; calling it again continues (that is
how text is streamed and stop strings are checked between chunks). All sampling knobs, stop ids,
the token budget and the step limit are traced values: changing them never recompiles. Static
shapes (batch, prompt bucket, cache length, token buffer) are bucketed by the caller.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

import models
from jaxinfer import kernels
from jaxinfer.sampling import SamplingArrays, sample
from models.cache import logical


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; one row per slot. N is the token buffer length.

    Each field declares its logical axes once (`models.cache.logical`); the sharding and pmap
    placements derive their per-field rules from them (host=True: read back by the host).
    """

    cache: models.KVCache = flax.struct.field(metadata={"struct": True})  # axes of its own
    tokens: jax.Array = logical("batch", "sequence", host=True)  # [B, N] int32 generated ids
    logprobs: jax.Array = logical("batch", "sequence", host=True)  # [B, N] float32 of those ids
    last: jax.Array = logical("batch", host=True)  # [B] int32 last token, fed at the next step
    next_pos: jax.Array = logical("batch")  # [B] int32 position of `last`
    seen: jax.Array = logical("batch", "vocab")  # [B, V] bool seen (for the repetition penalty)
    length: jax.Array = logical("batch", host=True)  # [B] int32 tokens generated per row
    done: jax.Array = logical("batch", host=True)  # [B] bool row finished
    hit_stop: jax.Array = logical("batch", host=True)  # [B] bool row ended on a stop token
    step: jax.Array = logical(host=True)  # [] int32 decode steps taken (tokens drawn per live row)
    sampling: SamplingArrays = logical("batch")  # each leaf [B]
    stop_ids: jax.Array = logical(None)  # [E] int32 stop token ids (-1 = unused)
    max_new: jax.Array = logical()  # [] int32 token budget per row


def _record(state: DecodeState, tok: jax.Array, logp: jax.Array) -> DecodeState:
    """Append tok/logp [B] to the rows still running and update their finished flags."""
    live = ~state.done
    rows = jnp.arange(tok.shape[0])
    idx = jnp.where(live, state.length, state.tokens.shape[1])  # out of range -> dropped
    tokens = state.tokens.at[rows, idx].set(tok, mode="drop")
    logprobs = state.logprobs.at[rows, idx].set(logp, mode="drop")
    length = state.length + live.astype(jnp.int32)
    is_stop = jnp.any(tok[:, None] == state.stop_ids[None, :], axis=-1) & live
    done = state.done | is_stop | (length >= state.max_new)
    return state.replace(tokens=tokens, logprobs=logprobs, length=length, done=done,
                         hit_stop=state.hit_stop | is_stop, last=tok,
                         seen=state.seen.at[rows, tok].set(True), step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "buf_len", "scan_unroll",
                                             "kv_cache", "shard"))
def prefill(params, prompt: jax.Array, positions: jax.Array, sampling: SamplingArrays,
            stop_ids: jax.Array, max_new: jax.Array, active: jax.Array, *, config,
            cache_len: int, buf_len: int, scan_unroll: int = 1,
            kv_cache: str = "float", shard=None) -> DecodeState:
    """Fill the cache with left-padded prompts and draw each row's first token.

    prompt, positions [B, P] (padding: position -1); active [B] bool (False rows are batch
    filler and start finished). kv_cache: "float" (the params' dtype) or "int8".
    Returns the DecodeState after one token per row.
    shard (static, optional): a hashable callable applied to the new KVCache and to the
    returned DecodeState (sharding constraints; see jaxinfer.parallel.sharding.StateSharding).
    """
    b = prompt.shape[0]
    dtype = jnp.int8 if kv_cache == "int8" else _cache_dtype(params)
    per_layer = isinstance(params["layers"], tuple | list)  # the cache follows the params
    cache = _shard(shard, models.init_cache(config, b, cache_len, dtype, per_layer=per_layer,
                                            attention=kernels.attention_for(params, dtype)))
    logits, cache = models.forward(config, params, prompt, positions, cache, last_only=True,
                                   scan_unroll=scan_unroll)
    rows = jnp.arange(b)[:, None]
    seen = jnp.zeros((b, config.vocab_size), jnp.int32).at[rows, prompt].add(
        (positions >= 0).astype(jnp.int32)) > 0
    state = DecodeState(
        cache=cache, tokens=jnp.zeros((b, buf_len), jnp.int32),
        logprobs=jnp.zeros((b, buf_len), jnp.float32), last=prompt[:, -1],
        next_pos=positions[:, -1] + 1, seen=seen, length=jnp.zeros((b,), jnp.int32),
        done=~active, hit_stop=jnp.zeros((b,), bool), step=jnp.zeros((), jnp.int32),
        sampling=sampling, stop_ids=stop_ids, max_new=max_new)
    tok, logp = sample(logits[:, -1], sampling, seen, state.step)
    return _shard(shard, _record(state, tok, logp))


@functools.partial(jax.jit, static_argnames=("config", "scan_unroll", "shard"),
                   donate_argnums=(1,))
def decode(params, state: DecodeState, limit: jax.Array, *, config,
           scan_unroll: int = 1, shard=None) -> DecodeState:
    """Decode on the device until every row is done or `state.step` reaches `limit`.

    shard (static, optional): as in `prefill`, applied to the loop's state.
    """

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = models.forward(config, params, s.last[:, None], s.next_pos[:, None],
                                       s.cache, scan_unroll=scan_unroll)
        tok, logp = sample(logits[:, 0], s.sampling, s.seen, s.step)
        s = s.replace(cache=cache, next_pos=s.next_pos + 1)
        return _shard(shard, _record(s, tok, logp))

    return _shard(shard, jax.lax.while_loop(cond, body, _shard(shard, state)))


def _shard(shard, x):
    """Apply the optional sharding hook."""
    return x if shard is None else shard(x)


def _cache_dtype(params):
    """The float dtype of the params (quantized leaves report their original dtype)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: not isinstance(x, dict | tuple | list))
    floats = [jnp.dtype(x.dtype) for x in leaves
              if jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)]
    return floats[0] if floats else jnp.float32
