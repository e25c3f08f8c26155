"""Host side of generation: batching, bucketing, stop strings, streaming and text.

`generate_ids` drives `engine.prefill` / `engine.decode` over token ids; `generate` and
`stream` work on text (optionally through the chat template).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from jaxinfer import engine, kernels
from jaxinfer.errors import InputError
from jaxinfer.sampling import Sampling, SamplingArrays

MAX_STOP_IDS = 8  # stop-token slots (static shape); more ids than this is an error
# Per-layer weight buffers (see `run_params`) are used on CPU while the layer weights take at
# most this many bytes (they are a second copy of the layers, kept beside model.params).
UNSTACK_MAX_BYTES = 2 << 30


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= minimum): bounds the number of compiled shapes."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass
class Completion:
    """One row's result. token_ids are the generated ids only."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    logprobs: list[float] | None = None


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
    kv_cache: str = "float"  # "float" or "int8"


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
    if req.kv_cache not in ("float", "int8"):
        raise InputError(f"kv_cache must be 'float' or 'int8', got {req.kv_cache!r}")
    if any(not s for s in req.stop_strings):
        raise InputError("stop strings must be non-empty")
    vocab = model.config.vocab_size
    bad = [t for p in req.prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} outside the vocabulary [0, {vocab})")


def _pack(req: Request, batch_multiple: int = 1):
    """Left-pad prompts into bucketed arrays; returns engine inputs and static sizes.

    batch_multiple: the batch is padded up to a multiple of it (a sharded placement's data axis).
    """
    n = len(req.prompts)
    b = bucket(n, minimum=1)
    b = -(-b // batch_multiple) * batch_multiple
    p = bucket(max(len(x) for x in req.prompts))
    prompt = np.zeros((b, p), np.int32)
    positions = np.full((b, p), -1, np.int32)
    for i, ids in enumerate(req.prompts):
        prompt[i, p - len(ids):] = ids
        positions[i, p - len(ids):] = np.arange(len(ids))
    positions[n:, -1] = 0  # filler rows: one dummy token
    stop = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop[:len(req.stop_token_ids)] = req.stop_token_ids
    buf = bucket(req.max_new_tokens)
    sampling = req.sampling if len(req.sampling) == n else req.sampling * n
    args = (jnp.asarray(prompt), jnp.asarray(positions), SamplingArrays.from_rows(sampling, b),
            jnp.asarray(stop), jnp.int32(req.max_new_tokens), jnp.asarray(np.arange(b) < n))
    return args, dict(cache_len=p + buf, buf_len=buf, kv_cache=req.kv_cache)


def run_layout(params, config, *, unstack: bool | None = None, native: bool | None = None):
    """`params` in the layout generation runs with (a new tree; the leaves it does not change
    are shared). unstack / native None: chosen for the backend, as below.

    On CPU:
    - unstack: a per-layer copy of the layer weights (`models.unstack_layers`): XLA:CPU copies
      each layer's slice out of stacked weights at every step under nn.scan, and one buffer
      per layer avoids that (measured: SmolLM2 batch-16 decode step 94 vs 150 ms, batch 1 26
      vs 28 ms; see docs/BENCHMARKS.md). It is a second copy of the layer weights, so by
      default only made up to UNSTACK_MAX_BYTES of them;
    - native: float32 matmul weights packed for the native kernels
      (`jaxinfer.kernels.native_params`; the tied embedding is kept transposed, one more copy
      of it) where the kernels are available.
    Elsewhere (GPU/TPU): params as they are.
    """
    cpu = jax.default_backend() == "cpu"
    stacked = not isinstance(params.get("layers"), tuple | list)
    if unstack is None:
        unstack = cpu and stacked and sum(
            x.nbytes for x in jax.tree.leaves(params["layers"])) <= UNSTACK_MAX_BYTES
    run = models.unstack_layers(params) if unstack and stacked else params
    if native if native is not None else cpu:
        run = kernels.native_params(run, models.tied_table(config))
    return run


def run_params(model):
    """The params `model` generates with: `run_layout(model.params)` made once and kept in
    the model's declared `run_cache` (a Model with other params starts without it); a placed
    model (jaxinfer.parallel) runs its placed params as they are."""
    if getattr(model, "placement", None) is not None:
        return model.params
    cached = model.run_cache
    if cached is None or cached[0] is not model.params:
        cached = model.run_cache = (model.params, run_layout(model.params, model.config))
    return cached[1]


class Run:
    """One generation in progress: prefill on construction, then `advance` chunk by chunk.

    params: the params to run (default `run_params(model)`; e.g. `run_layout(...)` of another
    layout).
    """

    def __init__(self, model, req: Request, scan_unroll: int = 1, params=None):
        validate_request(model, req)
        self.model, self.req, self.unroll = model, req, scan_unroll
        # A model placed by jaxinfer.parallel carries a Placement whose prefill/decode wrap the
        # engine's (sharded inputs, pmap); a plain Model runs the engine directly.
        placement = getattr(model, "placement", None)
        self._prefill = placement.prefill if placement else engine.prefill
        self._decode = placement.decode if placement else engine.decode
        self.params = run_params(model) if params is None else params
        args, sizes = _pack(req, placement.batch_multiple if placement else 1)
        self.t0 = time.perf_counter()
        self.state = self._prefill(self.params, *args, config=model.config,
                                   scan_unroll=scan_unroll, **sizes)
        self.state.length.block_until_ready()
        self.ttft = time.perf_counter() - self.t0
        self.n = len(req.prompts)

    def advance(self, steps: int) -> None:
        """Run up to `steps` more decode steps on the device."""
        limit = jnp.int32(int(self.state.step) + steps)
        self.state = self._decode(self.params, self.state, limit,
                                  config=self.model.config, scan_unroll=self.unroll)

    def finished(self) -> bool:
        return bool(np.all(np.asarray(self.state.done)[: self.n]))

    def stop_rows(self, rows: list[int]) -> None:
        """Mark rows finished from the host (a stop string was found)."""
        done = self.state.done.at[jnp.asarray(rows)].set(True)
        self.state = self.state.replace(done=done)

    def snapshot(self):
        """(tokens [n, N], lengths [n], hit_stop [n], logprobs [n, N]) as numpy."""
        s = jax.device_get((self.state.tokens, self.state.length, self.state.hit_stop,
                            self.state.logprobs))
        return tuple(a[: self.n] for a in s)


def generate_ids(model, req: Request, *, logprobs: bool = False, chunk: int | None = None,
                 scan_unroll: int = 1, params=None) -> list[Completion]:
    """Generate for a batch of token-id prompts (no stop strings: those need text); params:
    see `Run`."""
    run = Run(model, req, scan_unroll, params)
    while not run.finished():
        run.advance(chunk or req.max_new_tokens)
    tokens, lengths, hit_stop, lps = run.snapshot()
    return [Completion(prompt=None, prompt_token_ids=list(req.prompts[i]),
                       token_ids=tokens[i, :lengths[i]].tolist(), text=None,
                       finish_reason="stop" if hit_stop[i] else "length",
                       logprobs=lps[i, :lengths[i]].tolist() if logprobs else None)
            for i in range(run.n)]


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


def stream_requests(model, prompts_text: list[str | None], req: Request, *,
                    chunk: int = 8, scan_unroll: int = 1, logprobs: bool = False,
                    results: list | None = None) -> Iterator[StreamEvent]:
    """Generate with text streaming; fills `results` with Completions when done.

    The request is validated here, when called, before the first event is asked for.
    """
    if model.tokenizer is None:
        raise InputError(f"{model.source}: no tokenizer, so text generation is unavailable")
    validate_request(model, req)
    return _stream(model, prompts_text, req, chunk, scan_unroll, logprobs, results)


def _stream(model, prompts_text, req, chunk, scan_unroll, logprobs, results):
    run = Run(model, req, scan_unroll)
    rows = [_RowText(model.tokenizer, req.stop_strings) for _ in range(run.n)]
    seen = [0] * run.n
    finished = [False] * run.n
    while True:
        tokens, lengths, hit_stop, lps = run.snapshot()
        done = np.asarray(run.state.done)  # one transfer per chunk, not one per row
        newly_stopped = []
        for i, row in enumerate(rows):
            if finished[i]:
                continue
            new = tokens[i, seen[i]:lengths[i]].tolist()
            seen[i] = lengths[i]
            done_dev = bool(done[i])
            text = row.push(new, final=done_dev)
            if row.stopped and not done_dev:
                newly_stopped.append(i)
            if done_dev or row.stopped:
                finished[i] = True
                reason = "stop" if (row.stopped or hit_stop[i]) else "length"
                yield StreamEvent(i, text, reason)
            elif text:
                yield StreamEvent(i, text)
        if newly_stopped:
            run.stop_rows(newly_stopped)
        if all(finished):
            break
        run.advance(chunk)
    if results is not None:
        tokens, lengths, hit_stop, lps = run.snapshot()
        for i, row in enumerate(rows):
            ids = row.ids if row.stopped else tokens[i, :lengths[i]].tolist()
            results.append(Completion(
                prompt=prompts_text[i], prompt_token_ids=list(req.prompts[i]), token_ids=ids,
                text=row.text, finish_reason="stop" if (row.stopped or hit_stop[i]) else "length",
                logprobs=lps[i, :len(ids)].tolist() if logprobs else None))
