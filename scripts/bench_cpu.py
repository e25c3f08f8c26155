"""CPU decode speed, time to first token and memory: jaxinfer (float32 / int8 / int4 / GGUF
native Q4_1, on every kernel ISA this CPU runs and on XLA alone) against transformers (PyTorch
CPU, float32) and llama.cpp (llama-cpp-python) on the same GGUF file, same thread count, in one
run. Prints a Markdown table and the issue's targets met or not; `--out FILE` writes it too.

    python scripts/bench_cpu.py --out docs/CPU_RESULTS.md

Each jaxinfer variant runs in a fresh process (the ISA is chosen per process: JAXINFER_CPU_ISA,
JAXINFER_NATIVE=0 for XLA alone). Decode tokens/s are medians of --repeats greedy runs of
--new-tokens tokens after a warm-up (stop tokens off), batch 1 and batch 16 alternated so that
each round's ratio compares the same minutes (the float32 target takes the median of the
rounds' ratios: memory speed drifts between minutes); TTFT is a --ttft-prompt-token prompt's
prefill plus its first token. llama-cpp-python is optional (`pip install llama-cpp-python`, it
builds from source); without it its row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # label -> jaxinfer bench arguments (the CLI's default is --quant auto)
    "float32": ["--quant", "none"],
    "int8": ["--quant", "int8"],
    "int4 g32": ["--quant", "int4", "--group-size", "32"],
    "native Q4_1": ["--quant", "native"],
}
MODEL = "smollm2-135m-instruct"


def worker(args) -> None:
    """Measure one jaxinfer variant in this process; print one JSON line."""
    from jaxinfer import cli, kernels
    from jaxinfer.bench import run_bench

    ns = cli.build_parser().parse_args(["bench", "--model", MODEL, *VARIANTS[args.worker]])
    model, _ = cli._load(ns, cli.setup_parallel(ns))
    if args.worker == "float32" and ns.weights != "float32":
        raise SystemExit(f"the float32 row loaded {ns.weights} weights")
    out = {"cpu_kernels": kernels.describe(), "weight_bytes": model.weight_bytes}
    runs = {1: [], 16: []}
    for _ in range(args.repeats):  # batch 1 and 16 alternated: their ratio within minutes
        for b, got in runs.items():
            got.append(run_bench(model, batch_size=b, prompt_len=16,
                                 new_tokens=args.new_tokens)["decode_tokens_per_s"])
    for b, got in runs.items():
        out[f"b{b}"] = round(statistics.median(got), 2)
    out["b16_over_b1"] = [round(y / x, 2) for x, y in zip(runs[1], runs[16], strict=True)]
    out["ttft_s"] = run_bench(model, batch_size=1, prompt_len=args.ttft_prompt, new_tokens=2,
                              repeats=args.repeats)["ttft_s"]
    print(json.dumps(out))


def run_worker(label: str, env: dict, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", label, "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--ttft-prompt", str(args.ttft_prompt)]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{label} {env}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generate_peak_mb(quant: list[str], env: dict) -> dict:
    """Peak resident MB of the README's `jaxinfer generate` command, each run one fresh process
    measured by a parent of its own (RUSAGE_CHILDREN is the largest of all children so far):
    "cold" with an empty compilation cache (XLA compiles every program: its compiler's memory
    counts), then "warm", the same command again on that cache (what every later run costs)."""
    import tempfile

    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "jaxinfer", "generate", "--model", MODEL, *quant,
               "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "16",
               "--compile-cache", cache]
        for kind in ("cold", "warm"):
            done = subprocess.run([sys.executable, "-c", probe, *cmd], env={**os.environ, **env},
                                  check=True, capture_output=True, text=True)
            out[kind] = round(int(done.stdout.split()[-1]) / 1024, 1)
    return out


def transformers_row(gguf, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxinfer.bench import english_text

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok(english_text()[: args.ttft_prompt * 8])["input_ids"]

    def timed(batch, prompt_len, new):
        x = torch.tensor([ids[:prompt_len]] * batch)
        with torch.no_grad():
            model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            best = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                best.append(time.perf_counter() - t)
        return statistics.median(best)

    row = {"ttft_s": round(timed(1, args.ttft_prompt, 1), 4)}
    for b in (1, 16):
        t1, tn = timed(b, 16, 1), timed(b, 16, args.new_tokens)
        row[f"b{b}"] = round(b * (args.new_tokens - 1) / (tn - t1), 2)
    return row


def llama_cpp_row(gguf, args) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"note": "llama-cpp-python not installed"}
    from jaxinfer.bench import english_text

    llm = Llama(model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.ttft_prompt + 64, n_batch=args.ttft_prompt, verbose=False)
    ids = llm.tokenize(english_text()[: args.ttft_prompt * 8].encode(), add_bos=False)

    def prefill(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        return time.perf_counter() - t

    def decode():
        prefill(16)
        t = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([llm.sample(top_k=1)])
        return (args.new_tokens - 1) / (time.perf_counter() - t)

    prefill(args.ttft_prompt)  # warm-up
    ttft = statistics.median(prefill(args.ttft_prompt) for _ in range(args.repeats))
    decode()
    b1 = statistics.median(decode() for _ in range(args.repeats))
    return {"b1": round(b1, 2), "ttft_s": round(ttft, 4), "note": "batch 16: not run (the "
            "Python binding decodes one sequence)"}


def cpu_line() -> str:
    from jaxinfer import kernels

    info = kernels._cpuinfo()
    flags = [f for f in info.get("flags", "").split() if f.startswith(("avx", "fma", "f16c"))]
    return (f"{info.get('model name', platform.processor())}, {len(os.sched_getaffinity(0))} "
            f"threads, flags: {' '.join(flags)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ttft-prompt", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--only", nargs="*", default=None, help="variant labels to run")
    p.add_argument("--paths", nargs="*", default=None,
                   help="kernel paths to run (default: every ISA this CPU runs, and XLA)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers / llama.cpp")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from jaxinfer import kernels
    from jaxinfer.bench import publish
    from jaxinfer.loading.fetch import fetch_builtin

    gguf = fetch_builtin(MODEL)
    paths = [(isa, {"JAXINFER_CPU_ISA": isa}) for isa in kernels.supported_isas()]
    paths.append(("XLA", {"JAXINFER_NATIVE": "0"}))
    paths = [pe for pe in paths if args.paths is None or pe[0] in args.paths]
    rows = ["| runtime | weights | path | batch 1 tok/s | batch 16 tok/s | TTFT "
            f"{args.ttft_prompt} tok (s) | weight MB |", "|---|---|---|---|---|---|---|"]
    results = {}
    for label in args.only or VARIANTS:
        for path, env in paths:
            r = results[(label, path)] = run_worker(label, env, args)
            print(label, path, r, flush=True)
            rows.append(f"| jaxinfer | {label} | {path} | {r['b1']} | {r['b16']} | {r['ttft_s']} "
                        f"| {r['weight_bytes'] / 1e6:.0f} |")
    ref = {}
    if not args.no_reference:
        ref["transformers"] = transformers_row(gguf, args)
        rows.append(f"| transformers (PyTorch CPU) | float32 | - | {ref['transformers']['b1']} | "
                    f"{ref['transformers']['b16']} | {ref['transformers']['ttft_s']} | - |")
        ref["llama.cpp"] = r = llama_cpp_row(gguf, args)
        rows.append(f"| llama.cpp (llama-cpp-python) | {gguf.name} | - | {r.get('b1', '-')} | - "
                    f"| {r.get('ttft_s', '-')} | - |" + (f" {r['note']}" if "note" in r else ""))
    best = next((path for path, _ in paths if path != "XLA"), "XLA")  # the fastest path run
    peak = generate_peak_mb(["--quant", "native"], {})
    targets = target_rows(results, ref, best, peak)
    header = (f"# CPU benchmark\n\nMachine: {cpu_line()}. Model {MODEL} ({gguf.name}), "
              f"{args.threads} threads, greedy, {args.new_tokens} new tokens, medians of "
              f"{args.repeats} runs. Command: `{command_line()}`.")
    publish(header, rows, targets, out=args.out)


def command_line() -> str:
    """This run's command as typed, with the llama.cpp library it loaded (LLAMA_CPP_LIB_PATH: a
    build of the user's choice, e.g. one for AVX2 only) named by its last two path parts."""
    lib = os.environ.get("LLAMA_CPP_LIB_PATH", "")
    env = f"LLAMA_CPP_LIB_PATH=.../{'/'.join(Path(lib).parts[-2:])} " if lib else ""
    return env + shlex.join(["python", "scripts/bench_cpu.py", *sys.argv[1:]])


def target_rows(results, ref, best, peak) -> list[str]:
    """The issue's targets, each with the measured figures and met / not met."""
    out = ["| target | measured | met |", "|---|---|---|"]

    def add(name, value, ok):
        out.append(f"| {name} | {value} | {'yes' if ok else 'no'} |")

    nat, f32, i8 = (results.get((k, best)) for k in ("native Q4_1", "float32", "int8"))
    lcpp = ref.get("llama.cpp", {})
    if nat and "b1" in lcpp:
        add("native Q4_1 batch 1 >= 1.25x llama.cpp", f"{nat['b1']} vs {lcpp['b1']} "
            f"({nat['b1'] / lcpp['b1']:.2f}x)", nat["b1"] >= 1.25 * lcpp["b1"])
        add("TTFT 512 no worse than llama.cpp", f"{nat['ttft_s']} s vs {lcpp['ttft_s']} s",
            nat["ttft_s"] <= lcpp["ttft_s"])
    if i8 and f32:
        add("int8 batch 1 >= 2x float32 batch 1", f"{i8['b1']} vs {f32['b1']} "
            f"({i8['b1'] / f32['b1']:.2f}x)", i8["b1"] >= 2 * f32["b1"])
    for (label, path), r in results.items():  # every kernel path run (AVX2 "too")
        if label == "float32" and path != "XLA":
            ratios = r["b16_over_b1"]
            ratio = statistics.median(ratios)
            add(f"float32 batch 16 >= 8x batch 1 ({path})", f"{r['b16']} vs {r['b1']} "
                f"(each round: {', '.join(f'{x:.2f}' for x in ratios)}x; median {ratio:.2f}x)",
                ratio >= 8)
    if nat and f32:
        add("native Q4_1 batch 16 >= float32 batch 16", f"{nat['b16']} vs {f32['b16']}",
            nat["b16"] >= f32["b16"])
    for kind, mb in peak.items():
        add(f"peak memory of `jaxinfer generate --quant native` <= 600 MB ({kind} compilation "
            "cache)", f"{mb} MB", mb <= 600)
    return out


if __name__ == "__main__":
    main()
