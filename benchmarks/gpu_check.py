"""GPU sanity check and timing: cupy kernels vs numba kernels vs float64 reference.

Usage (on a machine with cupy and a CUDA device)::

    python benchmarks/gpu_check.py [--shape 128,256,256]

1. Accuracy: full ilastik selection on a small 3D volume and a 2D image,
   GPU vs reference and GPU vs CPU (max error relative to each channel's range).
2. Timing: full selection on the 3D volume on the GPU (after warm-up,
   synchronised, with and without host<->device transfer) vs the CPU kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.kernels import feature_table as ft  # noqa: E402
from operators.kernels import features_cpu as fc  # noqa: E402
from operators.kernels import features_gpu as fg  # noqa: E402
from operators.kernels.reference import ref_compute_features  # noqa: E402


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    ax = tuple(range(ref.ndim - 1))
    scale = np.abs(ref).max(axis=ax)
    scale[scale == 0] = 1
    return float((np.abs(got.astype(np.float64) - ref).max(axis=ax) / scale).max())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="128,256,256")
    a = p.parse_args()
    if not fg.available():
        print("cupy or CUDA device not available")
        sys.exit(1)
    import cupy as cp

    sel = ft.all_features_selection()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'case':10s} {'gpu vs ref':>11s} {'gpu vs cpu':>11s} {'cpu vs ref':>11s}")
    rng = np.random.default_rng(0)
    for name, shape, in_2d in [
        ("2d", (96, 90, 1), False),
        ("3d", (40, 44, 41, 1), False),
        ("3d in_2d", (5, 44, 41, 1), True),
    ]:
        img = (rng.random(shape) * 255).astype(np.uint8)
        ref = ref_compute_features(img, sel, in_2d=in_2d)
        cpu = fc.compute_features(img, sel, in_2d=in_2d)
        gpu = cp.asnumpy(fg.compute_features(cp.asarray(img), sel, in_2d=in_2d))
        print(f"{name:10s} {rel(gpu, ref):11.2e} {rel(gpu, cpu.astype(np.float64)):11.2e} {rel(cpu, ref):11.2e}")

    shape = tuple(int(s) for s in a.shape.split(","))
    vol = rng.random(shape, dtype=np.float32)[..., None]
    warm = rng.random((40, 40, 40, 1), dtype=np.float32)
    fc.compute_features(warm, sel)
    t = time.perf_counter()
    cpu = fc.compute_features(vol, sel)
    t_cpu = time.perf_counter() - t
    dvol = cp.asarray(vol)
    fg.compute_features(cp.asarray(warm), sel)  # warm-up: kernel compilation
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    dout = fg.compute_features(dvol, sel)
    cp.cuda.Device().synchronize()
    t_gpu = time.perf_counter() - t
    t = time.perf_counter()
    host = cp.asnumpy(fg.compute_features(cp.asarray(vol), sel))
    t_gpu_io = time.perf_counter() - t
    del dout
    nvox = int(np.prod(shape))
    print(f"\nfull selection, {'x'.join(map(str, shape))} float32, {cpu.shape[-1]} channels")
    print(f"{'impl':22s} {'time s':>8s} {'Mvox/s':>8s} {'vs cpu':>7s}")
    for n, tt in [("cpu (numba)", t_cpu), ("gpu (device arrays)", t_gpu), ("gpu (+ transfers)", t_gpu_io)]:
        print(f"{n:22s} {tt:8.3f} {nvox / tt / 1e6:8.1f} {t_cpu / tt:6.1f}x")
    print(f"max rel diff gpu vs cpu on the big volume: {rel(host, cpu.astype(np.float64)):.2e}")


if __name__ == "__main__":
    main()
