"""One output block of a saved project: the pure entry point for distributed batch prediction.

:func:`predict_block` computes one block of ``probabilities``, ``segmentation``,
``uncertainty`` or ``features`` for a spatial ROI of an input, with the same
graph and forest as :func:`~tda_graph.workflows.headless.predict_to_file`, so
the result is bitwise identical. The engine grows the input read by the
pipeline's halo itself, so any block tiling gives the same voxels.

The only state is a small per-process cache of built workflows, keyed by the
project path and its modification time and size, the input, the axes, the
export and the thread count: a worker process (dask, SLURM array task, ...)
loads the project and builds the graph once, not once per block. A changed
project file (new mtime or size) gets a fresh workflow.

:func:`block_grid` lays out the blocks exactly as ``predict_to_file`` does for
the same ``--roi`` and ``--memory``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tda_graph import Roi

from .headless import EXPORTS, BatchError, _blocks, _build, _Job, choose_block, feature_halo, parse_roi
from .project import load_project

__all__ = ["BlockGrid", "block_grid", "clear_cache", "predict_block"]

#: Most workflows one process keeps built at once (least recently used is closed first).
CACHE_SIZE = 2

_CacheKey = tuple[str, int, int, str, str | None, str, int | None, bool]
_cache: OrderedDict[_CacheKey, _Job] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class BlockGrid:
    """The layout of a blockwise prediction.

    Attributes
    ----------
    roi : Roi
        The output region, in spatial input coordinates.
    shape : tuple of int
        Output array shape: ``roi.shape`` plus a trailing channel axis when ``n_channels`` is set.
    dtype : numpy.dtype
        Output dtype.
    n_channels : int or None
        Channels of the output (probabilities, features), ``None`` for no channel axis.
    block : tuple of int
        Spatial block shape (the last blocks along an axis may be smaller).
    chunks : tuple of int
        Chunk shape of an output array whose chunks are exactly the blocks.
    blocks : list of (index, Roi)
        Grid index and spatial ROI (input coordinates) of every block, in C order.
    """

    roi: Roi
    shape: tuple[int, ...]
    dtype: np.dtype
    n_channels: int | None
    block: tuple[int, ...]
    chunks: tuple[int, ...]
    blocks: list[tuple[tuple[int, ...], Roi]]


def _halo(job: _Job) -> int:
    return feature_halo(job.wf)


def _key(
    project: str | os.PathLike[str],
    input_spec: str,
    axes: str | None,
    export: str,
    threads: int | None,
    allow_code: bool,
) -> _CacheKey:
    path = Path(project).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise BatchError(f"cannot read the project {str(project)!r} ({e.strerror}); check the path") from None
    return (str(path), st.st_mtime_ns, st.st_size, os.path.abspath(input_spec), axes, export, threads, allow_code)


def _job(
    project: str | os.PathLike[str],
    input_spec: str,
    axes: str | None,
    export: str,
    threads: int | None,
    allow_code: bool = False,
) -> _Job:
    """The cached workflow for these arguments, built (project loaded) on first use in this process."""
    key = _key(project, input_spec, axes, export, threads, allow_code)
    with _cache_lock:
        job = _cache.get(key)
        if job is not None:
            _cache.move_to_end(key)
            return job
        if threads is not None:
            _limit_io_threads(threads)
        job = _build(load_project(project), input_spec, axes, export, threads, allow_code=allow_code)
        _cache[key] = job
        while len(_cache) > CACHE_SIZE:
            _, old = _cache.popitem(last=False)
            old.wf.close()
        return job


def _limit_io_threads(threads: int) -> None:
    """Cap zarr's codec thread pool at the engine's thread count (before zarr first runs).

    WHY: zarr decodes chunks in its own pool (default: cores + 4 threads). In a worker
    process that should use one core, those threads compete with the other workers:
    measured on 2 cores, 64 blocks of a 20x1024² volume took 11.8 s in one process and
    8.6 s in two (1.37x); with the pool capped at 1 thread, 11.3 s and 7.1 s (1.60x).
    """
    try:
        import zarr
    except ImportError:  # zarr inputs are then impossible anyway
        return
    zarr.config.set({"threading.max_workers": max(1, int(threads))})


def clear_cache() -> None:
    """Close and forget every workflow this process has built."""
    with _cache_lock:
        while _cache:
            _, job = _cache.popitem(last=False)
            job.wf.close()


def block_grid(
    project: str | os.PathLike[str],
    input_spec: str,
    export: str = "probabilities",
    roi_text: str | None = None,
    memory: int | None = None,
    *,
    axes: str | None = None,
    allow_code: bool = False,
) -> BlockGrid:
    """Output shape, dtype, channels and block ROIs of a prediction, as ``predict_to_file`` lays them out.

    Parameters
    ----------
    project : path
        Project file written by ``tda train``.
    input_spec : str
        ``"file.h5:/dataset"``, ``"file.zarr[:array]"`` or ``"file.tif"``.
    export : str
        One of ``probabilities``, ``segmentation``, ``uncertainty``, ``features``.
    roi_text : str, optional
        Spatial subregion in ``--roi`` syntax (``"0:10,100:612,100:612"``); default: everything.
    memory : int, optional
        Memory budget per block in bytes (``--memory``); chooses the block size.
    axes : str, optional
        Stored axes of the input (default: metadata or ndim).
    allow_code : bool
        Allow an enhancer whose weights run Python code from its package (``--allow-code``).

    Raises
    ------
    BatchError
        Unknown export, untrained project, input that does not match the project, bad ROI or memory.
    """
    job = _job(project, input_spec, axes, export, 1, allow_code)
    wf = job.wf
    full = Roi.full(wf.raw.spec.spatial_shape)
    out_roi = parse_roi(roi_text, full.shape)
    block = choose_block(
        len(full.shape), wf.features.spec.n_channels, _halo(job), memory, in_2d=wf.features.settings.in_2d
    )
    extra = () if job.n_out is None else (job.n_out,)
    shape = out_roi.shape + extra
    chunks = tuple(min(b, n) for b, n in zip(block, out_roi.shape)) + extra
    return BlockGrid(out_roi, shape, np.dtype(job.dtype), job.n_out, block, chunks, list(_blocks(out_roi, block)))


def _as_roi(roi: Roi | Sequence[slice] | Sequence[Sequence[int]]) -> Roi:
    if isinstance(roi, Roi):
        return roi
    items = list(roi)
    if items and all(isinstance(s, slice) for s in items):
        return Roi(tuple(s.start or 0 for s in items), tuple(s.stop for s in items))
    if len(items) == 2 and all(isinstance(s, Sequence) for s in items):
        return Roi(tuple(items[0]), tuple(items[1]))
    raise BatchError(f"block roi {roi!r} is neither a Roi, a tuple of slices nor (start, stop)")


def predict_block(
    project_path: str | os.PathLike[str],
    input_spec: str,
    export: str,
    roi: Roi | Sequence[slice] | Sequence[Sequence[int]],
    *,
    axes: str | None = None,
    threads: int | None = None,
    memory: int | None = None,
    allow_code: bool = False,
) -> np.ndarray:
    """Compute one output block of a saved project.

    Parameters
    ----------
    project_path : path
        Project file written by ``tda train``.
    input_spec : str
        ``"file.h5:/dataset"``, ``"file.zarr[:array]"`` or ``"file.tif"``.
    export : str
        One of ``probabilities``, ``segmentation``, ``uncertainty``, ``features``.
    roi : Roi, tuple of slices or (start, stop)
        Spatial region of the block, in input coordinates (no channel axis).
    axes : str, optional
        Stored axes of the input (default: metadata or ndim).
    threads : int, optional
        Engine worker threads of the cached workflow (default: CPU count); use 1
        when every core runs its own process.
    memory : int, optional
        Memory budget in bytes; caps the engine's block cache at a quarter of it,
        as ``predict_to_file`` does.
    allow_code : bool
        Allow an enhancer whose weights run Python code from its package (``--allow-code``).

    Returns
    -------
    numpy.ndarray
        The block: ``roi.shape`` plus a trailing channel axis for probabilities
        and features; bitwise identical to the same region of ``predict_to_file``.

    Raises
    ------
    BatchError
        Unknown export, untrained project, input that does not match the project.
    """
    if export not in EXPORTS:
        raise BatchError(f"unknown export {export!r}; choose one of {', '.join(EXPORTS)}")
    job = _job(project_path, input_spec, axes, export, threads, allow_code)
    if memory:
        job.wf.graph.set_cache_budget(max(memory // 4, 1 << 20))
    r = _as_roi(roi)
    spatial = job.wf.raw.spec.spatial_shape
    if len(r.start) != len(spatial) or any(b > n for b, n in zip(r.stop, spatial)):
        raise BatchError(f"block {r!r} does not lie inside the input's spatial shape {spatial}")
    req = r if job.n_out is None else Roi(r.start + (0,), r.stop + (job.n_out,))
    return np.ascontiguousarray(job.wf.graph.request(job.op, req))
