"""SIGKILL during project saves: the file on disk always loads as the previous or the new state.

Runs ``benchmarks/kill_save.py``'s trials (fork-server savers killed at random
moments inside a save); the benchmark runs many more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kill_save  # noqa: E402


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork servers are POSIX")
def test_killed_saves_never_corrupt_the_project(tmp_path) -> None:
    r = kill_save.run_trials(40, seed=1, workdir=str(tmp_path))
    assert r["failures"] == []
    assert r["survived"] == 40
    assert r["found_A"] > 0 and r["found_B"] > 0  # kills landed before and after renames


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_project_is_a_clear_error(tmp_path, cut) -> None:
    from tda_graph.workflows.project import ProjectError, load_project, save_project

    path = tmp_path / "p.tdap"
    save_project(path, kill_save.make_state(0))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ProjectError, match="corrupt|truncated"):
        load_project(path, check_files=False)
