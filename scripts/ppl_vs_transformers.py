"""Perplexity of a GGUF model by jaxinfer and by transformers' own GGUF loading, on the same
token ids and sliding windows (held-out CPython docs text, float32 both).

    python scripts/ppl_vs_transformers.py --model gemma-3-270m --tokens 2048
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import jaxinfer
from jaxinfer.bench import english_text
from jaxinfer.evaluate import perplexity, sliding_windows
from jaxinfer.loading import resolve_source
from jaxinfer.text import encode_prompt

HELD_OUT = slice(200_000, None)  # characters, as scripts/bench_quant.py


def transformers_nll(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """(summed NLL, tokens scored) over jaxinfer's windows (evaluate.sliding_windows)."""
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), context, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[first:end])
        total -= float(logp[first - begin - 1:end - begin - 1].gather(1, targets[:, None]).sum())
        count += end - first
    return total, count


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    args = p.parse_args()
    path = resolve_source(args.model)
    model = jaxinfer.load(path, dtype="float32", progress=False)
    ids = encode_prompt(model, english_text()[HELD_OUT])[:args.tokens]
    t0 = time.perf_counter()
    ours = perplexity(model, np.array(ids), context=args.context, stride=args.stride,
                      batch_size=1, progress=False)
    t1 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    t2 = time.perf_counter()
    nll, count = transformers_nll(hf, ids, args.context, args.stride)
    ref = math.exp(nll / count)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; model {args.model}; "
          f"{len(ids)} tokens (BOS first) of pydoc_data.topics from character "
          f"{HELD_OUT.start}, context {args.context}, stride {args.stride}")
    print(f"jaxinfer     perplexity {ours['perplexity']:.4f} ({ours['tokens']} tokens scored, "
          f"{t1 - t0:.1f} s)")
    print(f"transformers perplexity {ref:.4f} ({count} tokens scored, "
          f"{time.perf_counter() - t2:.1f} s after a {t2 - t1:.1f} s load)")
    print(f"relative difference {(ours['perplexity'] - ref) / ref:+.2e}")


if __name__ == "__main__":
    main()
