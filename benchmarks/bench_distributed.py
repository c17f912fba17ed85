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

Both clusters are started and warmed first; then ``--repeat`` paired runs (1
worker, then N) alternate, and the median of the paired ratios is reported, so
that a slow phase of a shared machine does not decide the result.

Run::

    python benchmarks/bench_distributed.py [--shape 20,1024,1024] [--workers 2] [--trees 20] [--memory 1G] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def _cpu_by_process(exclude: list[int]) -> dict[tuple[int, str], float]:
    out = {}
    for p in psutil.process_iter(["pid", "name", "cpu_times", "cmdline"]):
        if p.info["pid"] in exclude or p.info["cpu_times"] is None:
            continue
        cmd = " ".join(p.info["cmdline"] or [])[-40:] or p.info["name"]
        out[(p.info["pid"], cmd)] = sum(p.info["cpu_times"][:2])
    return out


def other_cpu(before: dict[tuple[int, str], float], now: dict[tuple[int, str], float]) -> tuple[float, str]:
    """CPU seconds of the other processes between two :func:`_cpu_by_process` snapshots, and the top three."""
    used = sorted(((v - before.get(k, 0.0), k) for k, v in now.items()), reverse=True)
    return sum(c for c, _ in used), "; ".join(f"{k[1]!r} {c:.1f} s" for c, k in used[:3])


def drop_block_caches() -> None:
    """Empty the engine caches of this process's workflows (the project stays loaded)."""
    from tda_graph.workflows import blocks

    with blocks._cache_lock:
        for job in blocks._cache.values():
            job.wf.graph.set_cache_budget(0)  # evicts everything; predict_block sets the budget again


class Cluster:
    """A warm LocalCluster of ``n`` workers: every worker has loaded the project and the kernels."""

    def __init__(self, d: Path, proj: Path, n: int, memory: int | None) -> None:
        self.n, self.d, self.proj, self.memory = n, d, proj, memory
        self.client, self.cluster = _client(f"local:{n}", memory)
        inp = os.path.abspath(d / "img.zarr")
        self.client.run(predict_block, str(proj.resolve()), inp, "probabilities", ((0, 0, 0), (4, 64, 64)), threads=1)
        self.pids = list(self.client.run(os.getpid).values())

    def timed(self, out: str, voxels: int) -> dict[str, float | list[float]]:
        """One timed prediction into ``out``; throughput, peak RSS and CPU share per worker."""
        self.client.run(drop_block_caches)  # repeated runs must not reuse an earlier run's blocks
        cpu0 = [sum(psutil.Process(p).cpu_times()[:2]) for p in self.pids]
        others0 = _cpu_by_process(self.pids)
        peaks: dict[int, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(self.pids, stop, peaks))
        sampler.start()
        t0 = time.perf_counter()
        r = predict_distributed(
            self.proj,
            str(self.d / "img.zarr"),
            str(self.d / out),
            scheduler=self.cluster.scheduler_address,
            memory=self.memory,
            progress=False,
        )
        dt = time.perf_counter() - t0
        cpu = [sum(psutil.Process(p).cpu_times()[:2]) - c for p, c in zip(self.pids, cpu0)]
        others, top = other_cpu(others0, _cpu_by_process(self.pids))
        stop.set()
        sampler.join()
        mvox = voxels / dt / 1e6
        rss = [peaks.get(p, 0) / 2**20 for p in self.pids]
        print(
            f"{self.n} worker(s): {r['blocks']} blocks in {dt:.1f} s = {mvox:.2f} Mvoxel/s; "
            f"peak RSS per worker {', '.join(f'{m:.0f}' for m in rss)} MiB; "
            f"CPU busy per worker {', '.join(f'{c / dt:.0%}' for c in cpu)} of the wall time; "
            f"other processes {others / dt:.0%} of a core (top: {top})",
            flush=True,
        )
        return {"seconds": dt, "mvox_per_s": mvox, "peak_rss_mib": rss, "cpu_s": cpu}

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="20,1024,1024", help="z,y,x of the generated volume")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the second run")
    ap.add_argument("--trees", type=int, default=20)
    ap.add_argument("--memory", default="1G", help="memory budget per worker, e.g. 1G")
    ap.add_argument("--repeat", type=int, default=3, help="paired runs (1 worker, then N workers); median ratio")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3:
        raise SystemExit("--shape needs z,y,x")
    memory = _parse_memory(args.memory)
    with tempfile.TemporaryDirectory(prefix="tda-bench-dist-") as tmp:
        d = Path(tmp)
        proj = make_data(d, shape, args.trees)  # type: ignore[arg-type]
        voxels = int(np.prod(shape))
        one = Cluster(d, proj, 1, memory)
        many = Cluster(d, proj, args.workers, memory)
        ratios, rss = [], []
        try:
            # paired, alternating runs on warm clusters: slow phases of a shared machine hit both sides
            for k in range(args.repeat):
                a = one.timed(f"one{k}.zarr", voxels)
                b = many.timed(f"many{k}.zarr", voxels)
                ratios.append(float(b["mvox_per_s"]) / float(a["mvox_per_s"]))
                rss += list(a["peak_rss_mib"]) + list(b["peak_rss_mib"])  # type: ignore[arg-type]
        finally:
            one.close()
            many.close()
        ref = zarr.open_group(str(d / "one0.zarr"))["data"][...]
        identical = all(
            np.array_equal(zarr.open_group(str(d / f"{side}{k}.zarr"))["data"][...], ref)
            for side in ("one", "many")
            for k in range(args.repeat)
        )
    print(
        f"speed-up {args.workers} workers / 1 worker: median {statistics.median(ratios):.2f}x over {len(ratios)} "
        f"paired runs ({', '.join(f'{r:.2f}' for r in ratios)}; target >= 1.6x); peak RSS per worker <= "
        f"{max(rss):.0f} MiB (budget --memory {args.memory}); outputs identical: {identical}"
    )


if __name__ == "__main__":
    main()
