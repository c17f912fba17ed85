"""Fuzz targets shared by ``tests/test_fuzz_files.py`` and ``benchmarks/fuzz_files.py``.

Each target takes a ``random.Random``-like source of choices (hypothesis's
``data.draw`` wrapped in :class:`Draw`, or a seeded ``numpy`` generator) and a
scratch folder, builds one damaged or hostile input, and runs it through the
public entry points a user would: ``open_image`` + a small ROI request, the
workflow, ``load_project``. The contract: each case either works or raises a
:class:`~tda_graph.TdaError` subclass with a message; any other exception, a
hang or a giant allocation is a failure (the caller catches and reports it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tda_graph import Graph, Roi, TdaError

#: Bytes any single fuzz case may allocate (tracemalloc peak); "no giant allocation is attempted".
ALLOC_LIMIT = 256 << 20


class Rng:
    """The choices a target makes, from a seeded numpy generator."""

    def __init__(self, seed: int) -> None:
        self.g = np.random.default_rng(seed)

    def integers(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""
        return int(self.g.integers(lo, hi + 1))

    def choice(self, items: list[Any]) -> Any:
        """One of ``items``."""
        return items[self.integers(0, len(items) - 1)]

    def bytes(self, n: int) -> bytes:
        """``n`` random bytes."""
        return self.g.integers(0, 256, n, dtype=np.uint8).tobytes()


def _damage(path: Path, rng: Rng) -> str:
    """Truncate, flip bytes in, or overwrite a stretch of one file; describe what was done."""
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "flip", "stretch"])
    if kind == "truncate" or not data:
        cut = rng.integers(0, max(0, len(data) - 1))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} bytes"
    if kind == "flip":
        n = rng.integers(1, 16)
        for _ in range(n):
            i = rng.integers(0, len(data) - 1)
            data[i] ^= 1 << rng.integers(0, 7)
        path.write_bytes(bytes(data))
        return f"flipped {n} bits in {path.name}"
    i = rng.integers(0, len(data) - 1)
    n = rng.integers(1, 64)
    data[i : i + n] = rng.bytes(min(n, len(data) - i))
    path.write_bytes(bytes(data))
    return f"overwrote {n} bytes at {i} in {path.name}"


def _image(rng: Rng) -> np.ndarray:
    shape = rng.choice([(40, 50), (6, 30, 40), (3, 20, 20)])
    dtype = rng.choice([np.uint8, np.uint16, np.float32])
    return (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)


def _read_small(spec: str, axes: str | None = None) -> None:
    """Open lazily and read a small ROI through the engine, as the workflow does."""
    from operators.file_sources import open_image

    src = open_image(spec, axes=axes)
    g = Graph(workers=1)
    try:
        node = g.add(src)
        shape = node.spec.shape
        roi = Roi((0,) * len(shape), tuple(min(n, 8) for n in shape))
        g.request(node, roi)
    finally:
        g.close()


def target_hdf5(rng: Rng, d: Path) -> str:
    """An HDF5 image damaged on disk."""
    import h5py

    path = d / "img.h5"
    with h5py.File(path, "w") as f:
        chunks = rng.choice([None, True])
        f.create_dataset("raw", data=_image(rng), chunks=chunks, compression=rng.choice([None, "gzip"]))
    what = _damage(path, rng)
    _read_small(f"{path}:/raw")
    return what


def _zarr_meta(store: Path) -> Path:
    for name in ("zarr.json", ".zarray"):
        if (store / name).exists():
            return store / name
    raise FileNotFoundError(store)


def target_zarr(rng: Rng, d: Path) -> str:
    """A zarr v2/v3 array whose metadata or chunks were damaged or made hostile."""
    import zarr

    path = d / "img.zarr"
    fmt = rng.choice([2, 3])
    img = _image(rng)
    zarr.create_array(str(path), data=img, chunks=tuple(max(1, n // 2) for n in img.shape), zarr_format=fmt)
    meta_file = _zarr_meta(path)
    kind = rng.choice(["meta-damage", "meta-shape", "meta-dtype", "chunk-damage", "chunk-missing"])
    if kind == "meta-damage":
        what = _damage(meta_file, rng)
    elif kind in ("meta-shape", "meta-dtype"):
        meta = json.loads(meta_file.read_text())
        if kind == "meta-shape":
            # metadata that claims an enormous (or nonsensical) shape: opening must stay lazy
            new = rng.choice([[10**6] * len(img.shape), [0] * len(img.shape), [-5] * len(img.shape), "big", [10**12]])
            meta["shape"] = new
        else:
            key = "data_type" if fmt == 3 else "dtype"
            meta[key] = rng.choice(["<c16", "|O", "complex128", "int4", "nonsense", 7])
        meta_file.write_text(json.dumps(meta))
        what = f"{kind}: {meta.get('shape')} {meta.get('data_type', meta.get('dtype'))}"
    else:
        chunks = [p for p in path.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")]
        victim = rng.choice(sorted(chunks))
        if kind == "chunk-missing":
            victim.unlink()
            what = f"removed chunk {victim.name} (reads as fill value)"
        else:
            what = _damage(victim, rng)
    _read_small(str(path))
    return f"zarr v{fmt} {what}"


def target_tiff(rng: Rng, d: Path) -> str:
    """A TIFF damaged on disk, or one whose header claims a huge image."""
    import tifffile

    path = d / "img.tif"
    tifffile.imwrite(path, _image(rng), tile=rng.choice([None, (16, 16)]))
    what = _damage(path, rng)
    _read_small(str(path))
    return what


def target_axes(rng: Rng, d: Path) -> str:
    """Random axes strings for files and arrays (wrong letters, repeats, wrong length, zero-size axes)."""
    import h5py

    from operators import ArraySource

    letters = "tzyxcqab ,-"
    axes = "".join(rng.choice(list(letters)) for _ in range(rng.integers(0, 6)))
    shape = tuple(rng.choice([0, 1, 3, 17]) for _ in range(rng.integers(1, 5)))
    arr = np.zeros(shape, np.float32)
    path = d / "axes.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=arr)
    try:
        _read_small(f"{path}:/a", axes=axes or None)
    finally:
        g = Graph(workers=1)
        try:
            g.add(ArraySource(arr, axes=axes))
        except TdaError:
            pass
        finally:
            g.close()
    return f"axes {axes!r} shape {shape}"


def target_project(rng: Rng, d: Path) -> str:
    """A saved project damaged on disk."""
    from operators.classifier import ClassifierSettings, train_forest
    from operators.labels import LabelStore
    from tda_graph.workflows.project import ProjectState, load_project, save_project

    store = LabelStore((32, 40), "yx", ("a", "b"), block_shape=(16, 16))
    store.paint(Roi((2, 2), (4, 30)), np.ones((2, 28), bool), 1)
    store.paint(Roi((20, 2), (22, 30)), np.ones((2, 28), bool), 2)
    X = np.random.default_rng(0).random((100, 3)).astype(np.float32)
    forest = train_forest(X, (X[:, 0] > 0.5).astype(np.int32) + 1, ClassifierSettings(n_trees=2, n_jobs=1))
    path = d / "p.tdap"
    save_project(path, ProjectState(selection="default", labels=store, forest=forest, channel=2))
    what = _damage(path, rng)
    load_project(path, check_files=False)
    return what


def target_workflow(rng: Rng, d: Path) -> str:
    """Hostile values and labels in the workflow: NaN/Inf, labels out of range, bad ROIs, one or no class.

    Most strokes and requests are valid (so the forest trains and predicts on the
    hostile image); some are not (outside the image, empty, a label that is no
    class). A refused stroke must leave the store usable for the next one.
    """
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

    img = np.random.default_rng(rng.integers(0, 1000)).random((48, 56)).astype(np.float32)
    special = rng.choice([None, np.nan, np.inf, -np.inf, 1e38, -1e38])
    if special is not None:
        y0, h, w = rng.integers(0, 40), rng.integers(1, 8), rng.integers(1, 56)
        img[y0 : y0 + h, :w] = special
    wf = TrainableDomainAdaptation(img, n_trees=3, workers=1, selection={"GaussianSmoothing": [0.7, 1.6]})
    refused = 0
    try:
        for _ in range(rng.integers(0, 5)):
            if rng.integers(0, 9) < 7:  # a valid stroke
                y, x, label = rng.integers(0, 46), rng.integers(0, 50), rng.integers(1, 2)
                corners, mask = ((y, x), (y + 2, x + 6)), np.ones((2, 6), bool)
            else:  # outside, empty, or a label that is no class
                y, x = rng.integers(-5, 50), rng.integers(-5, 60)
                h, w = rng.integers(0, 4), rng.integers(0, 6)
                corners, mask, label = ((y, x), (y + h, x + w)), np.ones((h, w), bool), rng.integers(-1, 4)
            try:
                wf.paint(Roi(*corners), mask, label)
            except TdaError as e:
                if not str(e).strip():
                    raise
                refused += 1
        out = rng.choice(["probabilities", "segmentation", "uncertainty", "features"])
        n = wf.output(out).spec.shape
        if rng.integers(0, 9) < 7:
            start = tuple(rng.integers(0, k - 1) for k in n)
            stop = tuple(rng.integers(a + 1, k) for a, k in zip(start, n))
        else:
            start = tuple(rng.integers(-3, k) for k in n)
            stop = tuple(a + rng.integers(-1, 10) for a in start)
        res = wf.request(out, Roi(start, stop))
        if out != "features" and not np.isfinite(res).all():
            raise AssertionError(f"{out} holds non-finite values")
        return f"special {special}, {refused} strokes refused, request {out} {start}:{stop} ok"
    finally:
        wf.close()


TARGETS: dict[str, Callable[[Rng, Path], str]] = {
    "hdf5": target_hdf5,
    "zarr": target_zarr,
    "tiff": target_tiff,
    "axes": target_axes,
    "project": target_project,
    "workflow": target_workflow,
}


def run_case(name: str, rng: Rng, scratch: Path, tag: str = "case") -> tuple[str, BaseException | None]:
    """Run target ``name`` with the choices of ``rng`` in a fresh sub-folder.

    Returns what the case did and the unexpected exception it raised (``None``: it
    worked, or raised a project exception with a message).
    """
    import tracemalloc

    d = scratch / f"{name}-{tag}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    what = ""
    tracemalloc.start()
    try:
        what = TARGETS[name](rng, d)
        err: BaseException | None = None
    except TdaError as e:
        what = what or f"{type(e).__name__}: {str(e)[:120]}"
        err = None if str(e).strip() else e  # a project exception must say something
    except Exception as e:  # anything else is what fuzzing looks for
        err = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        shutil.rmtree(d, ignore_errors=True)
    if err is None and peak > ALLOC_LIMIT:
        err = MemoryError(f"case allocated {peak / 2**20:.0f} MiB (limit {ALLOC_LIMIT >> 20} MiB)")
    return what, err


def scratch_dir(base: str | os.PathLike[str]) -> Path:
    """A scratch folder for the cases."""
    p = Path(base) / "fuzz"
    p.mkdir(parents=True, exist_ok=True)
    return p
