"""Throughput and time to first token against device count and mesh shape.

    python scripts/bench_scaling.py --devices 8 --mesh data=1 --mesh data=4 --mesh model=3 \
        --mesh data=2,model=3 --pmap 8 --out docs/scaling.md

On CPU, --devices N makes N *virtual* devices that share this machine's cores: the table then
measures partitioning overhead, not speed-up. On GPUs the same command uses the real devices.
Greedy, stop tokens off, one warm-up run per placement (see jaxinfer.bench.run_bench).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, name or 'tiny'")
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (CPU only)")
    p.add_argument("--mesh", action="append", default=[], help="data=D,model=M (repeatable)")
    p.add_argument("--pmap", type=int, action="append", default=[], help="pmap over D devices")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    import jaxinfer
    from jaxinfer.bench import run_bench
    from jaxinfer.parallel import Placement
    from jaxinfer.parallel.cli_support import parse_mesh, tiny_model

    model = tiny_model() if args.model == "tiny" else jaxinfer.load(args.model, progress=False)
    runs = [(parse_mesh(m), False) for m in (args.mesh or ["data=1"])]
    runs += [((d, 1), True) for d in args.pmap]
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        where = (f"{jax.device_count()} virtual CPU devices sharing {os.cpu_count()} cores "
                 "(they share the cores: no real speed-up is possible)")
    else:
        where = f"{jax.device_count()} x {dev.device_kind}"
    lines = [f"{args.model}, batch {args.batch_size}, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens; {where}", "",
             "| placement | devices | TTFT (s) | prefill tokens/s | decode tokens/s | compile (s) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for mesh, pmap in runs:
        placement = Placement(mesh, pmap=pmap)
        placed = placement.apply(model)
        r = run_bench(placed, batch_size=args.batch_size, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens)
        s = placement.info()
        name = ("pmap " if pmap else "") + f"data={s['mesh']['data']},model={s['mesh']['model']}"
        lines.append(f"| {name} | {s['num_devices']} | {r['ttft_s']} | {r['prefill_tokens_per_s']} "
                     f"| {r['decode_tokens_per_s']} | {r['compile_s']} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
