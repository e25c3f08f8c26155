"""Greedy generation on a device mesh, with pmap, or over several processes.

    python scripts/generate_sharded.py --mesh data=2,model=3 --prompt "The capital of France is"
    python scripts/generate_sharded.py --pmap --prompt "Hi" --prompt "Hello" --json
    python scripts/launch_local.py -n 2 --cpu-devices 2 -- python scripts/generate_sharded.py \
        --model tiny --prompt-ids 1,2,3 --mesh data=2,model=2 --json

`--model tiny` is a tiny random Llama built from `--seed` (the same on every process).
Only process 0 prints unless --all-processes-print. Errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxinfer.errors import InputError, JaxinferError
from jaxinfer.loading.fetch import DEFAULT_MODEL
from jaxinfer.parallel.cli_support import add_parallel_args, setup_parallel, tiny_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, built-in name or 'tiny'")
    p.add_argument("--seed", type=int, default=0, help="params seed of --model tiny")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_parallel_args(p)
    args = p.parse_args(argv)
    try:
        if not args.prompt and not args.prompt_ids:
            raise InputError("give --prompt or --prompt-ids")
        try:
            ids = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
        except ValueError:
            raise InputError("--prompt-ids must be comma-separated integers") from None
        placement = setup_parallel(args)  # joins the multi-process run first
        import jaxinfer
        from jaxinfer.generate import generate_ids
        from jaxinfer.text import build_request, encode_prompt

        model = tiny_model(args.seed) if args.model == "tiny" else jaxinfer.load(args.model,
                                                                                 progress=False)
        model = placement.apply(model)
        ids = [encode_prompt(model, t, args.chat) for t in args.prompt] + ids
        req = build_request(model, ids, max_new_tokens=args.max_new_tokens)
        t0 = time.perf_counter()
        results = generate_ids(model, req)
        total = time.perf_counter() - t0
    except JaxinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = model.tokenizer
    outs = [{"token_ids": r.token_ids, "finish_reason": r.finish_reason,
             "text": tok.decode(r.token_ids) if tok else None} for r in results]
    if not placement.prints:
        return 0
    if args.json:
        print(json.dumps({"outputs": outs, "placement": placement.info(),
                          "notes": placement.notes, "total_s": round(total, 3)}))
    else:
        print(placement.describe(), file=sys.stderr)
        for i, o in enumerate(outs):
            print(f"--- [{i}] {o['finish_reason']}\n{o['text'] if tok else o['token_ids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
