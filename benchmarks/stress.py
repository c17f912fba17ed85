"""Longer stress run: 4 readers + 1 painter on one TrainableDomainAdaptation workflow; prints what the issue asks for.

Run: ``python benchmarks/stress.py [--seconds 60] [--size 256]``. The painter paints
and erases strokes and now and then changes the feature selection and the channel
that feeds the enhancer input. Every tile returned while no such change landed during
its request is compared with a fresh single-threaded recomputation at that state
(label version + feature selection + channel; the changes replayed); the label store
must equal the replay of all strokes.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_stress import run_stress, verify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    raw, events, tiles, errors, slow, hung, counts, final = run_stress(seconds=a.seconds, seed=a.seed, size=a.size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stale, lost, checked = verify(raw, events, tiles, final)
    lat = np.asarray(counts["latency"]) * 1e3
    print(
        f"{a.seconds:.0f} s, {a.size}x{a.size}: requests served {counts['requests']}, strokes applied "
        f"{counts['stroke']}, feature selection changes {counts['features']}, channel changes {counts['channel']}, "
        f"tiles checked {checked} ({counts['unstable']} had a change land during them), stale tiles {stale}, "
        f"lost strokes {lost} (differing voxels), errors {len(errors)}, hung threads {len(hung)}, "
        f"latency p50 {np.percentile(lat, 50):.1f} ms p99 {np.percentile(lat, 99):.1f} ms, "
        f"peak RSS {rss:.0f} MiB"
    )
    if errors:
        print("first errors:", *errors[:3], sep="\n  ")


if __name__ == "__main__":
    main()
