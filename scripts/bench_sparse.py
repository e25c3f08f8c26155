"""Quality, size and speed of each kind of pruning on one machine, in one run.

Perplexity on held-out English text (the CPython docs in pydoc_data.topics, away from the part
used for calibration and recovery), weight bytes, and greedy decode tokens/s at batch 1 and 16.
Then a micro-benchmark of one 50%-sparse projection: dense matmul, BCOO (jax.experimental.sparse)
and the compressed 2:4 leaf. Prints Markdown; `--out FILE` writes it too.

    python scripts/bench_sparse.py --recover-steps 200 --out docs/SPARSITY_RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import jaxinfer
from jaxinfer.bench import english_text, publish, run_bench
from jaxinfer.evaluate import perplexity
from jaxinfer.quant import NMSparseWeight
from jaxinfer.sparse import PruneSettings, prune_model, sparsify

CALIB = slice(0, 150_000)  # characters for calibration and recovery
HELD_OUT = slice(200_000, None)  # characters for perplexity


def variants(steps: int):
    """(label, PruneSettings or None for the dense model)."""
    s25 = PruneSettings(method="structured", sparsity=0.25)
    s50 = PruneSettings(method="structured", sparsity=0.5)
    rec = dict(recover_steps=steps, learning_rate=1e-4)
    return [
        ("dense", None),
        ("magnitude 50%", PruneSettings(method="magnitude", sparsity=0.5)),
        ("Wanda 50%", PruneSettings(method="wanda", sparsity=0.5)),
        ("2:4 Wanda (compressed)", PruneSettings(method="nm", n=2, m=4)),
        ("2:4 Wanda + int8", PruneSettings(method="nm", n=2, m=4, quant="int8")),
        ("structured 25% FFN", s25),
        (f"structured 25% FFN + {steps} recovery steps", dataclasses.replace(s25, **rec)),
        ("structured 50% FFN", s50),
        (f"structured 50% FFN + {steps} recovery steps", dataclasses.replace(s50, **rec)),
    ]


def micro(repeats: int = 50) -> list[str]:
    """ms per call of x @ W for SmolLM2's gate projection shape at 50% sparsity."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(576, 1536)).astype(np.float32)
    unstructured = np.asarray(sparsify({"layers": {"mlp": {"gate": w[None]}}}, "layers/mlp/gate",
                                       method="magnitude", sparsity=0.5)["layers"]["mlp"]["gate"][0])
    nm = np.asarray(sparsify({"layers": {"mlp": {"gate": w[None]}}}, "layers/mlp/gate",
                             method="nm", n=2, m=4)["layers"]["mlp"]["gate"][0])
    ops = {
        "dense float32": (lambda x, a: x @ a, jnp.asarray(w)),
        "BCOO 50% unstructured": (lambda x, a: x @ a, jsparse.BCOO.fromdense(unstructured)),
        "2:4 compressed leaf": (lambda x, a: a.matmul(x), NMSparseWeight.from_dense(nm, 2, 4)),
    }
    rows = ["| x @ W [576, 1536] | batch 1 ms | batch 16 ms |", "|---|---|---|"]
    for label, (fn, arg) in ops.items():
        f = jax.jit(fn)
        times = []
        for b in (1, 16):
            x = jnp.asarray(rng.normal(size=(b, 576)).astype(np.float32))
            f(x, arg).block_until_ready()
            t = time.perf_counter()
            for _ in range(repeats):
                y = f(x, arg)
            y.block_until_ready()
            times.append((time.perf_counter() - t) / repeats * 1e3)
        rows.append(f"| {label} | {times[0]:.3f} | {times[1]:.3f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--recover-steps", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None, help="labels (prefix match) to run")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base = jaxinfer.load("smollm2-135m-instruct", dtype="float32")
    text = english_text()
    ids = base.tokenizer.encode(text[HELD_OUT][: args.eval_tokens * 8])[: args.eval_tokens]
    rows = ["| model | ppl | Δ ppl | weight MB | sparsity | b1 tok/s | b16 tok/s | b16 × dense "
            "| build s |", "|---|---|---|---|---|---|---|---|---|"]
    ref_ppl = ref_b16 = None
    for label, settings in variants(args.recover_steps):
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        t = time.perf_counter()
        model, report = (base, {}) if settings is None else prune_model(
            base, settings, text[CALIB], progress=False)
        build_s = time.perf_counter() - t
        ppl = perplexity(model, ids, context=512, stride=256, progress=False)["perplexity"]
        ref_ppl = ref_ppl or ppl
        speed = {b: run_bench(model, batch_size=b, prompt_len=64,
                              new_tokens=args.new_tokens)["decode_tokens_per_s"] for b in (1, 16)}
        ref_b16 = ref_b16 or speed[16]
        kept = (f"d_ff {report['d_ff'][1]}" if "d_ff" in report
                else f"{report.get('sparsity', 0):.3f}")
        rows.append(f"| {label} | {ppl:.3f} | {100 * (ppl / ref_ppl - 1):+.1f}% "
                    f"| {model.weight_bytes / 1e6:.1f} | {kept} | {speed[1]} | {speed[16]} "
                    f"| {speed[16] / ref_b16:.2f} | {build_s:.0f} |")
        print(rows[-1], flush=True)
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU (XLA:CPU), jax "
              f"{jax.__version__}. Perplexity: {len(ids)} tokens of held-out pydoc_data.topics "
              f"text, context 512, stride 256. Decode: greedy, prompt 64, {args.new_tokens} new "
              "tokens. Calibration (Wanda and structured scores): 32 windows x 256 tokens; "
              f"recovery: {args.recover_steps} steps x 2 windows x 128 tokens, lr 1e-4, "
              "distilled from the dense model.")
    publish(header, rows, micro(), out=args.out)


if __name__ == "__main__":
    main()
