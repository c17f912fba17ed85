"""Distributed batch prediction benchmark: throughput of 1 vs N dask worker processes.

Generates an EM-like volume (``em_like`` slices, default 20 x 1024 x 1024),
writes it as zarr into a temporary folder, trains a small 2D-in-3D project on
sparse strokes of one slice, then runs :func:`predict_distributed` on a
LocalCluster of 1 worker and of N workers (1 thread each). Cluster start-up
and each worker's first workflow build are excluded by a warm-up block on every worker.

Prints, per cluster size: seconds, megavoxels per second, peak RSS of each
worker process (sampled with psutil every 50 ms), how busy each worker's CPU
was (below 100 % when other programs compete for the cores), and the speed-up
ratio.
The outputs of the runs are checked to be identical.

Run: ``python benchmarks/bench_distributed.py [--shape 20,1024,1024] [--workers 2] [--trees 20] [--memory 1G]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

from operators.kernels.synthetic import em_like
from tda_graph.frontends.cli import _parse_memory
from tda_graph.frontends.distributed import _client, predict_distributed
from tda_graph.workflows.blocks import predict_block
from tda_graph.workflows.headless import train_project
from tda_graph.workflows.strokes import simulate_strokes

SELECTION = {"GaussianSmoothing": [1.0, 3.5], "GaussianGradientMagnitude": [1.6], "HessianOfGaussianEigenvalues": [1.6]}


def make_data(d: Path, shape: tuple[int, int, int], trees: int) -> Path:
    """Write ``img.zarr`` and ``lab.zarr`` into ``d``, train and save ``p.tdap``; return the project path."""
    t0 = time.perf_counter()
    raw = np.empty(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    for z in range(shape[0]):
        em = em_like(shape[1:], seed=z)
        raw[z] = em.raw
        if z == 0:
            gt = em.mitochondria > 0
            for s in simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=400, seed=0):
                labels[0][s.roi.to_slices()][s.mask] = s.label
    zarr.create_array(str(d / "img.zarr"), data=raw, chunks=(1, 512, 512))
    zarr.create_array(str(d / "lab.zarr"), data=labels, chunks=(1, 512, 512))
    proj = d / "p.tdap"
    train_project(str(d / "img.zarr"), str(d / "lab.zarr"), proj, features=SELECTION, in_2d=True, n_trees=trees)  # type: ignore[arg-type]
    print(f"data {shape} generated and project trained in {time.perf_counter() - t0:.1f} s")
    return proj


def sample_rss(pids: list[int], stop: threading.Event, peaks: dict[int, int]) -> None:
    """Record the peak resident memory of each process in ``pids`` until ``stop`` is set."""
    procs = [psutil.Process(p) for p in pids]
    while not stop.is_set():
        for p in procs:
            try:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        stop.wait(0.05)


def run(d: Path, proj: Path, n: int, memory: int | None, voxels: int) -> dict[str, float | list[float]]:
    """One timed prediction on a warm LocalCluster of ``n`` workers."""
    client, cluster = _client(f"local:{n}", memory)
    try:
        addr = cluster.scheduler_address
        # every worker loads the project and numba's cached kernels before the clock starts
        inp = os.path.abspath(d / "img.zarr")
        client.run(predict_block, str(proj.resolve()), inp, "probabilities", ((0, 0, 0), (4, 64, 64)), threads=1)
        pids = list(client.run(os.getpid).values())
        cpu0 = [sum(psutil.Process(p).cpu_times()[:2]) for p in pids]
        peaks: dict[int, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(pids, stop, peaks))
        sampler.start()
        t0 = time.perf_counter()
        r = predict_distributed(
            proj, str(d / "img.zarr"), str(d / f"out{n}.zarr"), scheduler=addr, memory=memory, progress=False
        )
        dt = time.perf_counter() - t0
        cpu = [sum(psutil.Process(p).cpu_times()[:2]) - c for p, c in zip(pids, cpu0)]
        stop.set()
        sampler.join()
    finally:
        client.close()
        cluster.close()
    mvox = voxels / dt / 1e6
    rss = [peaks[p] / 2**20 for p in pids]
    print(
        f"{n} worker(s): {r['blocks']} blocks in {dt:.1f} s = {mvox:.2f} Mvoxel/s; "
        f"peak RSS per worker {', '.join(f'{m:.0f}' for m in rss)} MiB; "
        f"CPU busy per worker {', '.join(f'{c / dt:.0%}' for c in cpu)} of the wall time"
    )
    return {"seconds": dt, "mvox_per_s": mvox, "peak_rss_mib": rss, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="20,1024,1024", help="z,y,x of the generated volume")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the second run")
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--memory", default="1G", help="memory budget per worker, e.g. 1G")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3:
        raise SystemExit("--shape needs z,y,x")
    memory = _parse_memory(args.memory)
    with tempfile.TemporaryDirectory(prefix="tda-bench-dist-") as tmp:
        d = Path(tmp)
        proj = make_data(d, shape, args.trees)  # type: ignore[arg-type]
        voxels = int(np.prod(shape))
        one = run(d, proj, 1, memory, voxels)
        many = run(d, proj, args.workers, memory, voxels)
        a = zarr.open_group(str(d / "out1.zarr"))["data"][...]
        b = zarr.open_group(str(d / f"out{args.workers}.zarr"))["data"][...]
        identical = bool(np.array_equal(a, b))
    ratio = float(many["mvox_per_s"]) / float(one["mvox_per_s"])
    print(f"speed-up {args.workers} workers / 1 worker: {ratio:.2f}x (target >= 1.6x); outputs identical: {identical}")


if __name__ == "__main__":
    main()
