"""The on-device slot engine, kept apart from the model: it only calls `models.forward`.

A `DecodeState` holds B decode *slots* over one batched KV cache, allocated once by `init_state`.
- `admit` prefills one chunk of each of G requests into chosen slots while the other slots keep
  their state. A request's first chunk empties its slot's cache row; its last chunk draws its
  first token and makes the slot live. Long prompts arrive chunk by chunk between decode steps.
- `decode` runs `lax.while_loop` over every slot until all are done or the step limit of this
  call is reached (or, when the host has requests waiting for a slot, until a slot frees);
  calling it again continues (that is how text is streamed and stop strings are checked
  between chunks). Finished and free slots ride along without taking cache space.
- `release` frees slots at once (finished, cancelled, stopped by a stop string).
- `swap` exchanges two slots' contents (`read_slots`, then `write_slots`): the host moves
  running requests into low slots.
Every per-request value is per slot and traced — position, token budget, stop ids, sampling
knobs, seed — so no mix of requests ever recompiles. A request's k-th token is drawn with its
seed folded with k (its `length`): it does not depend on its slot, on what else runs or on when
it was admitted. Static shapes (slots, cache length, token buffer, group and chunk sizes) are
bucketed by the host side (`jaxinfer.generate`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

import models
from jaxinfer import kernels
from jaxinfer.sampling import SamplingArrays, sample
from models import cache as kvc
from models import pytree
from models.cache import logical

MAX_STOP_IDS = 8  # stop-token ids per slot (static shape); more is an error


@pytree.dataclass
class DecodeState:
    """Everything the decode loop carries; one row per slot. N is the token buffer length.

    Each field declares its logical axes once (`models.cache.logical`); the sharding and pmap
    placements derive their per-field rules from them (host=True: read back by the host).
    """

    cache: models.KVCache = flax.struct.field(metadata={"struct": True})  # axes of its own
    tokens: jax.Array = logical("batch", "sequence", host=True)  # [B, N] int32 generated ids
    logprobs: jax.Array = logical("batch", "sequence", host=True)  # [B, N] float32 of those ids
    # [B, N, K] the K most likely ids at each step and their log-probs (rows whose request
    # asks for top log-probs, see Sampling.top_logprobs; K = 0 when the engine keeps none)
    top_ids: jax.Array = logical("batch", "sequence", None, host=True)  # int32
    top_logprobs: jax.Array = logical("batch", "sequence", None, host=True)  # float32
    last: jax.Array = logical("batch", host=True)  # [B] int32 last token, fed at the next step
    next_pos: jax.Array = logical("batch")  # [B] int32 position of `last`
    seen: jax.Array = logical("batch", "vocab")  # [B, V] bool seen (for the repetition penalty)
    length: jax.Array = logical("batch", host=True)  # [B] int32 tokens generated per slot
    done: jax.Array = logical("batch", host=True)  # [B] bool finished, or free
    hit_stop: jax.Array = logical("batch", host=True)  # [B] bool ended on a stop token
    step: jax.Array = logical(host=True)  # [] int32 decode steps taken (for the step limit)
    sampling: SamplingArrays = logical("batch")  # each leaf [B]
    stop_ids: jax.Array = logical("batch", None)  # [B, E] int32 stop token ids (-1 = unused)
    max_new: jax.Array = logical("batch")  # [B] int32 token budget per slot


# KV cache storage: the params' float dtype, float16 (half the bytes; the attention reads it
# as float32), or int8 with a float32 scale per token and head.
KV_CACHES = {"float": None, "float16": jnp.float16, "int8": jnp.int8}


@functools.partial(jax.jit, static_argnames=("config", "slots", "cache_len", "buf_len",
                                             "kv_cache", "shard", "top_logprobs"))
def init_state(params, *, config, slots: int, cache_len: int, buf_len: int,
               kv_cache: str = "float", shard=None, top_logprobs: int = 0) -> DecodeState:
    """`slots` free slots over a KV cache of `cache_len` tokens each, token buffers of
    `buf_len`. kv_cache: a key of KV_CACHES. shard (static, optional): a
    hashable callable applied to the state (sharding constraints; see
    jaxinfer.parallel.sharding.StateSharding). top_logprobs: K, the most alternatives a
    request may ask for at each step (buffers [B, buf_len, K])."""
    b = slots
    dtype = KV_CACHES[kv_cache] or _cache_dtype(params)
    per_layer = isinstance(params["layers"], tuple | list)  # the cache follows the params
    cache = models.init_cache(config, b, cache_len, dtype, per_layer=per_layer,
                              attention=kernels.attention_for(params, dtype))
    zeros = functools.partial(jnp.zeros, dtype=jnp.int32)
    state = DecodeState(
        cache=cache, tokens=zeros((b, buf_len)), logprobs=jnp.zeros((b, buf_len), jnp.float32),
        top_ids=zeros((b, buf_len, top_logprobs)),
        top_logprobs=jnp.zeros((b, buf_len, top_logprobs), jnp.float32),
        last=zeros((b,)), next_pos=zeros((b,)), seen=jnp.zeros((b, config.vocab_size), bool),
        length=zeros((b,)), done=jnp.ones((b,), bool), hit_stop=jnp.zeros((b,), bool),
        step=zeros(()), sampling=SamplingArrays.from_rows([], b),
        stop_ids=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32), max_new=zeros((b,)))
    return _shard(shard, state)


def _set(a: jax.Array, rows: jax.Array, values) -> jax.Array:
    """a with rows [G] set to values (indices >= B dropped)."""
    return a.at[rows].set(values, mode="drop")


@functools.partial(jax.jit, static_argnames=("config", "scan_unroll", "shard", "kv_len"),
                   donate_argnums=(1,))
def admit(params, state: DecodeState, slots: jax.Array, tokens: jax.Array,
          positions: jax.Array, first: jax.Array, last: jax.Array, sampling: SamplingArrays,
          stop_ids: jax.Array, max_new: jax.Array, *, config, scan_unroll: int = 1,
          shard=None, kv_len: int | None = None) -> DecodeState:
    """Prefill one chunk of G requests into `slots` [G] int32 (an index >= B is a filler row).

    tokens, positions [G, C]: the chunks, right-padded (position -1). first [G] bool: the
    chunk starts its prompt (the slot's cache row is emptied first); last [G] bool: it ends it
    — the request's first token is drawn, and the slot goes live with sampling (G rows),
    stop_ids [G, E] and max_new [G]. The other slots keep their state.
    kv_len (static, optional): the chunk is prefilled in the rows' first kv_len cache slots
    alone, read, attended over and written back (the caller guarantees that the rows hold
    nothing beyond them, chunk included: e.g. kv_len = C for first chunks); the rest of the
    rows is emptied. None: the whole rows.
    """
    b = state.done.shape[0]
    rows_cache = kvc.clear_rows(kvc.take_rows(state.cache, slots, kv_len), first)
    logits, rows_cache = models.forward(config, params, tokens, positions, rows_cache,
                                        last_only=True, scan_unroll=scan_unroll)
    cache = kvc.put_rows(state.cache, slots, rows_cache)
    g = tokens.shape[0]
    prior = jnp.where(first[:, None], False, jnp.take(state.seen, slots, axis=0, mode="clip"))
    seen = prior | (jnp.zeros((g, config.vocab_size), jnp.int32).at[
        jnp.arange(g)[:, None], tokens].add((positions >= 0).astype(jnp.int32)) > 0)
    tok, logp = sample(logits[:, 0], sampling, seen, jnp.zeros((g,), jnp.int32), stop_ids)
    live = jnp.where(last, slots, b)  # rows that go live; the others write nothing below
    top_ids, top_lps = _top(logits[:, 0], last & (sampling.top_logprobs > 0),
                            state.top_ids.shape[-1])
    is_stop = jnp.any(tok[:, None] == stop_ids, axis=-1)
    state = state.replace(
        cache=cache, seen=_set(state.seen, slots, seen.at[jnp.arange(g), tok].set(
            seen[jnp.arange(g), tok] | last)),
        tokens=state.tokens.at[live, 0].set(tok, mode="drop"),
        logprobs=state.logprobs.at[live, 0].set(logp, mode="drop"),
        top_ids=state.top_ids.at[live, 0].set(top_ids, mode="drop"),
        top_logprobs=state.top_logprobs.at[live, 0].set(top_lps, mode="drop"),
        last=_set(state.last, live, tok), next_pos=_set(state.next_pos, live,
                                                        jnp.max(positions, axis=1) + 1),
        length=_set(state.length, live, 1), done=_set(state.done, live, is_stop | (max_new <= 1)),
        hit_stop=_set(state.hit_stop, live, is_stop),
        sampling=jax.tree.map(lambda a, v: _set(a, live, v), state.sampling, sampling),
        stop_ids=_set(state.stop_ids, live, stop_ids), max_new=_set(state.max_new, live, max_new))
    return _shard(shard, state)


@functools.partial(jax.jit, static_argnames=("shard",), donate_argnums=(0,))
def release(state: DecodeState, slots: jax.Array, *, shard=None) -> DecodeState:
    """Free slots [G] at once (their rows stop drawing tokens; indices >= B ignored)."""
    return _shard(shard, state.replace(done=_set(state.done, slots, True)))


@jax.jit
def read_slots(state: DecodeState, slots: jax.Array) -> DecodeState:
    """What slots [G] int32 (in range) hold, as a G-row DecodeState: their rows of every
    per-slot field and of the cache (`step` as it is)."""
    rows = {n: jax.tree.map(lambda x: jnp.take(x, slots, axis=0), getattr(state, n))
            for n in _row_fields()}
    return state.replace(cache=kvc.take_rows(state.cache, slots), **rows)


@functools.partial(jax.jit, static_argnames=("shard",), donate_argnums=(0,))
def write_slots(state: DecodeState, slots: jax.Array, rows: DecodeState, *,
                shard=None) -> DecodeState:
    """state with slots [G] int32 (in range, distinct) holding `rows` (from read_slots)."""
    put = {n: jax.tree.map(lambda x, r: kvc.update_rows(x, 0, slots, r), getattr(state, n),
                           getattr(rows, n)) for n in _row_fields()}
    return _shard(shard, state.replace(cache=kvc.write_rows(state.cache, slots, rows.cache),
                                       **put))


def swap(state: DecodeState, a: jax.Array, b: jax.Array) -> DecodeState:
    """Slots a [G] and b [G] int32 exchange all they hold: cache rows, tokens, positions,
    sampling knobs, seeds, budgets (every index in range, the 2G distinct). A request's tokens
    do not depend on its slot, so the host may move a running request to a lower slot (this
    is how `decode(rows=...)` is kept to the rows that still run). Two programs: one that
    read the rows and overwrote them would copy the whole state (XLA keeps the rows it reads
    from being overwritten in place); these copy 2G rows."""
    return write_slots(state, jnp.concatenate([b, a]), read_slots(state, jnp.concatenate([a, b])))


@functools.partial(jax.jit, static_argnames=("length",))
def save_prefix(state: DecodeState, slot: jax.Array, *, length: int) -> models.KVCache:
    """The KV of slot `slot`'s first `length` (static) cache slots, as a 1-row cache."""
    return kvc.read_prefix(state.cache, slot, length)


@functools.partial(jax.jit, static_argnames=("shard",), donate_argnums=(0,))
def load_prefix(state: DecodeState, slot: jax.Array, prefix: models.KVCache, used: jax.Array,
                seen: jax.Array, *, shard=None) -> DecodeState:
    """Slot `slot` starts from a saved prefix (its first `used` tokens; seen [V] the tokens
    among them): the rest of its prompt is then admitted with first=False. shard: as in
    `init_state`."""
    return _shard(shard, state.replace(cache=kvc.write_prefix(state.cache, slot, prefix, used),
                                       seen=state.seen.at[slot].set(seen)))


def _top(logits: jax.Array, want: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(ids [B, k] int32, log-probs [B, k] float32) of each row's k most likely tokens under
    the raw model distribution (as `sample`'s log-probs), most likely first (ties: the lower
    id); computed only when a row wants them (want [B] bool), else zeros."""
    b = logits.shape[0]
    nothing = (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32))
    if k == 0:
        return nothing

    def top(_):
        values, ids = jax.lax.top_k(logits, k)
        return ids.astype(jnp.int32), values - jax.nn.logsumexp(logits, axis=-1, keepdims=True)

    return jax.lax.cond(jnp.any(want), top, lambda _: nothing, None)


def _record(state: DecodeState, tok: jax.Array, logp: jax.Array,
            top: tuple[jax.Array, jax.Array]) -> DecodeState:
    """Append tok/logp [B] (and top: `_top`'s pair) to the slots still running and update
    their finished flags."""
    live = ~state.done
    rows = jnp.arange(tok.shape[0])
    idx = jnp.where(live, state.length, state.tokens.shape[1])  # out of range -> dropped
    tokens = state.tokens.at[rows, idx].set(tok, mode="drop")
    logprobs = state.logprobs.at[rows, idx].set(logp, mode="drop")
    top_ids = state.top_ids.at[rows, idx].set(top[0], mode="drop")
    top_logprobs = state.top_logprobs.at[rows, idx].set(top[1], mode="drop")
    length = state.length + live.astype(jnp.int32)
    is_stop = jnp.any(tok[:, None] == state.stop_ids, axis=-1) & live
    done = state.done | is_stop | (length >= state.max_new)
    seen = state.seen.at[rows, tok].set(state.seen[rows, tok] | live)
    return state.replace(tokens=tokens, logprobs=logprobs, top_ids=top_ids,
                         top_logprobs=top_logprobs, length=length, done=done,
                         hit_stop=state.hit_stop | is_stop, last=jnp.where(live, tok, state.last),
                         seen=seen, step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("config", "scan_unroll", "shard", "kv_len",
                                             "rows"), donate_argnums=(1,))
def decode(params, state: DecodeState, limit: jax.Array, until_free: jax.Array, *, config,
           scan_unroll: int = 1, shard=None, kv_len: int | None = None,
           rows: int | None = None) -> DecodeState:
    """Decode on the device until every slot is done or `state.step` reaches `limit` [] int32,
    or, if until_free [] bool, until a slot that ran at the start of the call finishes (the
    host then admits a waiting request into it without waiting for the rest of the chunk).

    Done and free slots are fed one padding token (position -1) that takes no cache slot.
    kv_len (static, optional): attention reads only the first kv_len cache slots (the caller
    guarantees that no live slot gets past them within this call; see KVCache.visible).
    rows (static, optional): run only the first `rows` slots (the caller guarantees that the
    others are done); the step then costs what `rows` slots cost, not B.
    shard (static, optional): as in `init_state`, applied to the loop's state.
    """
    if rows is None or rows >= state.done.shape[0]:
        return _decode_loop(params, state, limit, until_free, config, scan_unroll, shard,
                            kv_len)
    head = _decode_loop(params, _head_rows(state, rows), limit, until_free, config,
                        scan_unroll, shard, kv_len)
    return _put_head_rows(state, head)


def _decode_loop(params, state, limit, until_free, config, scan_unroll, shard, kv_len):
    """decode's loop over every slot of `state`."""
    running = ~state.done

    def cond(s: DecodeState):
        freed = until_free & jnp.any(s.done & running)
        return (s.step < limit) & ~jnp.all(s.done) & ~freed

    def body(s: DecodeState):
        pos = jnp.where(s.done, -1, s.next_pos)
        logits, cache = models.forward(config, params, s.last[:, None], pos[:, None],
                                       s.cache.replace(visible=kv_len), scan_unroll=scan_unroll)
        tok, logp = sample(logits[:, 0], s.sampling, s.seen, s.length, s.stop_ids, s.tokens,
                           ~s.done)
        top = _top(logits[:, 0], ~s.done & (s.sampling.top_logprobs > 0), s.top_ids.shape[-1])
        s = s.replace(cache=cache.replace(visible=None),
                      next_pos=s.next_pos + (~s.done).astype(jnp.int32))
        return _shard(shard, _record(s, tok, logp, top))

    return _shard(shard, jax.lax.while_loop(cond, body, _shard(shard, state)))


def _row_fields() -> list[str]:
    """The DecodeState fields with one row per slot (every field but the cache and `step`)."""
    return [f.name for f in dataclasses.fields(DecodeState)
            if "batch" in f.metadata.get("axes", ())]


def _head_rows(state: DecodeState, rows: int) -> DecodeState:
    """The state of the first `rows` slots (the cache's key and value buffers whole:
    models.cache.head_rows)."""
    cut = {n: jax.tree.map(lambda a: a[:rows], getattr(state, n)) for n in _row_fields()}
    return state.replace(cache=kvc.head_rows(state.cache, rows), **cut)


def _put_head_rows(state: DecodeState, head: DecodeState) -> DecodeState:
    """state updated from `head` (from `_head_rows`)."""
    r = head.done.shape[0]
    put = {n: jax.tree.map(lambda a, h: a.at[:r].set(h), getattr(state, n), getattr(head, n))
           for n in _row_fields()}
    return head.replace(cache=kvc.put_head_rows(state.cache, head.cache), **put)


def _shard(shard, x):
    """Apply the optional sharding hook."""
    return x if shard is None else shard(x)


def _cache_dtype(params):
    """The float dtype of the params (quantized leaves report their original dtype)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: not isinstance(x, dict | tuple | list))
    floats = [jnp.dtype(x.dtype) for x in leaves
              if jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)]
    return floats[0] if floats else jnp.float32
