"""Host side of generation: batching, bucketing, stop strings, streaming and text.

`Engine` drives the slot engine (`jaxinfer.engine`: admit, decode, release) for any stream of
requests; `generate_ids` and the streaming behind `text.generate` / `text.stream` run one batch
of requests through it.
"""

from __future__ import annotations

import dataclasses
import glob
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from jaxinfer import engine, kernels, profile, programs
from jaxinfer.errors import InputError
from jaxinfer.sampling import MAX_TOP_LOGPROBS, Sampling, SamplingArrays

MAX_STOP_IDS = engine.MAX_STOP_IDS
def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= minimum): bounds the number of compiled shapes."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def rows_bucket(n: int) -> int:
    """Next power of two >= n: the decode row counts compiled (1, 2, 4, 8, ...). A decode step
    over r rows costs about a fixed part plus r times a per-row part (one row's matmuls), so a
    row bucket of twice the live rows at most doubles the per-row part."""
    return bucket(n, minimum=1)


def chunk_bucket(remaining: int, share: int) -> int:
    """The prompt chunk to prefill next for a request with `remaining` prompt tokens, at most
    `share` (a power of two): the next power of two, or the one below when that and the
    chunk after it cost at most three quarters of the padded one (143 tokens run as 128 + 16,
    not as 256; 17 as 32, not as 16 + 16)."""
    up = bucket(min(remaining, share))
    down = up // 2
    return down if up > 16 and down + bucket(remaining - down) <= up * 3 // 4 else up


@dataclasses.dataclass
class Completion:
    """One row's result. token_ids are the generated ids only."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    logprobs: list[float] | None = None
    # per generated token, its request's Sampling.top_logprobs most likely (id, log-prob)
    # pairs, most likely first (None unless asked for)
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class StreamEvent:
    """New text of row `index`; finish_reason is set on the row's last event."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclasses.dataclass
class Request:
    """A validated batch of prompts, ready for the engine."""

    prompts: list[list[int]]
    sampling: list[Sampling]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    stop_strings: tuple[str, ...] = ()
    kv_cache: str = "float"  # a key of engine.KV_CACHES


def check_kv_cache(kv_cache: str) -> None:
    """InputError unless kv_cache names a KV cache storage (engine.KV_CACHES)."""
    if kv_cache not in engine.KV_CACHES:
        raise InputError(f"kv_cache must be one of {', '.join(map(repr, engine.KV_CACHES))}, "
                         f"got {kv_cache!r}")


def validate_request(model, req: Request) -> None:
    """One InputError for the first invalid field, before anything is compiled."""
    if not req.prompts:
        raise InputError("no prompt given")
    for i, p in enumerate(req.prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
    if req.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
    longest = max(len(p) for p in req.prompts)
    ctx = model.config.max_seq_len
    if longest + req.max_new_tokens > ctx:
        raise InputError(f"prompt of {longest} tokens plus max_new_tokens {req.max_new_tokens} "
                         f"exceeds the model's context of {ctx} tokens")
    if len(req.sampling) not in (1, len(req.prompts)):
        raise InputError(f"got {len(req.sampling)} sampling settings for {len(req.prompts)} "
                         "prompts; give one for all or one per prompt")
    for s in req.sampling:
        s.validate()
    if len(req.stop_token_ids) > MAX_STOP_IDS:
        raise InputError(f"at most {MAX_STOP_IDS} stop token ids, got {len(req.stop_token_ids)}")
    check_kv_cache(req.kv_cache)
    if any(not s for s in req.stop_strings):
        raise InputError("stop strings must be non-empty")
    vocab = model.config.vocab_size
    bad = [t for p in req.prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} outside the vocabulary [0, {vocab})")


def run_layout(params, config, *, unstack: bool | None = None, native: bool | None = None,
               packed=None):
    """`params` in the layout generation runs with (a new tree; the leaves it does not change
    are shared). unstack / native None: chosen for the backend, as below. packed: weights
    packed earlier ({path: panels}, see `kernels.native_params`).

    On CPU:
    - native: every matmul weight the native kernels take in their packed form
      (`jaxinfer.kernels.native_params`: float32 and quantized leaves, the tied embedding as the
      packed head) where the kernels are available;
    - stacked when every layer weight is then a kernel stack (read at the scan's layer in
      place): the model scans one layer body, so XLA compiles one layer instead of L
      (measured on SmolLM2 in docs/STARTUP.md);
    - else unstack: one buffer per layer (`models.unstack_layers`): XLA:CPU copies each
      layer's slice out of stacked weights at every step of a scan, and one buffer per layer
      avoids that (measured: SmolLM2 batch-16 decode step 94 vs 150 ms, batch 1 26 vs 28 ms;
      see docs/BENCHMARKS.md).
    Stacked leaves are packed one layer at a time into their stack; unstacked layers are
    converted one at a time (a layer's slice is copied, packed and dropped). Either way the
    conversion holds the input, the result and one layer; `prepare` keeps the result alone.
    Elsewhere (GPU/TPU): params as they are. Idempotent: the result's layout is its own.
    """
    cpu = jax.default_backend() == "cpu"
    stacked = not isinstance(params.get("layers"), tuple | list)
    native = cpu if native is None else native
    tied = models.tied_table(config)

    def convert(tree, prefix: str = ""):
        return kernels.native_params(tree, tied, prefix, cached=packed) if native else tree

    if stacked and unstack is not True and (native or not cpu):
        run = convert(params)
        if unstack is False or not cpu or _all_in_place(run["layers"]):
            return run
        del run  # a weight the kernels do not take: per-layer buffers instead
    elif not (stacked and (cpu if unstack is None else unstack)):
        return convert(params)
    top = convert({k: v for k, v in params.items() if k != "layers"})
    host = _on_host(params)["layers"]
    n = jax.tree.leaves(host)[0].shape[0]
    layers = tuple(convert(jax.tree.map(lambda a, i=i: jax.device_put(a[i]), host),
                           f"layers/{i}") for i in range(n))
    return {**top, "layers": layers}


def _all_in_place(layers) -> bool:
    """Whether a scan over these stacked layers reads every weight in place: each leaf is a
    kernel stack (`at_layer`) or a per-layer vector [L, D] (norms, biases), whose slice is
    small."""
    leaves = jax.tree.leaves(layers, is_leaf=lambda a: hasattr(a, "at_layer"))
    return all(hasattr(a, "at_layer") or (isinstance(a, jax.Array) and a.ndim <= 2)
               for a in leaves)


def _on_host(params):
    """params with the layer weights as numpy views of their CPU buffers (no copy), so that
    `run_layout` slices them on the host: slicing jax arrays eagerly would compile
    and run small XLA programs (a slice, a squeeze and a copy per weight shape) at every start.
    The per-layer leaves it makes are jax arrays again."""
    return {**params, "layers": jax.tree.map(np.asarray, params["layers"])}


def run_params(model):
    """The params `model` generates with: `run_layout(model.params)` made once and kept in
    the model's declared `run_cache` (a Model with other params starts without it); a placed
    model (jaxinfer.parallel) runs its placed params as they are.

    When the params are those of a converted-cache entry (`Model.converted`) and the native
    kernels run, the packed weights are kept in the cache beside it (`_cached_layout`), so a
    warm start maps them instead of packing 0.5 GB again (1.5-3 s for SmolLM2 here)."""
    if getattr(model, "placement", None) is not None:
        return model.params
    cached = model.run_cache
    if cached is None or cached[0] is not model.params:
        converted = model.converted
        if converted is not None and converted[0] is model.params and kernels.isa() is not None:
            run = _cached_layout(model, converted[1])
        else:
            run = run_layout(model.params, model.config)
        cached = model.run_cache = (model.params, run)
    return cached[1]


def _cached_layout(model, weights_entry):
    """run_layout(model.params) with its packed weights read from the converted cache entry
    beside `weights_entry` (checksummed, see `convert_cache`), or packed now and written there
    in the background when the entry is missing, damaged or incomplete."""
    from jaxinfer.loading import convert_cache

    entry = convert_cache.layout_path(weights_entry, f"scan-{kernels.isa()}")  # layer stacks
    with profile.phase("run layout: open + verify cached packed weights"):
        sf = convert_cache.pending(entry).result()
        packed = {name: sf.get(name) for name in sf.names()} if sf is not None else {}
    with profile.phase("run layout (pack)"):
        run = run_layout(model.params, model.config, packed=packed)
    made = kernels.packed_leaves(run)
    if {p: x.shape for p, x in made.items()} != {p: x.shape for p, x in packed.items()}:
        # stale: this ISA's entries of any earlier layout name (e.g. per-layer "run-avx2")
        stem = entry.name.removesuffix(f".scan-{kernels.isa()}.safetensors")
        convert_cache.write_params(entry, made, model.source,
                                   stale=f"{glob.escape(stem)}.*-{kernels.isa()}.safetensors")
    return run


def prepare(model):
    """`model` for a program that only generates with it (the CLI's generate, chat, bench and
    serve): a new Model whose params are already in the run layout, so the weights are held
    once, not twice (the input model's params are not referenced by it). Placed models are
    returned as they are."""
    if getattr(model, "placement", None) is not None:
        return model
    run = run_params(model)  # the converted cache's packed weights when it has them
    out = dataclasses.replace(model, params=run)
    out.run_cache = (run, run)
    return out


MAX_CHUNK = 512  # prompt tokens prefilled per request per admit call (chunked prefill)
PREFIX_BLOCK = 16  # prefixes are cached and matched in whole blocks of this many tokens


class PrefixCache:
    """KV of prompts seen before, kept on the device up to `max_bytes` (least recently used
    evicted first). A saved prompt serves every prompt sharing any whole number of its
    PREFIX_BLOCKs: each block boundary of it is indexed."""

    def __init__(self, max_bytes: int):
        import collections

        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict = collections.OrderedDict()  # ids -> (kv, bytes)
        self.index: dict[tuple, tuple] = {}  # block prefix -> the saved ids holding it
        self.hits = self.misses = 0

    def lookup(self, ids: Sequence[int]):
        """(length, saved KV) of the longest cached prefix of ids leaving at least one token
        to prefill, or (0, None)."""
        for n in range((len(ids) - 1) // PREFIX_BLOCK * PREFIX_BLOCK, 0, -PREFIX_BLOCK):
            full = self.index.get(tuple(ids[:n]))
            if full is not None:
                self.entries.move_to_end(full)
                self.hits += 1
                return n, self.entries[full][0]
        self.misses += 1
        return 0, None

    def add(self, ids: Sequence[int], kv) -> None:
        """Keep kv, the KV of ids (a whole number of blocks)."""
        key = tuple(ids)
        if key in self.entries or not key:
            return
        size = sum(int(a.nbytes) for a in jax.tree.leaves(kv))
        if size > self.max_bytes:
            return
        self.entries[key] = (kv, size)
        self.bytes += size
        for n in range(PREFIX_BLOCK, len(key) + 1, PREFIX_BLOCK):
            self.index[key[:n]] = key
        while self.bytes > self.max_bytes:
            old, (_, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
            for n in range(PREFIX_BLOCK, len(old) + 1, PREFIX_BLOCK):
                if self.index.get(old[:n]) == old:
                    del self.index[old[:n]]


@dataclasses.dataclass
class _Entry:
    """A request in the engine: its prompt, settings and where it is."""

    ids: list[int]
    sampling: Sampling
    max_new: int
    stop_ids: tuple[int, ...]
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache so far
    submitted: float = 0.0
    first_token_s: float | None = None  # seconds from submit to the first token


class _LocalOps:
    """The engine's device functions on one device (a Placement supplies its own)."""

    batch_multiple = 1
    prefix_cache = True
    init_state = staticmethod(engine.init_state)

    @staticmethod
    def decode(params, state, limit, until_free, **static):
        return programs.call(engine.decode, (params, state, limit, until_free), static, donate=1,
                             out_like=1)

    @staticmethod
    def admit(params, state, *group, **static):
        group = tuple(jax.tree.map(jnp.asarray, g) for g in group)
        return programs.call(engine.admit, (params, state, *group), static, donate=1,
                             out_like=1)

    @staticmethod
    def release(state, slots):
        return programs.call(engine.release, (state, jnp.asarray(slots, jnp.int32)), {},
                             donate=0, out_like=0)

    @staticmethod
    def save_prefix(state, slot, length):
        return engine.save_prefix(state, jnp.int32(slot), length=length)

    @staticmethod
    def load_prefix(state, slot, kv, used, seen):
        return engine.load_prefix(state, jnp.int32(slot), kv, jnp.int32(used), jnp.asarray(seen))

    @staticmethod
    def swap(state, a, b):
        """engine.swap, its two programs run through programs.call."""
        a, b = np.asarray(a, np.int32), np.asarray(b, np.int32)
        rows = programs.call(engine.read_slots, (state, jnp.asarray(np.concatenate([a, b]))), {})
        return programs.call(engine.write_slots, (state, jnp.asarray(np.concatenate([b, a])),
                                                  rows), {}, donate=0, out_like=0)


class Engine:
    """Host side of the slot engine (`jaxinfer.engine`): B slots over one device state, a
    waiting queue, and admission of waiting requests into free slots between decode chunks.

        eng = Engine(model, slots=4, cache_len=256, buf_len=64)
        h = eng.submit(prompt_ids, Sampling(), max_new=32, stop_ids=model.eos_token_ids)
        while not eng.finished(h):
            eng.advance(8)       # admit what fits (one prompt chunk each), then <= 8 steps
        tokens, logprobs, hit_stop = eng.result(h)

    params: the params to run (default `run_params(model)`; e.g. `run_layout(...)` of another
    layout). A placed model (jaxinfer.parallel) runs through its placement's functions.
    admit_group: most requests prefilled in one admit call (None: all that fit). A server
    admits one at a time: every admit then has one of a few shapes (one per prompt-chunk
    bucket), compiled up front by `warm_up`. prefix_cache_bytes: keep the KV of prompt
    prefixes (whole PREFIX_BLOCKs) up to this many bytes, and start requests that share one
    from it instead of prefilling it again (one device or a mesh, not under pmap; 0: off).
    shortest_first: None admits waiting requests first come, first served. A rate r (prompt
    tokens per second) admits the shortest prompt first, less r tokens for each second it has
    waited: a burst goes in shortest first, and a long prompt waits at most (its length - the
    shortest's) / r seconds longer than a short one that came after it (0: no aging).
    """

    def __init__(self, model, *, slots: int, cache_len: int, buf_len: int,
                 kv_cache: str = "float", params=None, scan_unroll: int = 1,
                 admit_group: int | None = None, prefix_cache_bytes: int = 0,
                 prefill_tokens: int = MAX_CHUNK, shortest_first: float | None = None,
                 top_logprobs: int = 0):
        if shortest_first is not None and not shortest_first >= 0:
            raise InputError(f"shortest_first must be None or a rate >= 0, got {shortest_first}")
        self.shortest_first = shortest_first
        check_kv_cache(kv_cache)
        if not 16 <= prefill_tokens <= MAX_CHUNK or prefill_tokens & (prefill_tokens - 1):
            raise InputError(f"prefill_tokens must be a power of two from 16 to {MAX_CHUNK}, "
                             f"got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        self.model = model
        self.ops = getattr(model, "placement", None) or _LocalOps()
        m = self.ops.batch_multiple
        self.slots = -(-slots // m) * m
        self.cache_len, self.buf_len = cache_len, buf_len
        self.params = run_params(model) if params is None else params
        self.static = dict(config=model.config, scan_unroll=scan_unroll)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{top_logprobs}")
        self.top_logprobs = top_logprobs
        self.state = self.ops.init_state(self.params, config=model.config, slots=self.slots,
                                         cache_len=cache_len, buf_len=buf_len, kv_cache=kv_cache,
                                         top_logprobs=top_logprobs)
        self.admit_group = admit_group or self.slots
        self.warm = False  # every shape compiled (warm_up)
        # The attention kernel reads each row's used slots itself: no decode windows then.
        self.kernel_attention = getattr(self.state, "stacked", self.state).cache.attention \
            is not None  # (a PmapState holds the per-device states stacked)
        self.prefixes = (PrefixCache(prefix_cache_bytes)
                         if prefix_cache_bytes and self.ops.prefix_cache else None)
        self.entries: dict[int, _Entry] = {}
        self.waiting: list[int] = []
        self.free = list(range(self.slots))
        self.by_slot: dict[int, int] = {}
        self._next = 0
        self._host = None  # the last snapshot (tokens, length, done, hit_stop, logprobs)
        self._top_host = (None, None)  # (the snapshot it was read with, (ids, log-probs))

    # -- requests ---------------------------------------------------------------------------

    def submit(self, ids: Sequence[int], sampling: Sampling, max_new: int,
               stop_ids: Sequence[int] = ()) -> int:
        """Queue a request; returns its handle. InputError if it cannot fit this engine."""
        if not ids:
            raise InputError("prompt is empty")
        if not 1 <= max_new <= self.buf_len:
            raise InputError(f"max_new_tokens must be in [1, {self.buf_len}], got {max_new}")
        if len(ids) + max_new > self.cache_len:
            raise InputError(f"prompt of {len(ids)} tokens plus max_new_tokens {max_new} "
                             f"exceeds the engine's {self.cache_len} cache slots per request")
        if len(stop_ids) > engine.MAX_STOP_IDS:
            raise InputError(f"at most {engine.MAX_STOP_IDS} stop token ids, got {len(stop_ids)}")
        if sampling.top_logprobs > self.top_logprobs:
            raise InputError(f"top_logprobs {sampling.top_logprobs}: this engine keeps at most "
                             f"{self.top_logprobs} per token")
        h, self._next = self._next, self._next + 1
        self.entries[h] = _Entry(list(ids), sampling.validate(), int(max_new), tuple(stop_ids),
                                 submitted=time.perf_counter())
        self.waiting.append(h)
        return h

    def release(self, handles: Sequence[int]) -> None:
        """Finish requests now (stop string, cancellation): their slots are freed."""
        slots = []
        for h in handles:
            e = self.entries.get(h)
            if e is None:
                continue
            if e.slot is None:
                self.waiting.remove(h)
                del self.entries[h]
                continue
            slots.append(e.slot)
        if slots:
            self.state = self.ops.release(self.state, np.asarray(slots, np.int32))
            self._host = None

    def forget(self, h: int) -> None:
        """Drop a finished request's bookkeeping and give its slot back."""
        e = self.entries.pop(h)
        if e.slot is not None:
            del self.by_slot[e.slot]
            self.free.append(e.slot)

    # -- running ----------------------------------------------------------------------------

    def advance(self, steps: int) -> None:
        """Admit waiting requests into free slots (one prompt chunk each, admit calls of at
        most admit_group requests until the prefill_tokens budget is spent; a longer prompt
        gets its next chunk at the next call; a new prompt that one chunk holds goes in whole
        even past the budget's rest: two calls, the second over a wider cache window, cost
        more than one), then run up to `steps` decode steps on the device if any slot is
        live: fewer when requests wait for a slot and one frees (it is admitted at the next
        call instead of idling through the rest of the chunk)."""
        budget, admitted = self.prefill_tokens, set()
        while budget >= bucket(1):  # room for the smallest chunk
            used = self._admit(budget, admitted)
            if not used:
                break
            budget -= used
        if steps > 0 and self._any_live():
            self._compact()
            until_free = bool(self.waiting) and not self.free
            self._decode(int(self.state.step) + steps, self._kv_len(steps), self._rows(),
                         until_free)

    def _decode(self, limit: int, kv_len: int | None, rows: int | None,
                until_free: bool = False) -> None:
        """engine.decode up to step `limit`; until_free: requests wait and every slot is
        taken, so the call also ends as soon as a running request finishes."""
        self.state = self.ops.decode(self.params, self.state, jnp.int32(limit),
                                     jnp.bool_(until_free), **self.static, kv_len=kv_len,
                                     rows=rows)
        self._host = None

    def _kv_len(self, steps: int) -> int | None:
        """Cache slots the next `steps` decode steps can reach (bucketed, at least 64): every
        live slot holds its prompt and the tokens drawn so far, and no padding. None with an
        attention kernel, which reads each row's used slots whatever the window."""
        if self.kernel_attention:
            return None
        length = self.snapshot()[1]
        ends = [len(e.ids) + int(length[e.slot]) for h, e in self.entries.items()
                if self.live(h)]
        return min(self.cache_len, bucket(max(ends, default=1) + steps, minimum=64))

    def _rows(self) -> int | None:
        """The slots the next decode call runs: the first `rows_bucket` of them holding every
        unfinished live request (requests take the lowest free slot, so at low load a step
        costs a few rows, not all B). None: all (and always under a placement)."""
        if not isinstance(self.ops, _LocalOps):
            return None
        done = self.snapshot()[2]
        top = max((e.slot for h, e in self.entries.items()
                   if self.live(h) and not done[e.slot]), default=0)
        rows = rows_bucket(top + 1)
        return rows if rows < self.slots else None

    def _compact(self) -> None:
        """Move the requests still running or prefilling into the lowest slots, so that
        decode's row bucket (`_rows`) is the bucket of their count: each one at or above
        rows_bucket(count) swaps with the lowest slot below it that holds none (a free slot or
        a finished request's result). Requests leave in any order, so without this a late
        request in a high slot keeps the whole bucket running. Not under a placement, whose
        decode runs every slot."""
        if not isinstance(self.ops, _LocalOps):
            return
        done = self.snapshot()[2]
        busy = {e.slot for h, e in self.entries.items()
                if e.slot is not None and not (self.live(h) and done[e.slot])}
        target = rows_bucket(max(len(busy), 1))
        high = sorted(s for s in busy if s >= target)
        low = [s for s in range(target) if s not in busy]
        for src, dst in zip(high, low, strict=False):
            self._swap(src, dst)

    def _swap(self, a: int, b: int) -> None:
        """Slots a and b exchange their contents (engine.swap) and their requests."""
        self.state = self.ops.swap(self.state, np.asarray([a], np.int32),
                                   np.asarray([b], np.int32))
        self._host = None
        ha, hb = self.by_slot.pop(a, None), self.by_slot.pop(b, None)
        for h, slot in ((ha, b), (hb, a)):
            if h is not None:
                self.entries[h].slot = slot
                self.by_slot[slot] = h
        self.free = [b if s == a else a if s == b else s for s in self.free]

    def _any_live(self) -> bool:
        return any(self.live(h) and not self.finished(h) for h in self.entries)

    def _admit(self, budget: int, admitted: set[int]) -> int:
        """One admit call for up to admit_group requests with a slot (or a free one) and
        prompt left, not in `admitted` (those had a chunk in this advance; the call adds its
        own), within `budget` prompt tokens. Returns the tokens it ran (0: no call)."""
        group = [h for h, e in self.entries.items() if e.slot is not None and
                 e.prefilled < len(e.ids) and h not in admitted][:self.admit_group]
        while self.waiting and self.free and len(group) < self.admit_group:
            h = self._next_waiting()
            self.waiting.remove(h)
            e = self.entries[h]
            e.slot = self.free.pop(self.free.index(min(self.free)))  # lowest: see _rows
            self.by_slot[e.slot] = h
            if self.prefixes is not None:
                self._start_from_prefix(e)
            whole = bucket(len(e.ids) - e.prefilled)  # what is left after a cached prefix
            if not group and budget < whole <= self.prefill_tokens:
                budget = whole  # one chunk holds it: whole, not split in two (see advance)
            group.append(h)
        if not group:
            return 0
        admitted.update(group)
        share = max(16, 1 << (budget // len(group)).bit_length() - 1)
        # Splitting a chunk (chunk_bucket) saves prefill work only where the extra shape is
        # compiled already (after warm_up); otherwise it would cost a compile: pad instead.
        fit = chunk_bucket if self.warm else lambda n, share: bucket(min(n, share))
        chunk = max(fit(len(self.entries[h].ids) - self.entries[h].prefilled, share)
                    for h in group)
        window = self._window(max(self.entries[h].prefilled for h in group), chunk)
        g = bucket(len(group), minimum=1)
        slots = np.full((g,), self.slots, np.int32)  # filler rows: out of range, dropped
        tokens = np.zeros((g, chunk), np.int32)
        positions = np.full((g, chunk), -1, np.int32)
        first, last = np.ones((g,), bool), np.zeros((g,), bool)
        stop = np.full((g, engine.MAX_STOP_IDS), -1, np.int32)
        max_new = np.ones((g,), np.int32)
        rows = []
        for i, h in enumerate(group):
            e = self.entries[h]
            part = e.ids[e.prefilled:e.prefilled + chunk]
            slots[i] = e.slot
            tokens[i, :len(part)] = part
            positions[i, :len(part)] = np.arange(e.prefilled, e.prefilled + len(part))
            first[i], last[i] = e.prefilled == 0, e.prefilled + len(part) == len(e.ids)
            stop[i, :len(e.stop_ids)] = e.stop_ids
            max_new[i] = e.max_new
            e.prefilled += len(part)
            rows.append(e.sampling)
        sampling = SamplingArrays.from_rows(rows, g)
        self.state = self.ops.admit(self.params, self.state, slots, tokens, positions, first,
                                    last, sampling, stop, max_new, **self.static,
                                    kv_len=window)
        self._host = None
        now = time.perf_counter()
        for i, h in enumerate(group):
            if last[i]:
                self.entries[h].first_token_s = now - self.entries[h].submitted
                if self.prefixes is not None:
                    self._save_prefix(self.entries[h])
        return chunk * len(group)

    def _window(self, prefilled: int, chunk: int) -> int | None:
        """The cache window (engine.admit's kv_len) of a chunk of `chunk` tokens after at most
        `prefilled` in its rows: a first chunk's own length, else half the cache when the
        rows' tokens fit in it (XLA's attention then reads half the keys), else None (whole
        rows). Three windows per chunk bucket at most, all compiled by warm_up."""
        if prefilled == 0:
            return chunk if chunk < self.cache_len else None
        half = self.cache_len // 2
        return half if prefilled + chunk <= half else None

    def _next_waiting(self) -> int:
        """The waiting request to admit next (see shortest_first; ties: first come)."""
        if self.shortest_first is None:
            return self.waiting[0]
        now, rate = time.perf_counter(), self.shortest_first
        return min(self.waiting, key=lambda h: len(self.entries[h].ids)
                   - rate * (now - self.entries[h].submitted))

    def _start_from_prefix(self, e: _Entry) -> None:
        """Load the longest cached prefix of e's prompt into its slot."""
        n, kv = self.prefixes.lookup(e.ids)
        if kv is None:
            return
        seen = np.zeros((self.model.config.vocab_size,), bool)
        seen[np.asarray(e.ids[:n])] = True
        self.state = self.ops.load_prefix(self.state, e.slot, kv, n, seen)
        e.prefilled = n

    def _save_prefix(self, e: _Entry) -> None:
        """Keep the KV of e's prompt (whole blocks) for later requests sharing it."""
        n = len(e.ids) // PREFIX_BLOCK * PREFIX_BLOCK
        if n == 0 or tuple(e.ids[:n]) in self.prefixes.entries:
            return
        kv = self.ops.save_prefix(self.state, e.slot, min(bucket(n), self.cache_len))
        self.prefixes.add(e.ids[:n], kv)

    def warm_up(self) -> None:
        """Compile every shape this engine can use with admit_group 1: each prompt chunk bucket
        in each of its windows (`_window`: a first chunk's own, half the cache, the whole
        rows) through admit calls of a filler row, the decode loop (warm_up_decode) and
        engine.swap. After it, prompt chunks may be split (chunk_bucket), since every split
        shape is compiled."""
        c = bucket(1)
        top = min(self.prefill_tokens, self.cache_len - 1)
        while True:
            windows = {self._window(p, c) for p in (0, 1, self.cache_len - 1 - c)
                       if p + c < self.cache_len}  # first chunk; later ones, short and long
            for w in windows:
                self._admit_filler(c, w)
            if c >= top:
                break
            c *= 2
        self.warm_up_decode()
        if isinstance(self.ops, _LocalOps) and self.slots > 1:  # compile engine.swap
            self._swap(0, 1)
            self._swap(0, 1)
        self.warm = True

    def _admit_filler(self, chunk: int, window: int | None) -> None:
        """An admit call of one filler row (slot B: nothing is written) of `chunk` tokens in
        `window`: it compiles that shape."""
        self.state = self.ops.admit(
            self.params, self.state, np.full((1,), self.slots, np.int32),
            np.zeros((1, chunk), np.int32), np.full((1, chunk), -1, np.int32),
            np.ones((1,), bool), np.zeros((1,), bool), SamplingArrays.from_rows([Sampling()], 1),
            np.full((1, engine.MAX_STOP_IDS), -1, np.int32), np.ones((1,), np.int32),
            **self.static, kv_len=window)
        self._host = None

    def warm_up_decode(self) -> None:
        """Compile the decode loop for every row bucket (and cache window without an attention
        kernel), with a step limit of zero."""
        windows = ([None] if self.kernel_attention else
                   sorted({min(self.cache_len, bucket(n, minimum=64))
                           for n in range(1, self.cache_len + 1)}))
        r = 1
        while True:
            for w in windows:
                self._decode(int(self.state.step), w, r if r < self.slots else None)
            if r >= self.slots:
                break
            r = rows_bucket(r + 1)

    def snapshot(self):
        """(tokens [B, N], lengths [B], done [B], hit_stop [B], logprobs [B, N]) as numpy,
        read from the device once per change of state."""
        if self._host is None:
            s = self.state
            self._host = jax.device_get((s.tokens, s.length, s.done, s.hit_stop, s.logprobs))
        return self._host

    def live(self, h: int) -> bool:
        """Whether request h has a slot and its whole prompt prefilled."""
        e = self.entries[h]
        return e.slot is not None and e.prefilled == len(e.ids)

    def finished(self, h: int) -> bool:
        return self.live(h) and bool(self.snapshot()[2][self.entries[h].slot])

    def result(self, h: int):
        """(token ids so far, their log-probs, ended on a stop token) of request h."""
        if not self.live(h):
            return [], [], False
        tokens, length, _, hit_stop, logprobs = self.snapshot()
        slot = self.entries[h].slot
        n = int(length[slot])
        return tokens[slot, :n].tolist(), logprobs[slot, :n].tolist(), bool(hit_stop[slot])

    def top(self, h: int, start: int = 0) -> list[list[tuple[int, float]]]:
        """Request h's most likely (id, log-prob) pairs at each of its tokens from `start` on,
        as many per token as its Sampling.top_logprobs asks for (read from the device once
        per change of state, and only when asked)."""
        e = self.entries[h]
        k = e.sampling.top_logprobs
        if not self.live(h) or k == 0:
            return []
        snap = self.snapshot()
        if self._top_host[0] is not snap:
            self._top_host = (snap, jax.device_get((self.state.top_ids,
                                                    self.state.top_logprobs)))
        ids, lps = self._top_host[1]
        n = int(snap[1][e.slot])
        return [list(zip(ids[e.slot, i, :k].tolist(), lps[e.slot, i, :k].tolist(), strict=True))
                for i in range(start, n)]


def engine_for(model, req: Request, **kw) -> Engine:
    """An engine sized for one Request (slots for every prompt; static sizes bucketed)."""
    longest = max(len(p) for p in req.prompts)
    buf = bucket(req.max_new_tokens)
    return Engine(model, slots=bucket(len(req.prompts), minimum=1),
                  cache_len=bucket(longest + req.max_new_tokens), buf_len=buf,
                  kv_cache=req.kv_cache,
                  top_logprobs=max(s.top_logprobs for s in req.sampling), **kw)


def submit_all(eng: Engine, req: Request) -> list[int]:
    """Submit every prompt of req (one Sampling for all, or one each); returns the handles."""
    sampling = req.sampling if len(req.sampling) == len(req.prompts) else \
        req.sampling * len(req.prompts)
    return [eng.submit(p, s, req.max_new_tokens, req.stop_token_ids)
            for p, s in zip(req.prompts, sampling, strict=True)]


def generate_ids(model, req: Request, *, logprobs: bool = False, chunk: int | None = None,
                 scan_unroll: int = 1, params=None) -> list[Completion]:
    """Generate for a batch of token-id prompts (no stop strings: those need text); params:
    see `Engine`."""
    validate_request(model, req)
    eng = engine_for(model, req, scan_unroll=scan_unroll, params=params)
    handles = submit_all(eng, req)
    while not all(eng.finished(h) for h in handles):
        eng.advance(chunk or req.max_new_tokens)
    out = []
    for i, h in enumerate(handles):
        ids, lps, hit = eng.result(h)
        top = eng.top(h) or None  # [] when the request asked for none
        out.append(Completion(prompt=None, prompt_token_ids=list(req.prompts[i]), token_ids=ids,
                              text=None, finish_reason="stop" if hit else "length",
                              logprobs=lps if logprobs else None, top_logprobs=top))
    return out


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class _RowText:
    """Incremental text of one row, with stop-string truncation and hold-back."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tok, self.stops = tokenizer, stops
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False  # by a stop string
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, new_ids: list[int], final: bool) -> str:
        """Add new token ids; return the text safe to show now."""
        for t in new_ids:
            if self.stopped:
                break
            self.ids.append(t)
            self.text += self.decoder.push(t)
            cut = _find_stop(self.text, self.stops)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        if final and not self.stopped:
            self.text += self.decoder.flush()
        end = len(self.text) if (final or self.stopped) else max(self.emitted,
                                                                 len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out


FIRST_CHUNK = 4  # decode steps before a stream's first text; later chunks double up to `chunk`


def stream_requests(model, prompts_text: list[str | None], req: Request, *,
                    chunk: int = 8, scan_unroll: int = 1, logprobs: bool = False,
                    results: list | None = None) -> Iterator[StreamEvent]:
    """Generate with text streaming; fills `results` with Completions when done.

    chunk: decode steps (device calls of `Engine.advance`) between looks at the text, at most;
    the first look comes after FIRST_CHUNK steps and each later one after twice as many as
    the last, up to `chunk` (the first words show at once, and a long answer makes few calls:
    each costs a few ms). The request is validated here, when called, before the first event
    is asked for.
    """
    if model.tokenizer is None:
        raise InputError(f"{model.source}: no tokenizer, so text generation is unavailable")
    validate_request(model, req)
    return _stream(model, prompts_text, req, chunk, scan_unroll, logprobs, results)


def _stream(model, prompts_text, req, chunk, scan_unroll, logprobs, results):
    eng = engine_for(model, req, scan_unroll=scan_unroll)
    handles = submit_all(eng, req)
    n = len(handles)
    rows = [_RowText(model.tokenizer, req.stop_strings) for _ in range(n)]
    seen = [0] * n
    finished = [False] * n
    final = [None] * n
    steps = min(chunk, FIRST_CHUNK)
    eng.advance(0)
    while True:
        newly_stopped = []
        for i, row in enumerate(rows):
            if finished[i] or not eng.live(handles[i]):
                continue
            ids, lps, hit = eng.result(handles[i])
            done_dev = eng.finished(handles[i])
            text = row.push(ids[seen[i]:], final=done_dev)
            seen[i] = len(ids)
            if row.stopped and not done_dev:
                newly_stopped.append(handles[i])
            if done_dev or row.stopped:
                finished[i] = True
                final[i] = (ids, lps, hit, eng.top(handles[i]))
                yield StreamEvent(i, text, "stop" if (row.stopped or hit) else "length")
            elif text:
                yield StreamEvent(i, text)
        if newly_stopped:
            eng.release(newly_stopped)
        if all(finished):
            break
        eng.advance(steps)
        steps = min(2 * steps, chunk)
    if results is not None:
        for i, row in enumerate(rows):
            ids, lps, hit, top = final[i]
            ids = row.ids if row.stopped else ids
            results.append(Completion(
                prompt=prompts_text[i], prompt_token_ids=list(req.prompts[i]), token_ids=ids,
                text=row.text, finish_reason="stop" if (row.stopped or hit) else "length",
                logprobs=lps[:len(ids)] if logprobs else None,
                top_logprobs=top[:len(ids)] if top else None))
