"""Serving throughput and latency: continuous batching (`jaxinfer serve`) against static batching
of the same requests on the same engine, in one run.

A fixed workload (mixed prompt lengths, mixed output lengths with ignore_eos so lengths are
exact, greedy) is sent to an in-process server on 127.0.0.1 by 1, 4, 16, ... concurrent
streaming clients and as one burst; static batching runs the same requests in arrival order in
batches of the slot count, each batch until its longest row ends. Prints a Markdown table;
`--out FILE` also writes it.

    python scripts/bench_serve.py --requests 64 --slots 16 --concurrency 1 4 16 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import time

import httpx2 as httpx
import numpy as np

import jaxinfer
from jaxinfer.bench import english_text, publish
from jaxinfer.generate import Request, generate_ids
from jaxinfer.sampling import Sampling
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


def one_request(base: str, prompt: list[int], max_tokens: int) -> dict:
    """Stream one completion; returns tokens, TTFT and per-token gaps (seconds)."""
    t0 = time.perf_counter()
    first, gaps, tokens, last = None, [], 0, None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            lp = chunk["choices"][0].get("logprobs") if chunk["choices"] else None
            k = len(lp["tokens"]) if lp else 0
            if not k:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            elif last is not None:
                gaps += [(now - last) / k] * k
            last, tokens = now, tokens + k
    return {"tokens": tokens, "ttft": first, "gaps": gaps}


def run_served(base: str, reqs, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: one_request(base, *r), reqs))
    wall = time.perf_counter() - t0
    assert all(r["tokens"] == m for r, (_, m) in zip(results, reqs, strict=True))
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]] or [0.0]
    return {"wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "requests_per_s": len(reqs) / wall, "ttft_p50": np.percentile(ttft, 50),
            "ttft_p99": np.percentile(ttft, 99), "itl_p50": np.percentile(gaps, 50),
            "itl_p99": np.percentile(gaps, 99)}


def run_static(model, reqs, slots: int) -> dict:
    """The same requests in arrival order, `slots` at a time, each batch to its longest row."""
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(reqs), slots):
        batch = reqs[i:i + slots]
        longest = max(m for _, m in batch)
        req = Request(prompts=[p for p, _ in batch], sampling=[Sampling()],
                      max_new_tokens=longest, stop_token_ids=())
        out = generate_ids(model, req)
        tokens += sum(min(len(c.token_ids), m) for c, (_, m) in zip(out, batch, strict=True))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(reqs) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 512])
    p.add_argument("--out-range", type=int, nargs=2, default=[8, 256])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model = jaxinfer.load(args.model, progress=False)
    reqs = workload(model, args.requests, prompt_range=args.prompt_range,
                    out_range=args.out_range)
    server = BackgroundServer(create_app(model, model_name="m", slots=args.slots,
                                         max_len=args.max_len, max_queue=10 * args.requests))
    try:
        warm = reqs[: args.slots]
        run_served(server.base, warm, len(warm))  # compile the shapes the run will use
        rows = [(f"continuous, {c} client{'s' if c > 1 else ''}", run_served(server.base, reqs, c))
                for c in args.concurrency]
        rows.append(("continuous, burst", run_served(server.base, reqs, len(reqs))))
    finally:
        server.stop()
    run_static(model, reqs[: args.slots], args.slots)  # warm-up
    static = run_static(model, reqs, args.slots)
    burst = rows[-1][1]
    head = (f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}. {args.requests} "
            f"requests, prompts {args.prompt_range[0]}-{args.prompt_range[1]} tokens, outputs "
            f"{args.out_range[0]}-{args.out_range[1]} tokens (ignore_eos, greedy), "
            f"{args.slots} slots, max_len {args.max_len}.\n"
            f"Continuous (burst) / static: {burst['tokens_per_s'] / static['tokens_per_s']:.2f}x "
            "output tokens/s.")
    table = ["| mode | output tokens/s | requests/s | TTFT p50 (s) | TTFT p99 (s) | "
             "ITL p50 (ms) | ITL p99 (ms) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        table.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {1e3 * r['itl_p50']:.1f} | "
                     f"{1e3 * r['itl_p99']:.1f} |")
    table.append(f"| static batches of {args.slots} | {static['tokens_per_s']:.1f} | "
                 f"{static['requests_per_s']:.2f} | | | | |")
    publish(head, table, out=args.out)


if __name__ == "__main__":
    main()
