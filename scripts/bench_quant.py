"""Quality, size and speed of each quantization scheme on one machine, in one run.

Perplexity on held-out English text (the CPython docs in pydoc_data.topics, away from the
GPTQ calibration part), weight bytes, and greedy decode tokens/s at batch 1 and 16, with the
float and the int8 KV cache. Prints a Markdown table; `--out FILE` writes it too.

    python scripts/bench_quant.py --eval-tokens 4096 --out docs/QUANT_RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jaxinfer
from jaxinfer.bench import english_text, publish, run_bench
from jaxinfer.evaluate import perplexity
from jaxinfer.quant.recipes import quantize_model

CALIB = slice(0, 150_000)  # characters used for GPTQ calibration
HELD_OUT = slice(200_000, None)  # characters used for perplexity

VARIANTS = [  # (label, recipe kwargs or special name)
    ("float32", None),
    ("int8 (+ int8 embed)", dict(scheme="int8")),
    ("int4 g32 sym (+ int8 embed)", dict(scheme="int4", group_size=32)),
    ("int4 g32 sym (+ int4 embed)", dict(scheme="int4", group_size=32, embed="same")),
    ("int4 g32 asym (+ int8 embed)", dict(scheme="int4", group_size=32, symmetric=False)),
    ("int4 g64 sym (+ int8 embed)", dict(scheme="int4", group_size=64)),
    ("GPTQ int4 g64 sym (+ int8 embed)", dict(scheme="int4", group_size=64, method="gptq")),
    ("w8a8 (+ int8 embed)", dict(scheme="w8a8")),
    ("GGUF native (Q4_1 layers, Q8_0 embed)", "native"),
]


def build(base, label, kw, args):
    if kw is None:
        return base
    if kw == "native":
        return jaxinfer.load("smollm2-135m-instruct", "float32", keep_packed=True)
    if kw.get("method") == "gptq":
        kw = dict(kw, calibration_text=english_text()[CALIB], calib_samples=args.calib_samples,
                  calib_len=512)
    return quantize_model(base, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="labels (prefix match) to run")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base = jaxinfer.load("smollm2-135m-instruct", dtype="float32")
    ids = base.tokenizer.encode(english_text()[HELD_OUT][: args.eval_tokens * 8])[: args.eval_tokens]
    rows = ["| weights | ppl | Δ ppl | weight MB | × f32 | b1 tok/s | b1 tok/s kv int8 "
            "| b16 tok/s | b16 tok/s kv int8 |", "|---|---|---|---|---|---|---|---|---|"]
    ref_ppl = ref_bytes = None
    for label, kw in VARIANTS:
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        t = time.perf_counter()
        model = build(base, label, kw, args)
        build_s = time.perf_counter() - t
        ppl = perplexity(model, ids, context=512, stride=256, progress=False)["perplexity"]
        ref_ppl = ref_ppl or ppl
        ref_bytes = ref_bytes or model.weight_bytes
        speed = {}
        for b in (1, 16):
            for kv in ("float", "int8"):
                r = run_bench(model, batch_size=b, prompt_len=64, new_tokens=args.new_tokens,
                              kv_cache=kv)
                speed[b, kv] = r["decode_tokens_per_s"]
        rows.append(f"| {label} | {ppl:.3f} | {100 * (ppl / ref_ppl - 1):+.2f}% "
                    f"| {model.weight_bytes / 1e6:.1f} | {model.weight_bytes / ref_bytes:.3f} "
                    f"| {speed[1, 'float']} | {speed[1, 'int8']} | {speed[16, 'float']} "
                    f"| {speed[16, 'int8']} |")
        print(rows[-1], f"(built in {build_s:.1f}s)", flush=True)
        model = dataclasses.replace(model, params=None)
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU (XLA:CPU). "
              f"Perplexity: {len(ids)} tokens of held-out pydoc_data.topics text, context 512, "
              f"stride 256. Decode: greedy, prompt 64, {args.new_tokens} new tokens.")
    publish(header, rows, out=args.out)


if __name__ == "__main__":
    main()
