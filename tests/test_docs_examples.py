"""The Python examples in docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["custom_workflow.md"])
def test_doc_example_runs(doc, capsys) -> None:
    (code,) = _blocks(doc)
    exec(compile(code, str(DOCS / doc), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    m = re.search(r"forest (\d\.\d+), auto-context (\d\.\d+)", out)
    assert m, out
    assert float(m.group(1)) > 0.3 and float(m.group(2)) > 0.3  # both forests learn the mitochondria
