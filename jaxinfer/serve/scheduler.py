"""The engine thread of `jaxinfer serve`: continuous batching over the slot engine.

One `EngineLoop` owns a `jaxinfer.generate.Engine` (B slots over one KV cache) and is the only
thread that touches it. The server hands it `Job`s (one API request: n choices, each an engine
request) with `submit`; the loop admits waiting choices into free slots between decode chunks
(prompt chunks of long prompts interleaved with the decode of the others), turns new tokens into
text (stop strings held back and cut, as `generate` does), and delivers events to each job's
asyncio queue with `call_soon_threadsafe`, so the server's event loop never blocks on the device.
Waiting requests get slots shortest prompt first, aged by their time in the queue
(generate.Engine's shortest_first), so a burst of long prompts does not hold short ones back.
A job that is cancelled (its client went away) or passes its deadline is released within one
decode chunk. A bounded queue: `submit` raises QueueFull when `max_queue` jobs already wait for
a slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from jaxinfer.generate import Engine, _RowText
from jaxinfer.sampling import MAX_TOP_LOGPROBS, Sampling
from jaxinfer.serve import PREFILL_TOKENS, PREFIX_CACHE_MB

log = logging.getLogger("jaxinfer.serve")


class QueueFull(Exception):
    """The waiting queue is full (the server answers 429)."""


@dataclasses.dataclass
class Event:
    """What a job's queue receives: kind "delta" (new text of choice `index`), "done" (choice
    `index` finished with `finish_reason`) or "error" (the whole job failed: `message`)."""

    kind: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    message: str = ""


@dataclasses.dataclass
class Job:
    """One API request: `samplings` holds one Sampling per choice (n of them)."""

    prompt_ids: list[int]
    samplings: list[Sampling]
    max_new: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    timeout_s: float | None = None
    cancelled: bool = False  # set by the server (client gone); read by the engine thread
    queued: bool = True  # some choice still waits for a slot (counts against max_queue)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclasses.dataclass
class _Choice:
    job: Job
    index: int
    handle: int
    text: _RowText
    seen: int = 0
    last_token_t: float | None = None


class EngineLoop:
    """The engine thread (see the module docstring). metrics: a `serve.metrics.Metrics`."""

    def __init__(self, model, *, slots: int, max_len: int, max_queue: int, metrics,
                 step_tokens: int = 8, kv_cache: str = "float",
                 prefix_cache_bytes: int = PREFIX_CACHE_MB << 20,
                 prefill_tokens: int = PREFILL_TOKENS,
                 shortest_first: float | None = None):
        self.model, self.metrics, self.max_queue = model, metrics, max_queue
        self.step_tokens = step_tokens
        self.engine = Engine(model, slots=slots, cache_len=max_len, buf_len=max_len,
                             kv_cache=kv_cache, admit_group=1,
                             prefix_cache_bytes=prefix_cache_bytes,
                             prefill_tokens=prefill_tokens, shortest_first=shortest_first,
                             top_logprobs=MAX_TOP_LOGPROBS)
        self.max_len = max_len
        self.inbox: queue.Queue = queue.Queue()
        self.choices: list[_Choice] = []
        self._waiting = 0  # jobs submitted whose choices do not all have a slot yet
        self._lock = threading.Lock()
        self._stop = False
        self._hits = self._misses = 0
        self.thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)

    def start(self, warm_up: bool = True) -> EngineLoop:
        """Start the thread (after compiling every admit and decode shape, unless warm_up is
        False: then the first requests of each prompt size compile theirs)."""
        if warm_up:
            self.engine.warm_up()
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    # -- called from the server's thread ----------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when max_queue jobs already wait for slots."""
        with self._lock:
            if self._waiting >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"{self._waiting} requests are waiting for a slot")
            self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self.inbox.put(job)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            try:
                self._take(block=not self.choices)
                if self._stop:
                    break
                self._drop_cancelled()
                if self.choices:
                    self.engine.advance(self.step_tokens)
                    self._count_prefixes()
                    self._emit()
            except Exception as e:  # never let one failure stop the engine
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _take(self, block: bool) -> None:
        """Move new jobs from the inbox into the engine (block when there is nothing to do)."""
        while True:
            try:
                job = self.inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            block = False
            if job is None:
                return
            if job.cancelled:
                self._unqueue(job)
                continue
            for i, s in enumerate(job.samplings):
                h = self.engine.submit(job.prompt_ids, s, job.max_new, job.stop_ids)
                text = _RowText(self.model.tokenizer, job.stop_strings)
                self.choices.append(_Choice(job, i, h, text))
            self.metrics.admitted.inc()
            self.metrics.prompt_tokens.inc(len(job.prompt_ids) * len(job.samplings))

    def _unqueue(self, job: Job) -> None:
        """The job no longer waits for slots (all choices live, or it ended)."""
        if not job.queued:
            return
        job.queued = False
        with self._lock:
            self._waiting -= 1
        self.metrics.queue_depth.set(self._waiting)

    def _drop_cancelled(self) -> None:
        now = time.perf_counter()
        for c in list(self.choices):
            job = c.job
            late = job.timeout_s is not None and now - job.submitted > job.timeout_s
            if job.cancelled or late:
                self._finish(c, release=True)
                if late and not job.cancelled:
                    job.cancelled = True
                    job.send(Event("error", message=f"request timed out after {job.timeout_s} s"))
                    self.metrics.cancelled.inc()
                elif c.index == 0:
                    self.metrics.cancelled.inc()

    def _finish(self, c: _Choice, release: bool) -> None:
        if release:
            self.engine.release([c.handle])
        self.engine.forget(c.handle)
        self.choices.remove(c)
        if not any(o.job is c.job for o in self.choices):
            self._unqueue(c.job)
        self.metrics.active_slots.set(len(self.engine.by_slot))

    def _emit(self) -> None:
        """Send each choice's new text; finish the choices that ended."""
        now = time.perf_counter()
        for c in list(self.choices):
            job = c.job
            if not self.engine.live(c.handle):
                continue
            ids, lps, hit = self.engine.result(c.handle)
            done = self.engine.finished(c.handle)
            new = ids[c.seen:]
            if new:
                if job.first_token_s is None:
                    job.first_token_s = now - job.submitted
                    self.metrics.ttft.observe(job.first_token_s)
                elif c.last_token_t is not None:
                    self.metrics.itl.observe((now - c.last_token_t) / len(new))
                c.last_token_t = now
                self.metrics.generated_tokens.inc(len(new))
            text = c.text.push(new, final=done)
            c.seen = len(ids)
            if text or new:
                job.send(Event("delta", c.index, text, new, lps[len(ids) - len(new):],
                               self.engine.top(c.handle, len(ids) - len(new))))
            if done or c.text.stopped:
                reason = "stop" if (c.text.stopped or hit) else "length"
                job.send(Event("done", c.index, finish_reason=reason,
                               token_ids=c.text.ids if c.text.stopped else ids))
                self._finish(c, release=not done)
                if not any(o.job is job for o in self.choices):
                    self.metrics.finished.inc()
        for c in self.choices:
            if c.job.queued and all(self.engine.live(o.handle) for o in self.choices
                                    if o.job is c.job):
                self._unqueue(c.job)
        self.metrics.active_slots.set(len(self.engine.by_slot))

    def _count_prefixes(self) -> None:
        p = self.engine.prefixes
        if p is None:
            return
        self.metrics.prefix_hits.inc(p.hits - self._hits)
        self.metrics.prefix_misses.inc(p.misses - self._misses)
        self._hits, self._misses = p.hits, p.misses

    def _fail_all(self, message: str) -> None:
        for c in list(self.choices):
            if c.index == 0:
                c.job.send(Event("error", message=message))
            try:
                self._finish(c, release=True)
            except Exception:  # the engine itself may be broken: drop the bookkeeping
                self.choices.remove(c)
