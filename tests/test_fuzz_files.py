"""Property-based fuzzing of file inputs, project files, axes and workflow inputs (hypothesis).

Every case either works or raises a project exception (``TdaError``) with a
message: never another exception type, a hang or a giant allocation. The
targets live in ``tests/fuzz_cases.py``; ``benchmarks/fuzz_files.py`` runs them
with many more examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_cases  # noqa: E402

EXAMPLES = {"hdf5": 25, "zarr": 40, "tiff": 25, "axes": 40, "project": 25, "workflow": 25}


class DrawRng(fuzz_cases.Rng):
    """The target's choices drawn by hypothesis (so failing cases shrink)."""

    def __init__(self, data) -> None:
        self.data = data

    def integers(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def bytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz_target(target, tmp_path_factory) -> None:
    scratch = fuzz_cases.scratch_dir(tmp_path_factory.mktemp(target))

    @settings(
        max_examples=EXAMPLES[target],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def case(data) -> None:
        what, err = fuzz_cases.run_case(target, DrawRng(data), scratch)
        if err is not None:
            raise AssertionError(f"{target}: {what}: {type(err).__name__}: {err}") from err

    case()
