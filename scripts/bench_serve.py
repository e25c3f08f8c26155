"""Serving throughput and latency: continuous batching (`jaxinfer serve`) against static batching
of the same requests on the same engine, and against llama.cpp's `llama-server`, in one run.

A fixed workload (mixed prompt lengths, mixed output lengths with ignore_eos so lengths are
exact, greedy) is sent to an in-process server on 127.0.0.1 by 1, 4, 16, ... concurrent
streaming clients and as one burst (the server's order of admission, shortest prompt first,
aged; then once more first come, first served); static batching runs the same requests in
arrival order in batches of the slot count, each batch until its longest row ends. The
continuous / static ratio comes from `--pairs` rounds run one right after the other (static,
then the burst again), so that the machine's drift within a run does not favour either.
`--llama-server BIN` also starts that binary on the same GGUF file (`-np` = slots, `-t` =
threads, 127.0.0.1) and sends it the same token ids (its own `/completion` endpoint). Prints
a Markdown table; `--out FILE` also writes it. Needs a quiet machine: llama.cpp's threads
spin-wait and collapse under load.

    python scripts/bench_serve.py --requests 64 --slots 16 --concurrency 1 4 16 32 \
        --quant native --llama-server /path/to/llama-server
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import numpy as np

import jaxinfer
from jaxinfer import kernels
from jaxinfer.bench import english_text, publish
from jaxinfer.engine import KV_CACHES
from jaxinfer.generate import Engine
from jaxinfer.sampling import Sampling
from jaxinfer.serve import PREFILL_TOKENS
from jaxinfer.serve.app import BackgroundServer, create_app


def workload(model, n: int, seed: int = 0, prompt_range=(16, 512), out_range=(8, 256)):
    """n (prompt ids, max_tokens): log-uniform lengths, prompts cut from real English text."""
    rng = np.random.default_rng(seed)
    ids = model.tokenizer.encode(english_text()[:400_000])
    out = []
    for _ in range(n):
        p = int(np.exp(rng.uniform(*np.log(prompt_range))))
        m = int(np.exp(rng.uniform(*np.log(out_range))))
        start = int(rng.integers(0, len(ids) - p))
        out.append((ids[start:start + p], m))
    return out


def _jaxinfer_body(prompt: list[int], max_tokens: int) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": True, "stream": True, "logprobs": True}


def _jaxinfer_tokens(chunk: dict) -> int:
    lp = chunk["choices"][0].get("logprobs") if chunk["choices"] else None
    return len(lp["tokens"]) if lp else 0


def _llama_body(prompt: list[int], max_tokens: int) -> tuple[str, dict]:
    return "/completion", {"prompt": prompt, "n_predict": max_tokens, "temperature": 0,
                           "ignore_eos": True, "stream": True, "cache_prompt": False}


def _llama_tokens(chunk: dict) -> int:
    return len(chunk.get("tokens") or [])


PROTOCOLS = {"jaxinfer": (_jaxinfer_body, _jaxinfer_tokens),
             "llama-server": (_llama_body, _llama_tokens)}


def one_request(client: httpx.Client, base: str, prompt: list[int], max_tokens: int,
                protocol: str = "jaxinfer") -> dict:
    """Stream one completion through `client`; returns tokens, TTFT and per-token gaps (s)."""
    make_body, count = PROTOCOLS[protocol]
    t0 = time.perf_counter()
    first, gaps, tokens, last = None, [], 0, None
    path, body = make_body(prompt, max_tokens)
    with client.stream("POST", base + path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            k = count(json.loads(line[6:]))
            if not k:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            elif last is not None:
                gaps += [(now - last) / k] * k
            last, tokens = now, tokens + k
    return {"tokens": tokens, "ttft": first, "gaps": gaps}


SHORT_PROMPT = 64  # "short requests" of the burst row: prompts of at most this many tokens


def run_served(base: str, reqs, concurrency: int, protocol: str = "jaxinfer") -> dict:
    """Send every request with `concurrency` clients; throughput and latency percentiles.

    The clients share one connection pool: a client of its own per request would build an
    SSL context each time (~50 ms of CPU holding the GIL, measured here), and a burst of 64
    would spend seconds of the 2 cores on the load generator instead of the server. Each
    request opens its own connection (no keep-alive: llama-server closes idle ones, and a
    pooled connection it closed fails the next request sent on it)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    with httpx.Client(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda r: one_request(client, base, *r, protocol), reqs))
        wall = time.perf_counter() - t0
    got = [r["tokens"] for r in results]
    assert got == [m for _, m in reqs], f"{protocol}: token counts {got}"
    ttft = [r["ttft"] for r in results]
    short = [r["ttft"] for r, (p, _) in zip(results, reqs, strict=True)
             if len(p) <= SHORT_PROMPT] or [0.0]
    gaps = [g for r in results for g in r["gaps"]] or [0.0]
    return {"wall_s": wall, "tokens_per_s": sum(got) / wall,
            "requests_per_s": len(reqs) / wall, "ttft_p50": np.percentile(ttft, 50),
            "ttft_p99": np.percentile(ttft, 99), "itl_p50": np.percentile(gaps, 50),
            "itl_p99": np.percentile(gaps, 99), "short_ttft_p50": np.percentile(short, 50),
            "short_ttft_p99": np.percentile(short, 99)}


def _clients(c: int) -> str:
    return f"{c} client{'s' if c > 1 else ''}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_rows(binary: str, gguf, reqs, args) -> list[tuple[str, dict]]:
    """The same workload against llama-server (same file, slots and threads), then stop it."""
    port = _free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(args.slots), "-c", str(args.slots * args.max_len), "-t", str(args.threads),
           "-tb", str(args.threads), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.5)
        run_served(base, reqs[: args.slots], args.slots, "llama-server")  # warm-up
        rows = [(f"llama-server, {_clients(c)}", run_served(base, reqs, c, "llama-server"))
                for c in args.concurrency]
        rows.append(("llama-server, burst", run_served(base, reqs, len(reqs), "llama-server")))
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def run_static(model, reqs, slots: int, max_len: int, kv_cache: str = "float",
               prefill_tokens: int = PREFILL_TOKENS) -> dict:
    """The same requests in arrival order, `slots` at a time: each batch is prefilled whole,
    then decoded until its longest row ends (the engine and shapes of the server's)."""
    eng = Engine(model, slots=slots, cache_len=max_len, buf_len=max_len, admit_group=1,
                 prefill_tokens=prefill_tokens, kv_cache=kv_cache)
    eng.warm_up()  # as the server's engine
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(reqs), slots):
        batch = reqs[i:i + slots]
        handles = [eng.submit(p, Sampling(), m) for p, m in batch]
        while any(eng.entries[h].prefilled < len(eng.entries[h].ids) for h in handles):
            eng.advance(0)  # prefill only
        longest = max(m for _, m in batch)
        while not all(eng.finished(h) for h in handles):
            eng.advance(longest)
        for h in handles:
            tokens += len(eng.result(h)[0])
            eng.forget(h)
    wall = time.perf_counter() - t0
    assert tokens == sum(m for _, m in reqs)
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(reqs) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant", choices=["none", "native"], default="none",
                   help="native: keep the GGUF's blocks packed (the kernels' fastest path)")
    p.add_argument("--kv-cache", choices=list(KV_CACHES), default="float",
                   help="jaxinfer's KV cache storage (llama-server's default is float16)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 512])
    p.add_argument("--out-range", type=int, nargs=2, default=[8, 256])
    p.add_argument("--llama-server", default=None, metavar="BIN",
                   help="also measure this llama-server binary on the same GGUF file")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="llama-server's threads (jaxinfer's XLA and kernels use every core)")
    p.add_argument("--pairs", type=int, default=2,
                   help="then static batches and the continuous burst run alternately this many "
                        "times (the machine's speed drifts within a run); the ratio is of those")
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS,
                   help="prompt tokens prefilled per engine step, in the server and in the static "
                        "batches (the server's --prefill-tokens)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")

    model = jaxinfer.load(args.model, progress=False, keep_packed=args.quant == "native")
    reqs = workload(model, args.requests, prompt_range=args.prompt_range,
                    out_range=args.out_range)
    server = BackgroundServer(create_app(model, model_name="m", slots=args.slots,
                                         max_len=args.max_len, max_queue=10 * args.requests,
                                         prefill_tokens=args.prefill_tokens,
                                         prefix_cache_bytes=0,
                                         kv_cache=args.kv_cache))
    rows = []

    def measured(name, result):
        rows.append((name, result))
        print(f"{name}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)

    try:
        run_served(server.base, reqs, len(reqs))  # warm-up: compiles every shape the run uses
        for c in args.concurrency:
            measured(f"continuous, {_clients(c)}", run_served(server.base, reqs, c))
        measured("continuous, burst", run_served(server.base, reqs, len(reqs)))
        engine = server.app.state.engine.engine  # nothing in flight: switch its admission order
        aging, engine.shortest_first = engine.shortest_first, None
        measured("continuous, burst, first come first served",
                 run_served(server.base, reqs, len(reqs)))
        engine.shortest_first = aging
        static_args = (args.slots, args.max_len, args.kv_cache, args.prefill_tokens)
        run_static(model, reqs[: args.slots], *static_args)  # warm-up
        pairs = []  # (static, continuous burst), measured one right after the other
        for _ in range(args.pairs):
            static = run_static(model, reqs, *static_args)
            print(f"static: {static['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
            burst = run_served(server.base, reqs, len(reqs))
            print(f"continuous, burst: {burst['tokens_per_s']:.1f} tokens/s", file=sys.stderr,
                  flush=True)
            pairs.append((static, burst))
    finally:
        server.stop()
    static = {k: float(np.median([a[k] for a, _ in pairs]))
              for k in ("tokens_per_s", "requests_per_s")}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
    if args.llama_server:
        from jaxinfer.loading import resolve_source

        rows += llama_server_rows(args.llama_server, resolve_source(args.model), reqs, args)
    isa = kernels.isa()
    native = f"on ({isa})" if isa else "off (JAXINFER_NATIVE=0, or no ISA the kernels have)"
    head = (f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} "
            f"cores. {args.model}, weights {args.quant}, KV cache {args.kv_cache}, native "
            f"kernels {native}. "
            f"{args.requests} requests, prompts {args.prompt_range[0]}-{args.prompt_range[1]} "
            f"tokens, outputs {args.out_range[0]}-{args.out_range[1]} tokens (ignore_eos, "
            f"greedy), {args.slots} slots, max_len {args.max_len}, {args.prefill_tokens} prompt "
            f"tokens per engine step, no prefix cache (llama-server: cache_prompt off); short "
            f"requests: prompts of at most {SHORT_PROMPT} tokens.\n"
            f"Continuous (burst) / static: {float(np.median(ratios)):.2f}x output tokens/s "
            f"(median over {len(pairs)} pairs measured alternately, static then burst: "
            + ", ".join(f"{a['tokens_per_s']:.1f} / {b['tokens_per_s']:.1f} = {r:.2f}x"
                        for (a, b), r in zip(pairs, ratios, strict=True)) + ").")
    bursts = [dict(rows)["continuous, burst"]] + [b for _, b in pairs]
    short = [b["short_ttft_p99"] / b["short_ttft_p50"] for b in bursts if b["short_ttft_p50"]]
    if short:  # (a workload without short prompts has none)
        head += (f" Short requests' TTFT p99 / p50 in the bursts (shortest first): "
                 f"{float(np.median(short)):.2f}x median over {len(short)} bursts ("
                 + ", ".join(f"{r:.2f}x" for r in short) + ").")
    for c in args.concurrency:
        ours = dict(rows).get(f"continuous, {_clients(c)}")
        theirs = dict(rows).get(f"llama-server, {_clients(c)}")
        if ours and theirs:
            head += (f" {c} client(s): jaxinfer / llama-server "
                     f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x.")
    table = ["| mode | output tokens/s | requests/s | TTFT p50 (s) | TTFT p99 (s) | "
             "short TTFT p50 / p99 (s) | ITL p50 (ms) | ITL p99 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        table.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['short_ttft_p50']:.2f} / {r['short_ttft_p99']:.2f} | "
                     f"{1e3 * r['itl_p50']:.1f} | {1e3 * r['itl_p99']:.1f} |")
    table.append(f"| static batches of {args.slots} (median of the pairs) | "
                 f"{static['tokens_per_s']:.1f} | {static['requests_per_s']:.2f} | | | | | |")
    publish(head, table, out=args.out)


if __name__ == "__main__":
    main()
