"""Fuzz bad inputs with many hypothesis examples: the targets of ``tests/test_fuzz_inputs.py``.

Each target (damaged HDF5 / zarr v2+v3 / TIFF, huge-shape metadata, damaged
projects, axes strings, label edits, NaN/Inf workflows, the ``tda`` command
line) runs ``--examples`` hypothesis examples. A case passes when it works or
raises a project exception (``TdaError``) with a message, within the allocation
limit; every other outcome is counted as a failure (and the run continues).

Usage::

    python benchmarks/fuzz_inputs.py [--examples 2000] [--targets hdf5,zarr,...] [--seed 0]

Prints, per target, the cases tried, how many worked / were refused with a
project error, the failures (0 expected) and the time taken.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import test_fuzz_inputs as fuzz  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def run_target(name: str, examples: int, scratch: Path, rng_seed: int) -> dict[str, Any]:
    """Run ``examples`` hypothesis examples of one target; count outcomes without stopping at a failure."""
    counts = {"cases": 0, "ok": 0, "refused": 0}
    failures: list[str] = []

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data: Any) -> None:
        what, err = fuzz.run_case(name, data, scratch)
        counts["cases"] += 1  # after the case: examples hypothesis abandons mid-draw are not counted
        if err is not None:
            failures.append(f"{what}: {type(err).__name__}: {err}")
        elif what.startswith("refused "):
            counts["refused"] += 1
        else:
            counts["ok"] += 1

    t0 = time.perf_counter()
    case()
    return {**counts, "failures": failures, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="hypothesis examples per target")
    ap.add_argument("--targets", default=",".join(fuzz.TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    names = [t for t in a.targets.split(",") if t]
    total = failed = 0
    with tempfile.TemporaryDirectory(prefix="tda-fuzz-inputs-") as tmp:
        for name in names:
            r = run_target(name, a.examples, Path(tmp), a.seed)
            total += r["cases"]
            failed += len(r["failures"])
            print(
                f"{name:9s} {r['cases']:5d} cases: {r['ok']} worked, {r['refused']} refused with a project error, "
                f"{len(r['failures'])} failures ({r['seconds']:.0f} s)",
                flush=True,
            )
            for f in list(dict.fromkeys(r["failures"]))[:10]:
                print("    " + f[:400])
    print(f"total: {total} cases over {len(names)} targets, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
