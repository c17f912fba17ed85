"""Fuzz file inputs, project files, axes and workflow inputs with many seeded cases.

The same targets as ``tests/test_fuzz_files.py`` (``tests/fuzz_cases.py``), each run
``--examples`` times with seeds 0..N-1. A case passes when it works or raises a
project exception (``TdaError``) with a message, and allocates at most
``fuzz_cases.ALLOC_LIMIT`` bytes; anything else is reported as a failure.

Usage::

    python benchmarks/fuzz_files.py [--examples 300] [--targets hdf5,zarr,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_cases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300, help="cases per target")
    ap.add_argument("--targets", default=",".join(fuzz_cases.TARGETS))
    a = ap.parse_args()
    names = [t for t in a.targets.split(",") if t]
    total = failed = 0
    with tempfile.TemporaryDirectory(prefix="tda-fuzz-") as tmp:
        scratch = fuzz_cases.scratch_dir(tmp)
        for name in names:
            t0 = time.perf_counter()
            fails: list[str] = []
            for seed in range(a.examples):
                what, err = fuzz_cases.run_case(name, fuzz_cases.Rng(seed), scratch, tag=str(seed))
                if err is not None:
                    fails.append(f"seed {seed}: {what}: {type(err).__name__}: {err}")
            total += a.examples
            failed += len(fails)
            print(f"{name:9s} {a.examples} cases, {len(fails)} failures ({time.perf_counter() - t0:.0f} s)", flush=True)
            for f in fails[:5]:
                print("    " + f[:300])
    print(f"total: {total} cases over {len(names)} targets, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
