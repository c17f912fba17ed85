"""SIGKILL a fresh ``python -c`` saver in the middle of project saves; the project always survives.

Each trial starts ``sys.executable -c ...`` that saves two distinguishable states
(A, B: other labels, other channel) to one project file in turn and kills it with
``SIGKILL`` at a seeded random moment (after 1-3 completed saves, a random
fraction into the next one). Afterwards the file must load with
``load_project`` and equal A or B exactly; a lock the killed writer left must be
recognised as stale (so no save is blocked forever); its temp files must neither
be mistaken for the project nor survive the next save. ``benchmarks/kill_save.py
--mode subprocess`` runs many more trials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kill_save  # noqa: E402

from tda_graph import TdaError  # noqa: E402
from tda_graph.workflows import project as project_mod  # noqa: E402
from tda_graph.workflows.project import ProjectLockedError, load_project, save_project  # noqa: E402

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and PID locks are POSIX")


@posix_only
def test_sigkilled_saver_processes_never_corrupt_or_block_the_project(tmp_path: Path) -> None:
    r = kill_save.run_subprocess_trials(25, seed=3, workdir=str(tmp_path))
    assert r["failures"] == []
    assert r["survived"] == 25
    assert r["found_A"] > 0 and r["found_B"] > 0  # kills landed on both sides of a rename
    assert r["stale_locks"] > 0  # some kills landed inside a save and left a lock: it did not block


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@posix_only
def test_lock_of_a_killed_writer_is_stale_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "p.tdap"
    save_project(path, kill_save.make_label_state(0))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = project_mod._lock_path(path.absolute())
    try:
        lock.write_text(f"{proc.pid} {project_mod._host()}\n")
        # a live writer holds it: refused with a message naming the lock and the fix
        with pytest.raises(ProjectLockedError, match=r"being written by another process .*p\.tdap\.lock"):
            save_project(path, kill_save.make_label_state(1))
    finally:
        proc.kill()
        proc.wait()
    assert project_mod._lock_is_stale(lock)
    assert kill_save.fingerprint(load_project(path, check_files=False)) == kill_save.fingerprint(
        kill_save.make_label_state(0)
    ), "a refused save must leave the previous file"
    save_project(path, kill_save.make_label_state(1))  # the dead writer's lock does not block
    assert not lock.exists()
    assert kill_save.fingerprint(load_project(path, check_files=False)) == kill_save.fingerprint(
        kill_save.make_label_state(1)
    )


@posix_only
def test_empty_lock_left_by_a_crash_expires(tmp_path: Path) -> None:
    # Power loss after the lock's link but before its content reached the disk leaves an
    # empty lock; it must not block saves forever, but a fresh one is respected.
    path = tmp_path / "p.tdap"
    lock = project_mod._lock_path(path.absolute())
    lock.write_text("")
    with pytest.raises(ProjectLockedError, match="delete the lock file"):
        save_project(path, kill_save.make_label_state(0))
    old = time.time() - project_mod.EMPTY_LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    save_project(path, kill_save.make_label_state(0))
    assert not lock.exists()


def test_temp_files_of_a_killed_save_are_not_the_project(tmp_path: Path) -> None:
    path = tmp_path / "p.tdap"
    # what a writer killed inside h5py.File(tmp, "w") leaves: a half-written temp file and its lock temp
    (tmp_path / ".p.tdap.k1ll3d.tmp").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    (tmp_path / f".p.tdap.lock.{_dead_pid()}.tmp").write_text("1 host\n")
    with pytest.raises(TdaError, match="does not exist"):  # no project yet: the temp file is not taken for it
        load_project(path, check_files=False)
    save_project(path, kill_save.make_label_state(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tdap"]  # the next save cleans up
    # a complete temp file of the other state next to the project is ignored as well
    save_project(tmp_path / "other.tdap", kill_save.make_label_state(1))
    os.replace(tmp_path / "other.tdap", tmp_path / ".p.tdap.x.tmp")
    assert kill_save.fingerprint(load_project(path, check_files=False)) == kill_save.fingerprint(
        kill_save.make_label_state(0)
    )
