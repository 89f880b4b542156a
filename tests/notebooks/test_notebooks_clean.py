"""Committed notebooks are sources: no outputs, a tagged parameters cell of plain literals, no absolute paths."""
import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code:
        assert not cell.get("outputs"), f"{path.name}: a cell has outputs committed (strip them)"
        assert cell.get("execution_count") is None, f"{path.name}: execution_count committed"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert code[0] is tagged[0], f"{path.name}: the parameters cell must be the first code cell"
    for node in ast.parse("".join(tagged[0]["source"])).body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell holds only assignments"
        ast.literal_eval(node.value)  # plain literals only
    for line in "".join(tagged[0]["source"]).splitlines():
        assert "#" in line, f"{path.name}: parameter without a comment: {line}"
        assert line.count("=") == 1, f"{path.name}: papermill cannot parse a second '=' in: {line}"
    for cell in code:
        src = "".join(cell["source"])
        assert "def " not in src and "/work/" not in src and "/home/" not in src, f"{path.name}: logic or abs path"
    assert nb["metadata"]["kernelspec"]["name"] == "grpo-cookbook"
