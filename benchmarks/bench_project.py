"""Project save / load time for a project with many label blocks.

A 4096 x 4096 label image in 64 x 64 blocks with a short stroke in every block (4096
labelled blocks), saved with :func:`save_project` and loaded with :func:`load_project`
(metadata digest checked). Prints the best of ``--runs`` times and the file size.

Project format 2 stores the blocks as two datasets; format 1 (one dataset per block)
took 3.2 s to save and 4.9 s to load this project (12.8 MB); format 2 0.21-0.28 s and
0.39-0.59 s (0.49 MB) on the 2-core development machine (two sessions of runs).

Run: ``python benchmarks/bench_project.py [--blocks-per-side 64] [--runs 3]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.labels import LabelStore  # noqa: E402
from tda_graph import Roi  # noqa: E402
from tda_graph.workflows.project import ProjectState, load_project, save_project  # noqa: E402


def labelled_store(blocks_per_side: int, block: int = 64, seed: int = 0) -> LabelStore:
    """A 2D store with one 3 x 12 stroke in each of ``blocks_per_side**2`` blocks."""
    rng = np.random.default_rng(seed)
    n = blocks_per_side * block
    store = LabelStore((n, n), "yx", ["background", "foreground"], block_shape=(block, block))
    for by in range(blocks_per_side):
        for bx in range(blocks_per_side):
            y = by * block + int(rng.integers(0, block - 14))
            x = bx * block + int(rng.integers(0, block - 14))
            store.paint(Roi((y, x), (y + 3, x + 12)), np.ones((3, 12), bool), int(rng.integers(1, 3)))
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks-per-side", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    store = labelled_store(a.blocks_per_side)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.tdaproj"
        save_t, load_t = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            save_project(path, ProjectState(labels=store))
            save_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            state = load_project(path)
            load_t.append(time.perf_counter() - t)
        assert state.labels is not None and np.array_equal(state.labels.to_dense(), store.to_dense())
        size = path.stat().st_size
    print(
        f"{len(store.labelled_blocks())} label blocks: save {min(save_t):.2f} s, load {min(load_t):.2f} s "
        f"(best of {a.runs}), file {size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
