"""The OpenAI-compatible HTTP API of `jaxinfer serve` (FastAPI; run by uvicorn).

Routes: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (streaming as server-sent events ending with `data: [DONE]`).
Every bad request gets one 4xx with an OpenAI-style error body before anything is admitted;
a full queue gets 429 with Retry-After; a failure inside one request gets 500 for that request
only. With an API key, /v1/* need `Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jaxinfer.serve import AGING, PREFILL_TOKENS, PREFIX_CACHE_MB, api
from jaxinfer.serve.api import APIError
from jaxinfer.serve.metrics import Metrics
from jaxinfer.serve.scheduler import EngineLoop, Event, Job, QueueFull

MAX_BODY = 1 << 20  # bytes of a request body


def create_app(model, *, model_name: str, slots: int = 8, max_len: int = 2048,
               max_queue: int = 64, api_key: str | None = None,
               timeout_s: float | None = 600.0, step_tokens: int = 8,
               kv_cache: str = "float", warm_up: bool = True,
               prefix_cache_bytes: int = PREFIX_CACHE_MB << 20,
               prefill_tokens: int = PREFILL_TOKENS,
               shortest_first: float | None = AGING) -> FastAPI:
    """The app serving `model` as `model_name`: `slots` decode slots of `max_len` tokens
    (prompt + completion), at most `max_queue` requests waiting for a slot, prompt prefixes
    kept up to `prefix_cache_bytes` (see generate.PrefixCache), and each engine step
    prefilling at most `prefill_tokens` prompt tokens before its `step_tokens` decode steps
    (the per-step token budget: a long prompt never stalls the running streams for longer).
    shortest_first: the order waiting requests get slots (generate.Engine's: shortest prompt
    first, aged by this many prompt tokens per second of waiting; None: first come)."""
    metrics = Metrics()
    engine = EngineLoop(model, slots=slots, max_len=max_len, max_queue=max_queue,
                        metrics=metrics, step_tokens=step_tokens, kv_cache=kv_cache,
                        prefix_cache_bytes=prefix_cache_bytes, prefill_tokens=prefill_tokens,
                        shortest_first=shortest_first)

    async def lifespan(app):
        engine.start(warm_up)
        yield
        engine.stop()

    app = FastAPI(title="jaxinfer", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "jaxinfer"}]}

    async def handle(request: Request, kind: str):
        check_key(request)
        body = await _read_json(request)
        s = api.parse_request(body, kind, model, model_name, max_len)
        job = Job(prompt_ids=s.prompt_ids, samplings=s.samplings, max_new=s.max_new,
                  stop_ids=s.stop_ids, stop_strings=s.stop_strings,
                  loop=asyncio.get_running_loop(), events=asyncio.Queue(), timeout_s=timeout_s)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", type="rate_limit_error",
                           code="queue_full") from None
        rid = api.new_id(kind)
        if s.stream:
            return StreamingResponse(_stream(job, s, kind, rid, model_name, model.tokenizer),
                                     media_type="text/event-stream")
        return await _complete(request, job, s, kind, rid, model_name, model.tokenizer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app


async def _read_json(request: Request):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def _error_from(ev: Event) -> APIError:
    timed_out = "timed out" in ev.message
    return APIError(504 if timed_out else 500, ev.message,
                    type="timeout" if timed_out else "server_error")


async def _complete(request: Request, job: Job, s: api.Settings, kind: str, rid: str,
                    model_name: str, tokenizer) -> dict:
    """Wait for every choice; a client that goes away cancels the job."""
    n = len(s.samplings)
    texts, ids, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    lps, tops = [[] for _ in range(n)], [[] for _ in range(n)]
    try:
        while any(r is None for r in reasons):
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    return Response(status_code=499)
                continue
            if ev.kind == "error":
                raise _error_from(ev)
            texts[ev.index] += ev.text
            if ev.kind == "delta":
                lps[ev.index] += ev.logprobs
                tops[ev.index] += ev.top_logprobs
            else:
                reasons[ev.index], ids[ev.index] = ev.finish_reason, ev.token_ids
    finally:
        if any(r is None for r in reasons):
            job.cancelled = True
    choices = [api.choice(kind, i, texts[i], reasons[i],
                          api.logprobs_obj(kind, tokenizer, ids[i], lps[i][:len(ids[i])],
                                           tops[i][:len(ids[i])] if s.top_logprobs else None)
                          if s.logprobs else None) for i in range(n)]
    used = api.usage(len(s.prompt_ids), sum(len(x) for x in ids))
    return api.envelope(kind, rid, model_name, choices, False, used)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: Job, s: api.Settings, kind: str, rid: str, model_name: str, tokenizer):
    """Server-sent events: chunks as text arrives, then usage (if asked) and [DONE]."""
    n = len(s.samplings)
    done, tokens = [False] * n, 0
    try:
        if kind == "chat":
            for i in range(n):
                yield _sse(api.envelope(kind, rid, model_name,
                                        [api.choice(kind, i, "", None, stream=True, first=True)],
                                        True))
        while not all(done):
            ev = await job.events.get()
            if ev.kind == "error":
                yield _sse(_error_from(ev).body())
                break
            if ev.kind == "delta":
                tokens += len(ev.token_ids)
                if not ev.text and not s.logprobs:
                    continue
                lp = api.logprobs_obj(kind, tokenizer, ev.token_ids, ev.logprobs,
                                      ev.top_logprobs if s.top_logprobs else None) \
                    if s.logprobs else None
                yield _sse(api.envelope(kind, rid, model_name,
                                        [api.choice(kind, ev.index, ev.text, None, lp, True)],
                                        True))
            else:
                done[ev.index] = True
                yield _sse(api.envelope(kind, rid, model_name,
                                        [api.choice(kind, ev.index, ev.text, ev.finish_reason,
                                                    None, True)], True))
        if s.include_usage:
            yield _sse(api.envelope(kind, rid, model_name, [], True,
                                    api.usage(len(s.prompt_ids), tokens)))
        yield "data: [DONE]\n\n"
    finally:
        if not all(done):
            job.cancelled = True  # the client went away (or the job failed): free the slots


class BackgroundServer:
    """A uvicorn server for `app` in a background thread (tests, benchmarks, notebooks):
    `.base` is its URL once constructed; `.stop()` shuts it down. start_timeout_s: how long
    the start (the engine's warm-up compiles: minutes on 2 busy cores) may take."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 900.0):
        import socket
        import threading

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.app, self.port = app, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + start_timeout_s
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {host}:{port} did not start")
            time.sleep(0.05)
        self.base = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    t = time.perf_counter()
    config = uvicorn.Config(app, host=host, port=port, log_level="info")
    server = uvicorn.Server(config)
    print(f"jaxinfer serve: http://{host}:{port}/v1 (ready in {time.perf_counter() - t:.1f}s)",
          flush=True)
    server.run()
