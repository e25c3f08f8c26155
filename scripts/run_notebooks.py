"""Execute notebooks top to bottom with nbclient and write them back with their outputs.

    python scripts/run_notebooks.py                        # every notebook, full settings
    python scripts/run_notebooks.py quickstart serving     # some of them
    python scripts/run_notebooks.py --small --no-write     # the test suite's settings, check only

The committed notebooks' outputs come from a full run of this script (the first cell of each
prints the machine). `--small` sets JAXINFER_NOTEBOOK_SMALL=1: the notebooks shrink their sizes
(tokens, texts, repeats), nothing else. The kernel imports jaxinfer from this checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def kernel_env(small: bool, compile_cache: str | None = None) -> dict[str, str]:
    """The kernel's environment: this checkout first on PYTHONPATH, no inherited virtual-device
    flags (a notebook decides its devices), JAXINFER_NOTEBOOK_SMALL=1 when small, and JAX's
    persistent compilation cache in `compile_cache` when given (off otherwise, as for a user of
    the Python API)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAXINFER_NOTEBOOK_SMALL", None)
    if small:
        env["JAXINFER_NOTEBOOK_SMALL"] = "1"
    for name in CACHE_ENV:
        env.pop(name, None)
    if compile_cache:  # as the CLI sets it (jaxinfer.cli.setup_compile_cache): every program
        env.update(dict(zip(CACHE_ENV, (str(compile_cache), "0", "0"), strict=True)))
    return env


def execute(path: Path, *, small: bool, cell_timeout: int | None = None,
            compile_cache: str | None = None):
    """The notebook at `path` executed in a fresh python3 kernel (nbformat NotebookNode);
    nbclient.exceptions.CellExecutionError names the failing cell."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_env(small, compile_cache))
    return nb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="notebook names (default: all)")
    p.add_argument("--small", action="store_true", help="JAXINFER_NOTEBOOK_SMALL=1")
    p.add_argument("--no-write", action="store_true", help="do not write the outputs back")
    p.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache for the kernels (default: off)")
    args = p.parse_args()
    import nbformat

    paths = ([NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in args.names]
             or sorted(NOTEBOOKS.glob("*.ipynb")))
    for path in paths:
        t = time.perf_counter()
        nb = execute(path, small=args.small, cell_timeout=args.cell_timeout,
                     compile_cache=args.compile_cache)
        if not args.no_write:
            nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
