"""Time one batched decode step of the slot engine: every slot live, at several context lengths.

Each KV cache storage (`--kv-cache`, the first is the anchor) gets a fresh Engine with
`--slots` slots of `--cache-len` tokens; every slot is given a prompt of P random tokens
(greedy, as many new tokens as the timing needs), the prompts are prefilled, one
`advance(--steps)` compiles and warms up, and `--repeats` more are timed. Prints a table of
milliseconds per step (median) and tokens per second, and each row against the anchor.

    python scripts/bench_decode_step.py --quant native --prompt-lengths 20 500 \
        --kv-cache float float16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

import jaxinfer
from jaxinfer import kernels
from jaxinfer.bench import publish
from jaxinfer.engine import KV_CACHES
from jaxinfer.generate import Engine
from jaxinfer.sampling import Sampling


def step_ms(model, kv_cache: str, prompt_len: int, *, slots: int, cache_len: int, steps: int,
            repeats: int) -> list[float]:
    """Milliseconds per decode step of `repeats` timed advance(steps) calls."""
    buf = steps * (repeats + 1) + 8  # no slot finishes inside the timed calls
    if prompt_len + buf > cache_len:
        raise SystemExit(f"--prompt-lengths {prompt_len} + {buf} new tokens exceed --cache-len")
    eng = Engine(model, slots=slots, cache_len=cache_len, buf_len=buf, kv_cache=kv_cache)
    rng = np.random.default_rng(prompt_len)
    handles = [eng.submit(rng.integers(10, model.config.vocab_size, prompt_len).tolist(),
                          Sampling(temperature=0.0), buf) for _ in range(slots)]
    while not all(eng.live(h) for h in handles):
        eng.advance(0)  # prefill every prompt (chunks) before timing
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        eng.advance(steps)
        jax.block_until_ready(eng.state)
        if i:  # the first call compiles
            times.append((time.perf_counter() - t) * 1e3 / steps)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant", choices=["none", "native"], default="native",
                   help="native: keep the GGUF's blocks packed (the kernels' fastest path)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[20, 500])
    p.add_argument("--kv-cache", nargs="+", default=["float", "float16"],
                   choices=list(KV_CACHES))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args()

    model = jaxinfer.load(args.model, progress=False, keep_packed=args.quant == "native")
    rows = {}
    for length in args.prompt_lengths:
        for kv in args.kv_cache:
            ms = step_ms(model, kv, length, slots=args.slots, cache_len=args.cache_len,
                         steps=args.steps, repeats=args.repeats)
            rows[length, kv] = ms
            print(f"prompt {length}, kv {kv}: {' / '.join(f'{m:.1f}' for m in ms)} ms/step",
                  flush=True)
    isa = kernels.isa() or "off"
    head = (f"{platform.machine()}, {os.cpu_count()} cores, native kernels {isa}; {args.model}, "
            f"weights {args.quant}, {args.slots} slots of {args.cache_len} tokens, "
            f"advance({args.steps}) x {args.repeats}")
    table = [f"| prompt tokens | KV cache | ms/step (median) | tokens/s | vs {args.kv_cache[0]} |",
             "|---|---|---|---|---|"]
    for (length, kv), ms in rows.items():
        med, anchor = statistics.median(ms), statistics.median(rows[length, args.kv_cache[0]])
        table.append(f"| {length} | {kv} | {med:.1f} | {args.slots * 1e3 / med:.0f} | "
                     f"{anchor / med:.2f}x |")
    publish(head, table, out=args.out)

if __name__ == "__main__":
    main()
