"""SIGKILL a process while it saves a project, many times; the file must always load.

Each trial starts a saver process (forked from a preloaded fork server, so a trial
costs milliseconds, not an interpreter start) that saves two different states
(A, B: other labels, other forest) to the same project file in turn, as fast as
it can. After a random number of completed saves and a random further delay (a
fraction of one save's duration, so kills land anywhere inside a save: lock,
HDF5 writes, fsync, rename), it is killed with SIGKILL. Then the file on disk
must load with ``load_project`` and equal A or B exactly, and the next trial's
saver must be able to save again (a killed writer's lock is stale, its temp
files are cleaned up).

``--mode subprocess`` runs the same trials with a fresh interpreter per trial
(``sys.executable -c ...``, labels-only states), killed with ``SIGKILL`` after a
random number of completed saves and a random fraction of one save: a killed
writer also leaves its lock (naming its dead PID) and temp files behind, which
the next trial's saver must detect as stale and clean up.

Usage::

    python benchmarks/kill_save.py [--trials 200] [--seed 0] [--mode forkserver|subprocess|both]

Prints trials, survived (loaded as A or B), how often each state was found, and
failures. ``tests/test_kill_save_trials.py`` and ``tests/test_kill_save.py`` run
short versions.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_state(which: int) -> Any:
    """State A (0) or B (1): labels and forest differ, both big enough that a save takes a while."""
    from operators.classifier import ClassifierSettings, train_forest
    from operators.labels import LabelStore
    from tda_graph import Roi
    from tda_graph.workflows.project import ProjectState

    rng = np.random.default_rng(100 + which)
    store = LabelStore((512, 512), "yx", ("background", "foreground"), block_shape=(64, 64))
    for k in range(60):
        y, x = rng.integers(0, 500, 2)
        store.paint(Roi((int(y), int(x)), (int(y) + 8, int(x) + 12)), np.ones((8, 12), bool), 1 + (k + which) % 2)
    X = rng.random((2000, 8)).astype(np.float32)
    yl = (X[:, which] > 0.5).astype(np.int32) + 1
    forest = train_forest(X, yl, ClassifierSettings(n_trees=30, n_jobs=1, seed=which))
    return ProjectState(selection="default", labels=store, forest=forest, channel=1 + which)


def fingerprint(state: Any) -> tuple[bytes, bytes, int | None]:
    """What must match exactly: dense labels, the forest's split arrays, the channel."""
    forest = state.forest
    arrays = b"" if forest is None else b"".join(getattr(forest, k).tobytes() for k in ("feature", "threshold"))
    labels = b"" if state.labels is None else state.labels.to_dense().tobytes()
    return labels, arrays, state.channel


def saver(path: str, counter: Any, ready: Any) -> None:
    """Save A, B, A, ... to ``path`` forever, counting completed saves (runs in the killed process)."""
    from tda_graph.workflows.project import save_project

    states = [make_state(0), make_state(1)]
    ready.value = time.perf_counter()
    n = 0
    while True:
        save_project(path, states[n % 2])
        n += 1
        with counter.get_lock():
            counter.value = n


def _check_after_kill(
    path: str, trial: int, expected: dict[Any, str], found: dict[str, int], failures: list[str]
) -> None:
    """The file left by a killed saver must load as state A or B: count which, or record the failure."""
    from tda_graph.workflows.project import load_project

    try:
        fp = fingerprint(load_project(path, check_files=False))
    except Exception as e:  # any failure to load is what this benchmark looks for
        failures.append(f"trial {trial}: {type(e).__name__}: {e}")
        return
    which = expected.get(fp)
    if which is None:
        failures.append(f"trial {trial}: the file loads but is neither state A nor state B")
    else:
        found[which] += 1


def run_trials(trials: int, seed: int = 0, workdir: str | None = None, echo: Any = None) -> dict[str, Any]:
    """Run ``trials`` kill-during-save trials; return counts and the failures (messages)."""

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["numpy", "h5py", "sklearn.ensemble", "sklearn.tree", "tda_graph.workflows.project", "operators.classifier"]
    )
    rng = np.random.default_rng(seed)
    expected = {fingerprint(make_state(0)): "A", fingerprint(make_state(1)): "B"}
    found = {"A": 0, "B": 0}
    failures: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tda-kill-save-", dir=workdir) as tmp:
        path = os.path.join(tmp, "project.tdap")
        save_seconds = 0.05
        for trial in range(trials):
            counter = ctx.Value("q", 0)
            ready = ctx.Value("d", 0.0)
            proc = ctx.Process(target=saver, args=(path, counter, ready), daemon=True)
            proc.start()
            wait_for = int(rng.integers(1, 4))  # completed saves before the kill
            t0 = time.perf_counter()
            while counter.value < wait_for and proc.is_alive() and time.perf_counter() - t0 < 60:
                time.sleep(0.001)
            if counter.value < wait_for:
                proc.kill()
                proc.join()
                failures.append(f"trial {trial}: the saver made no progress (exit code {proc.exitcode})")
                continue
            # the mean duration of one save so far, to place the kill anywhere inside the next one
            per_save = (time.perf_counter() - ready.value) / max(1, counter.value)
            save_seconds = per_save if trial == 0 else 0.8 * save_seconds + 0.2 * per_save
            time.sleep(float(rng.uniform(0, 1.5 * save_seconds)))
            proc.kill()
            proc.join()
            _check_after_kill(path, trial, expected, found, failures)
            if echo is not None and (trial + 1) % 50 == 0:
                echo(f"  {trial + 1} trials, {len(failures)} failures")
        # after the last kill, one clean save leaves no lock and no temp files
        from tda_graph.workflows.project import save_project

        save_project(path, make_state(0))
        leftovers = sorted(p for p in os.listdir(tmp) if p != "project.tdap")
        if leftovers:
            failures.append(f"files left after a clean save: {leftovers}")
    return {
        "trials": trials,
        "survived": found["A"] + found["B"],
        "found_A": found["A"],
        "found_B": found["B"],
        "failures": failures,
        "seconds": time.perf_counter() - t_start,
        "mean_save_ms": save_seconds * 1e3,
    }


# -- trials with a fresh interpreter per saver ---------------------------------------------------------


def make_label_state(which: int) -> Any:
    """A labels-only state A (0) or B (1): cheap to build, so a fresh interpreter starts saving quickly."""
    from operators.labels import LabelStore
    from tda_graph import Roi
    from tda_graph.workflows.project import ProjectState

    rng = np.random.default_rng(200 + which)
    store = LabelStore((384, 384), "yx", ("background", "foreground", "edges"), block_shape=(32, 32))
    for k in range(80):
        y, x = rng.integers(0, 370, 2)
        mask = rng.random((10, 14)) < 0.7  # noisy strokes: gzip has work to do, a save takes a few ms
        store.paint(Roi((int(y), int(x)), (int(y) + 10, int(x) + 14)), mask, 1 + (k + which) % 3)
    return ProjectState(selection={"GaussianSmoothing": [(0.7, 1.6)[which]]}, labels=store, channel=1 + which)


#: The killed saver: imports, builds A and B, prints "ready", then saves A, B, A, ... printing each count.
CHILD = """
import sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
import kill_save
from tda_graph.workflows.project import save_project
states = [kill_save.make_label_state(0), kill_save.make_label_state(1)]
print("ready", flush=True)
n = 0
while True:
    save_project(sys.argv[1], states[n % 2])
    n += 1
    print(n, flush=True)
"""


def run_subprocess_trials(trials: int, seed: int = 0, workdir: str | None = None, echo: Any = None) -> dict[str, Any]:
    """``trials`` kill-during-save trials, each with a fresh ``sys.executable -c`` saver; counts and failures.

    Besides "the file loads as A or B" each trial checks that a lock left by the
    killed saver is recognised as stale (``_lock_is_stale``), so the next save
    cannot be blocked forever, and that ``load_project`` ignores leftover temp files.
    """
    from tda_graph.workflows.project import _lock_is_stale, _lock_path, save_project

    rng = np.random.default_rng(seed)
    expected = {fingerprint(make_label_state(0)): "A", fingerprint(make_label_state(1)): "B"}
    found = {"A": 0, "B": 0}
    failures: list[str] = []
    stale_locks = temp_files = 0
    t_start = time.perf_counter()
    save_seconds = 0.02
    with tempfile.TemporaryDirectory(prefix="tda-kill-save-sub-", dir=workdir) as tmp:
        path = os.path.join(tmp, "project.tdap")
        for trial in range(trials):
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, path, str(ROOT), str(Path(__file__).resolve().parent)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for = int(rng.integers(1, 4))  # completed saves before the kill
                first = proc.stdout.readline()  # type: ignore[union-attr]
                if first.strip() != "ready":
                    proc.kill()
                    err = proc.communicate(timeout=30)[1]
                    failures.append(f"trial {trial}: the saver did not start: {err.strip()[-300:]}")
                    continue
                t0 = time.perf_counter()
                done = 0
                while done < wait_for:
                    line = proc.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        break
                    done = int(line)
                if done < wait_for:
                    proc.kill()
                    err = proc.communicate(timeout=30)[1]
                    failures.append(f"trial {trial}: the saver stopped after {done} saves: {err.strip()[-300:]}")
                    continue
                # place the kill anywhere inside the next save (lock, HDF5 writes, fsync, rename, unlock)
                per_save = (time.perf_counter() - t0) / done
                save_seconds = 0.7 * save_seconds + 0.3 * per_save
                time.sleep(float(rng.uniform(0, 1.3 * save_seconds)))
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.communicate(timeout=30)
            lock = _lock_path(Path(path).absolute())
            if lock.exists():
                stale_locks += 1
                if not _lock_is_stale(lock):
                    failures.append(f"trial {trial}: the killed saver's lock {lock.read_text()!r} is not seen as stale")
            temp_files += sum(1 for p in os.listdir(tmp) if p.endswith(".tmp"))
            _check_after_kill(path, trial, expected, found, failures)
            if echo is not None and (trial + 1) % 50 == 0:
                echo(f"  {trial + 1} trials, {len(failures)} failures")
        # after the last kill, one clean save in this process: stale lock and temp files are gone
        try:
            save_project(path, make_label_state(0))
        except Exception as e:  # a lock that blocks saving forever is a failure
            failures.append(f"the save after the last kill failed: {type(e).__name__}: {e}")
        leftovers = sorted(p for p in os.listdir(tmp) if p != "project.tdap")
        if leftovers:
            failures.append(f"files left after a clean save: {leftovers}")
    return {
        "trials": trials,
        "survived": found["A"] + found["B"],
        "found_A": found["A"],
        "found_B": found["B"],
        "stale_locks": stale_locks,
        "temp_files": temp_files,
        "failures": failures,
        "seconds": time.perf_counter() - t_start,
        "mean_save_ms": save_seconds * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("forkserver", "subprocess", "both"), default="forkserver")
    a = ap.parse_args()
    modes = ("forkserver", "subprocess") if a.mode == "both" else (a.mode,)
    for mode in modes:
        run = run_trials if mode == "forkserver" else run_subprocess_trials
        r = run(a.trials, a.seed, echo=print)
        extra = (
            f"; {r['stale_locks']} stale locks and {r['temp_files']} temp files left by killed savers, all recovered"
            if mode == "subprocess" and not r["failures"]
            else ""
        )
        print(
            f"kill-during-save ({mode}): {r['trials']} trials, {r['survived']} survived (loaded as the previous or "
            f"the new state: A {r['found_A']}, B {r['found_B']}), {len(r['failures'])} failures; mean save "
            f"{r['mean_save_ms']:.0f} ms; {r['seconds']:.0f} s{extra}"
        )
        for f in r["failures"][:20]:
            print("  " + f)


if __name__ == "__main__":
    main()
