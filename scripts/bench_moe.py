"""Tokens/s of a random mixture-of-experts model on one device and with expert parallelism.

    python scripts/bench_moe.py --devices 8 --mesh data=1,model=8 --out /tmp/moe.md
    python scripts/bench_moe.py --devices 1 --experts-quant int8

The model is a random Llama-family MoE (`models.LlamaConfig` with n_experts; sizes from the
flags; the expert stacks float32, or quantized with --experts-quant), so only speed means
anything. One device runs the CPU layout (the native kernels where they build, the expert
stacks too, with stacked layers; JAXINFER_NATIVE=0: XLA, per-layer weights); a mesh shards the
experts over its model axis. On CPU, --devices N makes N *virtual* devices sharing this machine's
cores: a mesh row measures partitioning overhead, not a speed-up. Greedy, stop tokens off, one
warm-up run per row (jaxinfer.bench.run_bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices (CPU only)")
    p.add_argument("--mesh", action="append", default=[], help="data=D,model=M (repeatable)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024, help="width of each expert")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, action="append", default=[])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--experts-quant", choices=("float32", "int8", "int4"), default="float32",
                   help="the expert stacks' format (int4: groups of 32)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    from jaxinfer.bench import publish, run_bench
    from jaxinfer.parallel import Placement
    from jaxinfer.parallel.cli_support import parse_mesh, tiny_model
    from jaxinfer.quant import Int4, Int8, quantize

    model = tiny_model(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, n_kv_heads=args.heads,
                       head_dim=args.d_model // args.heads, d_ff=args.d_ff, max_seq_len=512,
                       n_experts=args.experts, n_experts_per_token=args.top_k)
    if args.experts_quant != "float32":
        scheme = Int8() if args.experts_quant == "int8" else Int4(32)
        experts = quantize(model.params, [("layers/moe/{gate,up,down}", scheme)])
        model = dataclasses.replace(model, params=experts)
    header = (f"random MoE: {args.layers} layers, D={args.d_model}, {args.experts} experts of "
              f"F={args.d_ff} ({args.experts_quant}), top {args.top_k}, vocab {args.vocab} "
              f"({model.weight_bytes / 1e6:.0f} MB); prompt {args.prompt_len}, {args.new_tokens} new tokens; "
              f"{jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} cores")
    lines = ["| placement | batch | decode tokens/s | prefill tokens/s | compile (s) |",
             "|---|---|---|---|---|"]
    for mesh in [(1, 1)] + [parse_mesh(m) for m in args.mesh]:
        placed = Placement(mesh).apply(model)
        for batch in args.batch_size or [1, 8]:
            r = run_bench(placed, batch_size=batch, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, repeats=3)
            name = "1 device" if mesh == (1, 1) else f"data={mesh[0]},model={mesh[1]}"
            lines.append(f"| {name} | {batch} | {r['decode_tokens_per_s']} | "
                         f"{r['prefill_tokens_per_s']} | {r['compile_s']} |")
            print(lines[-1], flush=True)
    publish(header, lines, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
