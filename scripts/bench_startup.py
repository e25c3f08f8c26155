"""Start-up time of the README's first command, each run a fresh process; prints medians.

cold: a new, empty cache directory per run (the model file linked in, so nothing is fetched;
no converted weights, no compiled programs, no kernel library). cold compile: the same, but
with the converted weights and the kernel library of a primed cache linked in (the issue's
"cold": model fetched, empty compilation cache). warm: one cache directory primed by a first
run, then timed runs. Also times `jaxinfer.load(model)` alone in a fresh process with the
warm cache, and, where llama-cpp-python imports, the same job in a fresh process of it: load the
same GGUF file and answer the same chat prompt (jaxinfer's fallback sampling knobs, or greedy
with `-- --temperature 0`; seed 0; 128 tokens at most). `--checkout DIR` (repeatable) measures
those checkouts instead of the inherited PYTHONPATH, their runs interleaved (A, B, A, B, ...)
so that a machine whose load drifts treats them alike. Extra generate flags go after `--`.

    python scripts/bench_startup.py --runs 5 --out startup.md
    python scripts/bench_startup.py --checkout /tmp/old --checkout . -- --temperature 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxinfer.bench import publish
from jaxinfer.loading import resolve_source
from jaxinfer.sampling import FALLBACK

PROMPT = "What is the capital of France?"
ROWS = ("cold generate (empty caches)", "cold compile (weights + kernels cached, no programs)",
        "warm generate",
        "warm `import jaxinfer; jaxinfer.load(...)` process",
        "warm jaxinfer.load call alone (in that process)")
LLAMA_ROW = "llama-cpp-python: load + chat answer, fresh process"
LLAMA = """import json, os, sys
from llama_cpp import Llama
threads = os.cpu_count()  # as many as jaxinfer's XLA and kernels use
llm = Llama(model_path=sys.argv[1], n_threads=threads, n_threads_batch=threads, n_ctx=2048,
            seed=0, verbose=False)
llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=128, seed=0,
                           **json.loads(sys.argv[3]))
"""


def timed(cmd: list[str], env: dict, inner: list | None = None) -> float:
    """Wall seconds of one fresh process (run in the cache directory, so that the current
    directory does not shadow PYTHONPATH); raises with its stderr if it fails. When `inner` is
    given, the float the process prints last is appended to it."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=env["JAXINFER_CACHE"])
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    if inner is not None:
        inner.append(float(proc.stdout.split()[-1]))
    return seconds


def fresh_cache(root: Path, model_file: Path, pythonpath: str | None) -> dict:
    """An environment whose jaxinfer cache is a new directory holding only the model file."""
    root.mkdir(parents=True)
    (root / model_file.name).symlink_to(model_file)
    env = {**os.environ, "JAXINFER_CACHE": str(root), "JAXINFER_COMPILE_CACHE": str(root / "xla")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def measure(checkouts: list, generate: list[str], load: list[str], runs: int, model_file: Path,
            tmp: Path, cold_runs: int) -> dict:
    """{checkout: {row: [seconds per run]}}, the checkouts' runs interleaved."""
    rows = {c: {name: [] for name in ROWS} for c in checkouts}
    for i in range(cold_runs):
        for j, c in enumerate(checkouts):
            env = fresh_cache(tmp / f"cold{j}-{i}", model_file, c)
            rows[c][ROWS[0]].append(timed(generate, env))
    warm = {c: fresh_cache(tmp / f"warm{j}", model_file, c) for j, c in enumerate(checkouts)}
    for c in checkouts:
        timed(generate, warm[c])  # primes the caches
    for i in range(runs):
        for j, c in enumerate(checkouts):
            env = fresh_cache(tmp / f"compile{j}-{i}", model_file, c)
            for kept in ("converted", "kernels"):
                (Path(env["JAXINFER_CACHE"]) / kept).symlink_to(Path(warm[c]["JAXINFER_CACHE"]) / kept)
            rows[c][ROWS[1]].append(timed(generate, env))
    llama = _llama_command(model_file, generate)
    base = {**os.environ, "JAXINFER_CACHE": str(tmp)}  # the inherited PYTHONPATH finds llama_cpp
    if llama is not None:
        rows["llama.cpp"] = {LLAMA_ROW: []}
    for _ in range(runs):
        for c in checkouts:
            rows[c][ROWS[2]].append(timed(generate, warm[c]))
            rows[c][ROWS[3]].append(timed(load, warm[c], rows[c][ROWS[4]]))
        if llama is not None:
            rows["llama.cpp"][LLAMA_ROW].append(timed(llama, base))
    return {c: {k: v for k, v in r.items() if v} for c, r in rows.items()}


def _llama_command(model_file: Path, generate: list[str]) -> list[str] | None:
    """The llama-cpp-python process's command line (sampling as `generate`'s: the fallback
    knobs, or greedy where it says --temperature 0), or None (printed) where it does not import."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
        return None
    knobs = {k: v for k, v in FALLBACK.items() if k != "repetition_penalty"}
    if "--temperature" in generate:
        knobs["temperature"] = float(generate[generate.index("--temperature") + 1])
    return [sys.executable, "-c", LLAMA, str(model_file), PROMPT, json.dumps(knobs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--runs", type=int, default=5, help="timed fresh processes per row")
    p.add_argument("--checkout", action="append", default=None,
                   help="a source tree to measure (its PYTHONPATH); repeatable")
    p.add_argument("--cold-runs", type=int, default=None,
                   help="fresh processes for the all-empty cold row (default --runs; 0: skip)")
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("extra", nargs="*", help="more generate flags (after --)")
    args = p.parse_args()
    model_file = resolve_source(args.model).resolve()
    generate = [sys.executable, "-m", "jaxinfer", "generate", "--model", args.model,
                "--chat", "--prompt", PROMPT, *args.extra]
    load = [sys.executable, "-c", "import time, jaxinfer; t = time.perf_counter(); "
            f"jaxinfer.load({args.model!r}); print(time.perf_counter() - t)"]
    checkouts = [str(Path(c).resolve()) for c in args.checkout] if args.checkout else [None]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cold = args.runs if args.cold_runs is None else args.cold_runs
        rows = measure(checkouts, generate, load, args.runs, model_file, Path(tmp), cold)
    table = ["| checkout | run | median s | runs (s) |", "|---|---|---|---|"]
    table += [f"| {c or 'PYTHONPATH'} | {name} | {statistics.median(t):.2f} | "
              f"{', '.join(f'{x:.2f}' for x in t)} |"
              for c, by_row in rows.items() for name, t in by_row.items()]
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}. Command: jaxinfer generate --chat --prompt "
              f"{PROMPT!r} --model {args.model} {' '.join(args.extra)}; {args.runs} fresh "
              "processes per row.")
    publish(header, table, out=args.out)


if __name__ == "__main__":
    main()
