"""Decode speed of jaxinfer against transformers (PyTorch CPU, float32) in one run.

Same model file, same prompt (real English text), greedy, stop tokens off, same length.
Prints a Markdown table; `--out FILE` also writes it. Needs the test extra (torch, transformers).

    python scripts/bench_generate.py --prompt-len 64 --new-tokens 128 --batch-sizes 1 16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import jaxinfer
from jaxinfer.bench import prompt_ids, publish, run_bench
from jaxinfer.loading import resolve_source


def transformers_decode(path, ids: list[int], batch: int, new_tokens: int) -> dict:
    """Greedy generate with transformers; decode tokens/s excludes the first token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    inputs = torch.tensor([ids] * batch)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(inputs, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        model.generate(inputs, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = model.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        t2 = time.perf_counter()
    assert out.shape[1] == len(ids) + new_tokens
    ttft = t1 - t0
    return {"ttft_s": round(ttft, 4),
            "decode_tokens_per_s": round(batch * (new_tokens - 1) / (t2 - t1 - ttft), 2)}


def transformers_in_subprocess(path, ids, batch, new_tokens) -> dict:
    """Run the reference in its own process, so PyTorch's and XLA's thread pools never share
    the cores at the same moment."""
    cmd = [sys.executable, __file__, "--reference", json.dumps([str(path), ids, batch, new_tokens])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--reference":
        from pathlib import Path

        path, ids, batch, new_tokens = json.loads(sys.argv[2])
        print(json.dumps(transformers_decode(Path(path), ids, batch, new_tokens)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of jaxinfer per batch size (medians are reported)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    path = resolve_source(args.model)
    model = jaxinfer.load(path, dtype="float32")
    ids = prompt_ids(model, args.prompt_len)
    rows = ["| engine | batch | TTFT (s) | decode tokens/s | vs transformers |", "|---|---|---|---|---|"]
    ours_b1 = None
    runs_seen = []
    for b in args.batch_sizes:
        ours = run_bench(model, batch_size=b, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, repeats=args.repeats)
        runs_seen.append(f"batch {b}: {ours.get('decode_tokens_per_s_runs')}")
        ref = transformers_in_subprocess(path, ids, b, args.new_tokens)
        ours_b1 = ours_b1 or (ours["decode_tokens_per_s"] if b == 1 else None)
        ratio = ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        rows.append(f"| jaxinfer float32 | {b} | {ours['ttft_s']} | {ours['decode_tokens_per_s']} "
                    f"| {ratio:.2f}x |")
        rows.append(f"| transformers float32 | {b} | {ref['ttft_s']} | {ref['decode_tokens_per_s']} "
                    "| 1.00x |")
        if ours_b1 and b > 1:
            rows.append(f"| (jaxinfer batch {b} / batch 1) | | | "
                        f"{ours['decode_tokens_per_s'] / ours_b1:.2f}x | |")
    long = run_bench(model, batch_size=1, prompt_len=512, new_tokens=2)
    header = (f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
              f"{__import__('os').cpu_count()} cores. Prompt {args.prompt_len} tokens, "
              f"{args.new_tokens} new tokens, greedy.\nTTFT of a 512-token prompt (jaxinfer, batch 1, "
              f"after compilation): {long['ttft_s']} s\njaxinfer decode tokens/s of each timed "
              f"run (the table gives medians): {'; '.join(runs_seen)}")
    publish(header, rows, out=args.out)


if __name__ == "__main__":
    main()
