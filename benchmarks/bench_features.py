"""Benchmark: ilastik's full filter-feature set, numba kernels vs a scipy/numpy reference.

Usage::

    python benchmarks/bench_features.py [--quick] [--no-reference] [--repeat N]

Full size: a 2048x2048 float32 image and a 128x256x256 float32 volume with
every feature at every scale (σ=0.3 only for smoothing: 37 (feature, σ) pairs,
49 channels in 2D, 61 in 3D).  The reference is what a user without this
library would write: ``scipy.ndimage.gaussian_filter`` (float64, same radius and
boundary) plus ``numpy.linalg.eigvalsh``.  Each measurement runs in its own
subprocess so that peak RSS (``ru_maxrss``) is per implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"2d": (2048, 2048), "3d": (128, 256, 256)}
QUICK = {"2d": (512, 512), "3d": (48, 96, 96)}


def _image(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).random(shape, dtype=np.float32)[..., None]


def child(kind: str, impl: str, shape: tuple[int, ...], repeat: int) -> dict:
    from operators.kernels import feature_table as ft

    sel = ft.all_features_selection()
    img = _image(shape)
    res: dict = {}
    if impl == "ref":
        from operators.kernels.reference import ref_compute_features

        t = time.perf_counter()
        out = ref_compute_features(img, sel)
        res["time"] = time.perf_counter() - t
    else:
        from operators.kernels import features_cpu as fc

        t = time.perf_counter()
        # warm-up on a small image: loads (or compiles) the numba kernels
        fc.compute_features(img[tuple(slice(0, 40) for _ in shape)], sel)
        res["warmup"] = time.perf_counter() - t
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = fc.compute_features(img, sel)
            times.append(time.perf_counter() - t)
            del out
        res["time"] = min(times)
        # steady state with a preallocated output (the operator's cache block)
        buf = np.empty(shape + (ft.n_output_channels(sel, len(shape)),), np.float32)
        buf.fill(0)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fc.compute_features(img, sel, out=buf)
            times.append(time.perf_counter() - t)
        res["time_out"] = min(times)
        out = buf
    res["n_out"] = int(out.shape[-1])
    res["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def memcpy_bandwidth() -> float:
    """Measured copy bandwidth in bytes/s (read + write counted once each)."""
    a = np.ones(128 * 2**20, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run_child(kind: str, impl: str, shape, repeat: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        impl,
        "--shape",
        ",".join(map(str, shape)),
        "--repeat",
        str(repeat),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--only", choices=["2d", "3d"], default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        shape = tuple(int(s) for s in a.shape.split(","))
        print(json.dumps(child(a.child[0], a.child[1], shape, a.repeat)))
        return

    import numba

    shapes = QUICK if a.quick else SHAPES
    # children first: ru_maxrss survives fork+exec, so the parent stays small
    results = {}
    for kind in [a.only] if a.only else ["2d", "3d"]:
        shape = shapes[kind]
        results[kind] = (
            shape,
            run_child(kind, "ours", shape, a.repeat),
            None if a.no_reference else run_child(kind, "ref", shape, 1),
        )
    bw = memcpy_bandwidth()
    print(
        f"cores: {os.cpu_count()}  numba threads: {numba.get_num_threads()}  "
        f"memcpy bandwidth: {bw / 1e9:.1f} GB/s  load average: {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for kind, (shape, ours, ref) in results.items():
        nvox = int(np.prod(shape))
        n_out = ours["n_out"]
        floor = (nvox * 4 + nvox * n_out * 4) / bw
        rows.append((kind, shape, n_out, ours, ref, nvox, floor))

    hdr = (
        f"{'case':4s} {'shape':>14s} {'ch':>3s} {'ref s':>8s} {'ours s':>7s} {'ours(out=) s':>12s} "
        f"{'speedup':>8s} {'Mvox/s':>7s} {'warmup s':>8s} {'peakRSS ours MB':>15s} "
        f"{'peakRSS ref MB':>14s} {'bw floor s':>10s}"
    )
    print(hdr)
    for kind, shape, n_out, ours, ref, nvox, floor in rows:
        rt = ref["time"] if ref else float("nan")
        print(
            f"{kind:4s} {'x'.join(map(str, shape)):>14s} {n_out:3d} {rt:8.2f} {ours['time']:7.2f} "
            f"{ours['time_out']:12.2f} {rt / ours['time']:7.1f}x {nvox / ours['time'] / 1e6:7.1f} "
            f"{ours['warmup']:8.2f} {ours['maxrss_mb']:15.0f} "
            f"{(ref['maxrss_mb'] if ref else float('nan')):14.0f} {floor:10.3f}"
        )


if __name__ == "__main__":
    main()
