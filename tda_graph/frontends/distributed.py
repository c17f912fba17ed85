"""Distributed, resumable batch prediction on dask.distributed (``tda predict --scheduler``).

Every output block is one task: :func:`~tda_graph.workflows.blocks.predict_block`
followed by a write of exactly that block into the output zarr array, whose
chunks are the blocks, so no two tasks ever write the same chunk and no locks
are needed. Worker processes build the workflow (load the project) once each
and reuse it for every block they compute.

Resumption: when a task has returned (its chunk is fully written), the client
creates an empty marker file ``<output>.tda-done/block_<i>_<j>[_<k>]``
atomically (temporary file and rename). A re-run with the same project,
input, export, ROI and block size computes only the blocks without a marker,
so a killed client resumes, and a chunk half-written by a killed worker is
never trusted: its task is rescheduled by dask, or computed again by the next
run. The markers are removed when every block is done.

dask is imported only when :func:`predict_distributed` is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from operators.file_sources import parse_image_spec

from ..atomic import atomic_path
from ..workflows.blocks import BlockGrid, block_grid, predict_block
from ..workflows.headless import BatchError, check_output_location

__all__ = ["WORKER_OVERHEAD", "predict_distributed", "write_block"]

#: Memory a worker process needs beyond ``memory`` (interpreter, numba, zarr, dask).
WORKER_OVERHEAD = 768 << 20


def _absolute_spec(spec: str) -> str:
    """``spec`` with an absolute file path, so that workers in other folders find the file."""
    path, inner, _ = parse_image_spec(spec)
    return os.path.abspath(path) + (f":{inner}" if inner else "")


def _open_output(path: str, inner: str) -> Any:
    import zarr

    return zarr.open_array(store=path, path=inner, mode="r+").with_config({"write_empty_chunks": True})


def write_block(
    project: str,
    input_spec: str,
    export: str,
    output: str,
    inner: str,
    origin: tuple[int, ...],
    start: tuple[int, ...],
    stop: tuple[int, ...],
    *,
    axes: str | None = None,
    threads: int | None = 1,
    memory: int | None = None,
    allow_code: bool = False,
) -> tuple[int, ...]:
    """Compute the block ``start:stop`` and write it into the output zarr array (one task).

    Parameters
    ----------
    project, input_spec, export, axes, threads, memory, allow_code
        As for :func:`~tda_graph.workflows.blocks.predict_block`.
    output, inner : str
        The output zarr group and the array inside it.
    origin : tuple of int
        Spatial start of the output ROI; the block lands at ``start - origin``.
    start, stop : tuple of int
        Spatial block region in input coordinates.

    Returns
    -------
    tuple of int
        ``start``, once the block's chunk is completely written.
    """
    data = predict_block(
        project, input_spec, export, (start, stop), axes=axes, threads=threads, memory=memory, allow_code=allow_code
    )
    local = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, origin))
    _open_output(output, inner)[local] = data
    return start


def _marker(done: Path, idx: tuple[int, ...]) -> Path:
    return done / ("block_" + "_".join(map(str, idx)))


def _touch_atomic(path: Path, text: str = "") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _prepare_output(
    project: str, input_spec: str, export: str, out_path: str, inner: str, grid: BlockGrid
) -> tuple[Path, set[tuple[int, ...]]]:
    """Create (or reuse, when resuming the same job) the output array and the marker folder.

    Returns the marker folder and the indices of blocks already done.
    """
    import zarr

    done = Path(out_path + ".tda-done")
    meta = {
        "project_sha": hashlib.sha256(Path(project).read_bytes()).hexdigest(),
        "input": input_spec,
        "export": export,
        "roi": [list(grid.roi.start), list(grid.roi.stop)],
        "block": list(grid.block),
        "shape": list(grid.shape),
        "dtype": grid.dtype.str,
        "array": inner,
    }
    meta_file = done / "job.json"
    if done.exists():
        same = meta_file.exists() and json.loads(meta_file.read_text()) == meta
        if same:
            try:
                arr = zarr.open_array(store=out_path, path=inner, mode="r")
                same = tuple(arr.shape) == grid.shape and tuple(arr.chunks) == grid.chunks
            except Exception:  # missing or unreadable output: start over
                same = False
        if same:
            finished = {idx for idx, _ in grid.blocks if _marker(done, idx).exists()}
            return done, finished
        shutil.rmtree(done)  # another job's markers, or the output is gone: start over
    target = Path(out_path)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    root = zarr.open_group(out_path, mode="w")
    root.create_array(inner, shape=grid.shape, dtype=grid.dtype, chunks=grid.chunks)
    done.mkdir(parents=True)
    _touch_atomic(meta_file, json.dumps(meta))  # written last: the array exists once job.json does
    return done, set()


_SINGLE_THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")

#: glibc malloc settings of LocalCluster workers. WHY: dask's default
#: ``MALLOC_TRIM_THRESHOLD_=65536`` also switches off glibc's adaptive mmap threshold,
#: so every array over 128 KiB is a fresh mmap whose pages fault in again; the
#: feature arrays of each block then cost ~40 % more (measured: 64 blocks of a
#: 20x1024² volume, 11.9 s in a plain process, 16.4 s of task time in a dask worker).
#: Arrays up to 32 MiB come from the heap instead, and at most 64 MiB of freed heap
#: is kept, well inside the ``--memory`` budget.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"}


#: dask settings for ``local:N`` clusters (see :func:`_client`).
_QUIET_POLLING = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


def _snapshot_environ() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in _SINGLE_THREAD_VARS}


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back this process's thread-count variables (see :func:`_client`)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _local_workers(scheduler: str) -> int | None:
    """N of ``local:N`` (``local``: one per core), ``None`` for a scheduler address; else BatchError."""
    if scheduler == "local" or scheduler.startswith("local:"):
        text = scheduler.partition(":")[2]
        try:
            n = int(text) if text else (os.cpu_count() or 1)
        except ValueError:
            n = 0
        if n < 1:
            raise BatchError(f"--scheduler {scheduler!r}: write local:N with N >= 1 worker processes, e.g. local:4")
        return n
    if "://" in scheduler:
        return None
    raise BatchError(f"--scheduler {scheduler!r} is neither local:N nor an address such as tcp://host:8786")


def _client(scheduler: str, memory: int | None) -> tuple[Any, Any]:
    """A dask client for ``local:N`` (a new LocalCluster) or a scheduler address; plus the cluster to close."""
    import dask
    from dask.distributed import Client, LocalCluster

    n = _local_workers(scheduler)
    if n is None:
        try:
            return Client(scheduler, timeout="30s"), None
        except OSError as e:
            raise BatchError(f"cannot reach the dask scheduler at {scheduler!r} ({e}); is it running?") from None
    # set before the worker processes start: numba reads its thread count when first imported
    single: dict[str, str] = {f"distributed.nanny.pre-spawn-environ.{v}": "1" for v in _SINGLE_THREAD_VARS}
    single.update({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in _MALLOC_ENV.items()})
    # the statistical profiler samples every worker thread every 10 ms (GIL + CPU
    # taken from the one core each worker has); batch prediction does not need it
    single["distributed.worker.profile.enabled"] = False  # type: ignore[assignment]
    # Background polling of the scheduler, nannies and workers (event-loop ticks every
    # 20 ms, psutil monitors every 0.1-0.5 s) cost ~15 % of a core on an idle 2-worker
    # cluster, taken from the cores the workers compute on; tasks here take seconds.
    single.update(_QUIET_POLLING)
    saved = _snapshot_environ()
    with dask.config.set(single):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=(memory + WORKER_OVERHEAD) if memory else "auto",
            dashboard_address=":0",  # any free port: several clusters may run on one host
        )
    restore_environ(saved)  # the nanny also applied them to this process
    return Client(cluster), cluster


def predict_distributed(
    project: str | os.PathLike[str],
    input_spec: str,
    output_zarr: str,
    export: str = "probabilities",
    *,
    scheduler: str = "local:2",
    roi: str | None = None,
    memory: int | None = None,
    axes: str | None = None,
    progress: bool = True,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Predict ``export`` for ``input_spec`` with a saved project on dask.distributed; write a zarr.

    Parameters
    ----------
    project : path
        Project file written by ``tda train``.
    input_spec : str
        ``"file.h5:/dataset"``, ``"file.zarr[:array]"`` or ``"file.tif"``; must be
        readable from every worker (shared file system).
    output_zarr : str
        ``"out.zarr"`` or ``"out.zarr:array"`` (default array ``data``), the same
        layout as ``tda predict`` without a scheduler; chunks are the blocks.
    export : str
        One of ``probabilities``, ``segmentation``, ``uncertainty``, ``features``.
    scheduler : str
        ``local:N`` (a LocalCluster of N single-threaded worker processes) or the
        address of a running scheduler, e.g. ``tcp://host:8786``.
    roi : str, optional
        Spatial subregion in ``--roi`` syntax.
    memory : int, optional
        Memory budget per worker in bytes: chooses the block size, caps each
        worker's engine cache at a quarter of it, and (``local:N``) sets the
        worker memory limit to ``memory`` plus :data:`WORKER_OVERHEAD`.
    axes : str, optional
        Stored axes of the input.
    progress : bool
        Show a progress bar on stderr.
    allow_code : bool
        Allow an enhancer whose weights run Python code from its package (``--allow-code``);
        every worker then runs that code.

    Returns
    -------
    dict
        ``blocks`` (total), ``computed`` (now), ``skipped`` (done before), ``finished``, ``shape``.

    Raises
    ------
    BatchError
        Output not ``.zarr``, bad scheduler, or the errors of :func:`block_grid`.
    """
    out_path, inner, kind = parse_image_spec(output_zarr)
    if kind != "zarr":
        raise BatchError(
            f"distributed prediction writes zarr only; give an output like 'out.zarr' instead of {output_zarr!r}"
        )
    _local_workers(scheduler)  # a bad --scheduler fails before the output is touched
    out_path = os.path.abspath(out_path)
    inner = (inner or "data").strip("/")
    check_output_location(out_path, inner, Path(out_path + ".tda-done"))  # before anything is written
    project = os.path.abspath(project)
    input_spec = _absolute_spec(input_spec)
    grid = block_grid(project, input_spec, export, roi, memory, axes=axes, allow_code=allow_code)
    done, finished = _prepare_output(project, input_spec, export, out_path, inner, grid)
    todo = [(idx, r) for idx, r in grid.blocks if idx not in finished]
    summary: dict[str, Any] = {
        "blocks": len(grid.blocks),
        "computed": 0,
        "skipped": len(finished),
        "finished": False,
        "shape": grid.shape,
    }
    if todo:
        task = {
            "project": project,
            "input_spec": input_spec,
            "export": export,
            "output": out_path,
            "inner": inner,
            "origin": grid.roi.start,
            "axes": axes,
            "allow_code": allow_code,
        }
        summary["computed"] = _run(todo, done, scheduler, memory, progress, len(grid.blocks), len(finished), task)
    shutil.rmtree(done)
    summary["finished"] = True
    return summary


def _run(
    todo: list[tuple[tuple[int, ...], Any]],
    done: Path,
    scheduler: str,
    memory: int | None,
    progress: bool,
    total: int,
    skipped: int,
    task: dict[str, Any],
) -> int:
    """Submit the blocks of ``todo``, write a marker as each finishes; return how many were computed."""
    from dask.distributed import as_completed

    # The nanny applies pre-spawn variables to this process's environment too; numba
    # refuses to run here later if NUMBA_NUM_THREADS changed, so restore it afterwards.
    saved = _snapshot_environ()
    client, cluster = _client(scheduler, memory)
    run_id = uuid.uuid4().hex[:8]
    bar = _bar(progress, total, skipped)
    try:
        futures = {}
        for idx, r in todo:
            key = f"tda-block-{'_'.join(map(str, idx))}-{run_id}"
            fut = client.submit(write_block, start=r.start, stop=r.stop, memory=memory, key=key, pure=False, **task)
            futures[fut] = idx
        computed = 0
        for fut in as_completed(futures):
            fut.result()  # re-raises the task's error (e.g. BatchError) here
            _touch_atomic(_marker(done, futures.pop(fut)))
            computed += 1
            bar.update(1)
        return computed
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
        restore_environ(saved)  # a restarted worker may have set them again


class _NoBar:
    def update(self, n: int) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="block", file=sys.stderr, desc="predict")
