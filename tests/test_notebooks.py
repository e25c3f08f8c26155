"""Every notebook runs top to bottom in a fresh Jupyter kernel (nbclient), with the small
settings (JAXINFER_NOTEBOOK_SMALL=1: fewer tokens, shorter texts, fewer compression schemes), and the
committed ones carry the outputs of a full run, a Colab badge and the install cell.

The kernels keep compiled programs in JAX's persistent compilation cache, where the CLI keeps
them ($JAXINFER_COMPILE_CACHE or <jaxinfer cache>/xla), so a later run of the suite loads
instead of compiling (the notebooks themselves leave the cache off, as the Python API does).

The notebooks assert their own results (tokens identical across placements, logits against
transformers, the quality order of the compression schemes, ...): a failed assert fails here.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
COLAB = "https://colab.research.google.com/github/jaxinfer/jaxinfer/blob/main/notebooks/"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return "".join(output["text"])
    return "".join(output.get("data", {}).get("text/plain", ""))


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_every_notebook_is_listed():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "compression_study", "multi_device", "bring_your_own_checkpoint",
            "serving"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook(path):
    """Badge, install cell, README line, and the outputs of a full run without errors."""
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert f"{COLAB}{path.name}" in first, "the first cell opens with its Open in Colab badge"
    setup = _code_cells(nb)[0]
    src = "".join(setup["source"])
    assert 'find_spec("jaxinfer") is None' in src and "pip" in src
    printed = "".join(_text(o) for o in setup["outputs"])
    assert re.search(r"machine: .+cores", printed), "committed outputs name the machine"
    assert "settings: full" in printed, "committed outputs come from a full-size run"
    for cell in _code_cells(nb):
        assert cell["outputs"] is not None
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for c in _code_cells(nb) for o in c["outputs"])
    assert f"notebooks/{path.name}" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    from jaxinfer.loading.fetch import cache_dir

    compile_cache = os.environ.get("JAXINFER_COMPILE_CACHE") or str(cache_dir() / "xla")
    nb = _runner().execute(path, small=True, cell_timeout=CELL_TIMEOUT_S,
                           compile_cache=compile_cache)
    outputs = [o for c in _code_cells(nb) for o in c["outputs"]]
    printed = "".join(_text(o) for o in outputs)
    assert "settings: small" in printed
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "its plots were drawn"
