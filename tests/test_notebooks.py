"""Every notebook's code cells run top to bottom (shell lines starting with ! are skipped)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, smollm2_gguf_path, capsys):
    cells = json.loads(path.read_text())["cells"]
    scope: dict = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("!"))
        exec(compile(src, f"{path.name}", "exec"), scope)  # noqa: S102
    assert "Paris" in capsys.readouterr().out  # the logits cell names the next token
    assert scope["out"][0].text  # the generate cell produced text
