"""Start-up time of the README's first command, each run a fresh process; prints medians.

cold: a new, empty cache directory per run (the model file linked in, so nothing is fetched;
no converted weights, no compiled programs). warm: one cache directory primed by a first run,
then timed runs. Also times `jaxinfer.load(model)` alone in a fresh process with the warm cache.
The rest of the environment is inherited (set PYTHONPATH to measure another checkout).

    python scripts/bench_startup.py --runs 5 --out startup.md
"""

from __future__ import annotations

import argparse
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

PROMPT = "What is the capital of France?"


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


def fresh_cache(root: Path, model_file: Path) -> dict:
    """An environment whose jaxinfer cache is a new directory holding only the model file."""
    root.mkdir(parents=True)
    (root / model_file.name).symlink_to(model_file)
    return {**os.environ, "JAXINFER_CACHE": str(root), "JAXINFER_COMPILE_CACHE": str(root / "xla")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--runs", type=int, default=5, help="timed fresh processes per row")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args()
    model_file = resolve_source(args.model).resolve()
    generate = [sys.executable, "-m", "jaxinfer", "generate", "--model", args.model,
                "--chat", "--prompt", PROMPT]
    load = [sys.executable, "-c", "import time, jaxinfer; t = time.perf_counter(); "
            f"jaxinfer.load({args.model!r}); print(time.perf_counter() - t)"]
    rows = {"cold generate (empty caches)": [], "warm generate": [],
            "warm `import jaxinfer; jaxinfer.load(...)` process": [],
            "warm jaxinfer.load call alone (in that process)": []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for i in range(args.runs):
            rows["cold generate (empty caches)"].append(
                timed(generate, fresh_cache(Path(tmp) / f"cold{i}", model_file)))
        warm = fresh_cache(Path(tmp) / "warm", model_file)
        timed(generate, warm)  # primes the caches
        for _ in range(args.runs):
            rows["warm generate"].append(timed(generate, warm))
            rows["warm `import jaxinfer; jaxinfer.load(...)` process"].append(
                timed(load, warm, rows["warm jaxinfer.load call alone (in that process)"]))
    table = ["| run | median s | runs (s) |", "|---|---|---|"]
    table += [f"| {name} | {statistics.median(t):.2f} | {', '.join(f'{x:.2f}' for x in t)} |"
              for name, t in rows.items()]
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}. Command: jaxinfer generate --chat --prompt "
              f"{PROMPT!r} --model {args.model}; {args.runs} fresh processes per row.")
    publish(header, table, out=args.out)


if __name__ == "__main__":
    main()
