"""Property-based fuzzing of every bad input a user can hand tda-graph (hypothesis).

Targets: damaged (truncated, bit-flipped, overwritten) HDF5, zarr v2/v3 and TIFF
images; metadata claiming enormous shapes or chunks (a zarr ``.zarray`` /
``zarr.json`` claiming 10^12 voxels, a TIFF header claiming a 2^31-pixel side);
damaged project files (``save_project``) and ilastik imports of them; wrong axes
strings and zero-size axes; label values outside the class range, out-of-bounds
ROIs, wrong masks; NaN/Inf images with no, one or two labelled classes; and the
``tda train`` / ``tda predict`` command line run in-process.

The contract checked for each case:

* it works, or raises a project exception (:class:`~tda_graph.TdaError`) whose
  message is not empty: never a raw ``KeyError``/``OSError``/numpy error;
* no giant allocation is attempted: peak traced allocation stays under
  :data:`ALLOC_LIMIT` (opening is lazy; a small ROI read stays small);
* a refused edit leaves the label store exactly as it was (no corrupted state);
* NaN/Inf pixels (what a demanding user expects): features may carry them, but
  probabilities, segmentation and uncertainty are either finite (probabilities in
  [0, 1], summing to 1) or the request raises a project error naming the problem;
  a NaN must never silently become a class;
* the command line answers exit code 0, or 2 with ``tda: error: ...``.

Byte damage uses ``numpy`` generators seeded by a hypothesis-drawn seed, so every
failure replays. ``benchmarks/fuzz_inputs.py`` runs the same targets with many
more examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
h5py = pytest.importorskip("h5py")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tda_graph import Graph, Roi, TdaError  # noqa: E402

#: Bytes one case may allocate (tracemalloc peak): "no giant allocation is attempted".
ALLOC_LIMIT = 256 << 20


# -- helpers ------------------------------------------------------------------------------------------


def damage(path: Path, seed: int) -> str:
    """Truncate, flip bits in, or overwrite a stretch of ``path`` (seeded); describe what was done."""
    rng = np.random.default_rng(seed)
    data = bytearray(path.read_bytes())
    kind = ("truncate", "flip", "stretch")[int(rng.integers(0, 3))]
    if kind == "truncate" or len(data) < 2:
        cut = int(rng.integers(0, max(1, len(data))))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} of {len(data)} bytes"
    if kind == "flip":
        n = int(rng.integers(1, 17))
        for i in rng.integers(0, len(data), n):
            data[int(i)] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        return f"flipped {n} bits in {path.name}"
    i, n = int(rng.integers(0, len(data))), int(rng.integers(1, 65))
    data[i : i + n] = rng.integers(0, 256, min(n, len(data) - i), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return f"overwrote {n} bytes at {i} of {path.name}"


def image(data: Any) -> np.ndarray:
    """A small 2-D or 3-D test image of a drawn dtype."""
    shape = data.draw(st.sampled_from([(40, 50), (6, 30, 40), (3, 20, 24)]), label="shape")
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16, np.float32]), label="dtype")
    return (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)


def read_small(spec: str, axes: str | None = None, side: int = 8) -> np.ndarray:
    """Open lazily, then read a small corner through the engine as the workflow does."""
    from operators.file_sources import open_image

    src = open_image(spec, axes=axes)
    g = Graph(workers=1)
    try:
        node = g.add(src)
        shape = node.spec.shape
        if 0 in shape:
            return np.zeros(shape, node.spec.dtype)
        return g.request(node, Roi((0,) * len(shape), tuple(min(n, side) for n in shape)))
    finally:
        g.close()


# -- targets ------------------------------------------------------------------------------------------


def target_hdf5(data: Any, d: Path) -> str:
    """An HDF5 image damaged on disk, or a (never written) dataset claiming 10^12 voxels."""
    path = d / "img.h5"
    if data.draw(st.booleans(), label="huge"):
        side = data.draw(st.sampled_from([10**6, 2**31]), label="side")
        with h5py.File(path, "w") as f:
            f.create_dataset("raw", shape=(side, side), dtype=np.float32, chunks=(256, 256))
        out = read_small(f"{path}:/raw")  # lazy: only the corner's chunk is touched (fill value)
        assert out.shape == (8, 8) and not out.any()
        return f"huge dataset {side}x{side}: small read ok"
    with h5py.File(path, "w") as f:
        chunks = data.draw(st.sampled_from([None, True]), label="chunks")
        comp = data.draw(st.sampled_from([None, "gzip"]), label="compression")
        f.create_dataset("raw", data=image(data), chunks=chunks, compression=comp)
    what = damage(path, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    inner = data.draw(st.sampled_from([":/raw", "", ":/nope", ":/"]), label="inner")
    read_small(f"{path}{inner}")
    return what


def _zarr_meta(store: Path) -> Path:
    return store / "zarr.json" if (store / "zarr.json").exists() else store / ".zarray"


def target_zarr(data: Any, d: Path) -> str:
    """A zarr v2/v3 array with damaged metadata or chunks, or metadata claiming huge shapes / chunks."""
    import zarr

    path = d / "img.zarr"
    fmt = data.draw(st.sampled_from([2, 3]), label="format")
    img = image(data)
    zarr.create_array(str(path), data=img, chunks=tuple(max(1, n // 2) for n in img.shape), zarr_format=fmt)
    meta_file = _zarr_meta(path)
    kind = data.draw(st.sampled_from(["meta", "chunk", "huge-shape", "huge-chunks", "dtype", "missing"]), label="kind")
    if kind in ("meta", "chunk", "missing"):
        chunks = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray"))
        victim = meta_file if kind == "meta" else chunks[data.draw(st.integers(0, len(chunks) - 1), label="chunk")]
        if kind == "missing":
            victim.unlink()
            what = f"removed {victim.name}"
        else:
            what = damage(victim, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    else:
        meta = json.loads(meta_file.read_text())
        if kind == "huge-shape":
            # 10^12 voxels (or more) with the right number of axes: opening must stay lazy
            total = data.draw(st.sampled_from([10**12, 10**15, 2**63 - 1]), label="voxels")
            side = int(round(total ** (1 / img.ndim)))
            meta["shape"] = [side] * img.ndim
        elif kind == "huge-chunks":
            big = [10**5] * img.ndim
            if fmt == 3:
                meta["chunk_grid"]["configuration"]["chunk_shape"] = big
            else:
                meta["chunks"] = big
        else:
            key = "data_type" if fmt == 3 else "dtype"
            meta[key] = data.draw(st.sampled_from(["<c16", "|O", "complex128", "nonsense", 7, "|V8"]), label="dtype")
        meta_file.write_text(json.dumps(meta))
        what = f"{kind}: shape {meta.get('shape')}"
    out = read_small(str(path))
    assert out.nbytes <= 8**3 * 8
    return f"zarr v{fmt} {what}"


def _tiff_huge_header(path: Path, data: Any) -> str:
    """Edit ImageWidth / ImageLength in place to claim a huge image."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tags = [(page.tags[k].valueoffset, page.tags[k].dtype) for k in ("ImageWidth", "ImageLength")]
    raw = bytearray(path.read_bytes())
    value = data.draw(st.sampled_from([65535, 10**6, 2**31 - 1, 2**32 - 1]), label="claim")
    for off, dtype in tags:
        if int(dtype) == 3:  # SHORT
            raw[off : off + 2] = struct.pack("<H", min(value, 65535))
        else:
            raw[off : off + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(raw))
    return f"header claims {value}x{value}"


def target_tiff(data: Any, d: Path) -> str:
    """A TIFF damaged on disk, or one whose header claims a huge image."""
    tifffile = pytest.importorskip("tifffile")

    path = d / "img.tif"
    tile = data.draw(st.sampled_from([None, (16, 16)]), label="tile")
    comp = data.draw(st.sampled_from([None, "zlib"]), label="compression")
    tifffile.imwrite(path, image(data), tile=tile, compression=comp, photometric="minisblack")
    if data.draw(st.booleans(), label="huge"):
        what = _tiff_huge_header(path, data)
    else:
        what = damage(path, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    read_small(str(path))
    return what


def _small_state() -> Any:
    from operators.classifier import ClassifierSettings, train_forest
    from operators.labels import LabelStore
    from tda_graph.workflows.project import ProjectState

    store = LabelStore((32, 40), "yx", ("a", "b"), block_shape=(16, 16))
    store.paint(Roi((2, 2), (4, 30)), np.ones((2, 28), bool), 1)
    store.paint(Roi((20, 2), (22, 30)), np.ones((2, 28), bool), 2)
    X = np.random.default_rng(0).random((100, 3)).astype(np.float32)
    forest = train_forest(X, (X[:, 0] > 0.5).astype(np.int32) + 1, ClassifierSettings(n_trees=2, n_jobs=1))
    return ProjectState(selection={"GaussianSmoothing": [0.7]}, axes="yx", labels=store, forest=forest, channel=2)


def target_project(data: Any, d: Path) -> str:
    """A saved project truncated / bit-flipped on disk: load_project and the ilastik importer."""
    from tda_graph.workflows.project import import_ilastik_project, load_project, save_project

    path = d / "p.h5"
    save_project(path, _small_state())
    what = damage(path, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    reader = data.draw(st.sampled_from(["load", "ilastik"]), label="reader")
    if reader == "ilastik":
        import_ilastik_project(path)  # not an .ilp: must say so
        return what + " (imported as .ilp)"
    state = load_project(path, check_files=False)
    if state.labels is not None:  # whatever loaded is consistent: values within the classes
        # counts(), not to_dense(): a flipped bit in the (unchecksummed) shape attribute can load as a
        # store claiming a much larger image; it stays sparse, a dense copy would be the giant allocation
        assert all(1 <= k <= len(state.labels.classes) for k in state.labels.counts())
    return what + " (loaded)"


def target_axes(data: Any, d: Path) -> str:
    """Random axes strings (wrong letters, repeats, wrong length) and zero-size axes everywhere axes are taken."""
    from operators import ArraySource
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation
    from tda_graph.workflows.project import ProjectState

    axes = data.draw(st.text(alphabet="tzyxcqYX ,-0", max_size=6), label="axes")
    shape = tuple(data.draw(st.lists(st.sampled_from([0, 1, 3, 17]), min_size=1, max_size=5), label="shape"))
    arr = np.zeros(shape, np.float32)
    where = data.draw(st.sampled_from(["file", "array", "project", "workflow"]), label="where")
    if where == "file":
        path = d / "axes.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("a", data=arr)
        read_small(f"{path}:/a", axes=axes or None)
    elif where == "array":
        g = Graph(workers=1)
        try:
            node = g.add(ArraySource(arr, axes=axes))
            if 0 not in node.spec.shape:
                g.request(node, Roi((0,) * arr.ndim, (1,) * arr.ndim))
        finally:
            g.close()
    elif where == "project":
        ProjectState(axes=axes)
    else:
        with TrainableDomainAdaptation(arr, axes=axes or None, n_trees=2, workers=1) as wf:
            if 0 not in arr.shape:
                wf.request("features", Roi((0,) * len(wf.features.spec.shape), (1,) * len(wf.features.spec.shape)))
    return f"{where}: axes {axes!r} shape {shape}"


def target_labels(data: Any, d: Path) -> str:
    """Label edits with out-of-range values, out-of-bounds ROIs, wrong masks; a refused edit changes nothing."""
    from operators.labels import LabelStore

    shape = data.draw(st.sampled_from([(20, 30), (4, 10, 12)]), label="shape")
    axes = "yx" if len(shape) == 2 else "zyx"
    n_classes = data.draw(st.integers(1, 4), label="classes")
    store = LabelStore(shape, axes, [f"c{i}" for i in range(n_classes)], block_shape=(8,) * len(shape))
    refused = 0
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        start = tuple(data.draw(st.integers(-3, n + 2)) for n in shape)
        stop = tuple(s + data.draw(st.integers(-1, 6)) for s in start)
        op = data.draw(st.sampled_from(["paint", "erase", "load_dense", "undo"]), label="op")
        label = data.draw(st.one_of(st.integers(-2, n_classes + 3), st.sampled_from([True, 1.5, np.int64(1), 300])))
        before, version = store.to_dense(), store.version
        try:
            roi = Roi(start, stop)
            mshape = tuple(max(0, b - a) for a, b in zip(start, stop))
            if data.draw(st.booleans(), label="bad mask"):
                mshape = mshape[::-1] + (1,)
            mask = np.ones(mshape, bool)
            if op == "paint":
                store.paint(roi, mask, label)
            elif op == "erase":
                store.erase(roi, mask)
            elif op == "load_dense":
                dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.float32, np.int64]), label="dtype")
                vals = np.full(mshape, label if not isinstance(label, bool) else 1)
                if dtype == np.float32 and data.draw(st.booleans(), label="nan"):
                    vals = np.full(mshape, np.nan)
                store.load_dense(vals.astype(dtype) if dtype != np.float32 else vals.astype(np.float32), offset=start)
            else:
                store.undo()
        except TdaError as e:
            assert str(e).strip()
            refused += 1
            assert store.version == version and np.array_equal(store.to_dense(), before), "a refused edit changed"
        dense = store.to_dense()
        assert dense.shape == tuple(shape) and int(dense.max(initial=0)) <= n_classes
    return f"{refused} edits refused"


def target_workflow(data: Any, d: Path) -> str:
    """NaN/Inf/huge pixels with no, one or two labelled classes; probabilities are finite or a clear error."""
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

    img = np.random.default_rng(data.draw(st.integers(0, 99), label="img")).random((40, 48)).astype(np.float32)
    special = data.draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 3e38]), label="special")
    if special is not None:
        where = data.draw(st.sampled_from(["pixel", "rows", "everywhere"]), label="where")
        if where == "pixel":
            img[data.draw(st.integers(0, 39)), data.draw(st.integers(0, 47))] = special
        elif where == "rows":
            img[data.draw(st.integers(0, 35)) :][:4] = special
        else:
            img[:] = special
    classes = data.draw(st.sampled_from([0, 1, 2]), label="labelled classes")
    with TrainableDomainAdaptation(img, n_trees=3, workers=1, selection={"GaussianSmoothing": [0.7, 1.6]}) as wf:
        with wf.strokes():
            for k in range(1, classes + 1):
                y = data.draw(st.integers(0, 37))
                wf.paint(Roi((y, 0), (y + 2, 48)), np.ones((2, 48), bool), k)
        out = data.draw(st.sampled_from(["probabilities", "segmentation", "uncertainty"]), label="output")
        n = wf.output(out).spec.shape
        if data.draw(st.integers(0, 4), label="bad roi") == 4:  # sometimes outside, negative or empty
            start = tuple(data.draw(st.integers(-2, k)) for k in n)
            stop = tuple(a + data.draw(st.integers(-1, 12)) for a in start)
        else:
            start = tuple(data.draw(st.integers(0, k - 1)) for k in n)
            stop = tuple(data.draw(st.integers(a + 1, k)) for a, k in zip(start, n))
        res = wf.request(out, Roi(start, stop))  # out of bounds: RoiError; nothing labelled: ClassifierNotReady
        assert np.isfinite(res).all(), f"{out} holds non-finite values for a {special} image"
        if out == "probabilities":
            assert (res >= 0).all() and (res <= 1).all(), f"probabilities outside [0, 1]: {res.min()}..{res.max()}"
            if start[-1] == 0 and stop[-1] == n[-1]:  # all classes requested
                assert np.allclose(res.sum(-1), 1, atol=1e-4), (
                    f"probabilities sum to {res.sum(-1).min()}..{res.sum(-1).max()}"
                )
    return f"special {special}, {classes} classes, {out} ok"


def _write_image(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .h5 / .zarr / .tif by suffix; return the spec string."""
    if path.suffix == ".h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("data", data=arr)
        return f"{path}:/data"
    if path.suffix == ".zarr":
        import zarr

        zarr.create_array(str(path), data=arr, chunks=arr.shape)
        return str(path)
    import tifffile

    tifffile.imwrite(path, arr, photometric="minisblack")
    return str(path)


def target_cli(data: Any, d: Path) -> str:
    """``tda train`` then ``tda predict`` in-process with hostile label images, axes, ROIs and memory sizes."""
    from tda_graph.frontends.cli import main

    img = np.random.default_rng(0).random((32, 40)) * 200
    img = img.astype(data.draw(st.sampled_from([np.uint8, np.float32]), label="dtype"))
    ext = data.draw(st.sampled_from([".h5", ".zarr", ".tif"]), label="format")
    image_spec = _write_image(d / f"img{ext}", img)
    kind = data.draw(
        st.sampled_from(["ok", "one-class", "empty", "out-of-range", "negative", "float", "shape", "nan"]),
        label="labels",
    )
    lab = np.zeros((32, 40), np.uint8)
    lab[2:4, :] = 1
    lab[20:22, :] = 2
    if kind == "one-class":
        lab[lab == 2] = 1
    elif kind == "empty":
        lab[:] = 0
    elif kind == "out-of-range":
        lab = lab.astype(np.uint16) * 300
    elif kind == "negative":
        lab = lab.astype(np.int16) - 3
    elif kind in ("float", "nan"):
        lab = lab.astype(np.float32) + (np.nan if kind == "nan" else 0.5)
    elif kind == "shape":
        lab = lab[:20]
    labels_spec = _write_image(d / f"lab{ext}", lab)
    axes = data.draw(st.sampled_from([[], ["--axes", "yx"], ["--axes", "xyz"], ["--axes", "c"]]), label="axes")
    project = d / "p.tdap"
    codes = []
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        argv = ["train", "--image", image_spec, "--labels", labels_spec, "--project", str(project), "--trees", "2"]
        codes.append(main(argv + axes))
        roi = data.draw(st.sampled_from([[], ["--roi", "0:8,0:8"], ["--roi", "5:2,0:1"], ["--roi", "0:99"]]))
        memory = data.draw(st.sampled_from([[], ["--memory", "64M"], ["--memory", "12x"], ["--memory", "1"]]))
        out = d / "out.h5"
        argv = ["predict", "--project", str(project), "--input", image_spec, "--output", f"{out}:/p", "--quiet"]
        codes.append(main(argv + roi + memory + ["--workers", "1"]))
    for c in codes:
        assert c in (0, 2), f"exit code {c}"
    if kind == "ok" and axes in ([], ["--axes", "yx"]):  # valid input must train
        assert codes[0] == 0, f"valid labels did not train: {err.getvalue()}"
    if 2 in codes:
        assert "tda: error: " in err.getvalue(), err.getvalue()
    return f"labels {kind} {ext} {axes} {roi} {memory}: exit codes {codes}"


TARGETS: dict[str, Callable[[Any, Path], str]] = {
    "hdf5": target_hdf5,
    "zarr": target_zarr,
    "tiff": target_tiff,
    "project": target_project,
    "axes": target_axes,
    "labels": target_labels,
    "workflow": target_workflow,
    "cli": target_cli,
}

#: Examples per target in the test (the whole file stays well under a minute).
EXAMPLES = {"hdf5": 30, "zarr": 40, "tiff": 30, "project": 25, "axes": 40, "labels": 40, "workflow": 15, "cli": 10}


def run_case(name: str, data: Any, scratch: Path) -> tuple[str, BaseException | None]:
    """Run target ``name`` in a fresh folder; return what it did and the contract violation (``None``: fine).

    A project exception with a message is fine; any other exception, an empty
    message or a traced allocation above :data:`ALLOC_LIMIT` is a violation.
    """
    d = scratch / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    what = ""
    err: BaseException | None = None
    tracemalloc.start()
    try:
        what = TARGETS[name](data, d)
    except TdaError as e:
        what = f"refused {type(e).__name__}: {str(e)[:160]}"
        err = None if str(e).strip() else e
    except Exception as e:  # anything else is what fuzzing looks for
        if type(e).__name__ == "Skipped":  # pytest.importorskip outside pytest
            raise
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        shutil.rmtree(d, ignore_errors=True)
    if err is None and peak > ALLOC_LIMIT:
        err = MemoryError(f"{what}: allocated {peak / 2**20:.0f} MiB (limit {ALLOC_LIMIT >> 20} MiB)")
    return what, err


def fuzz_settings(examples: int) -> settings:
    """Bounded, reproducible hypothesis settings (no example database, no deadline)."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_bad_inputs(target: str, tmp_path: Path) -> None:
    @fuzz_settings(EXAMPLES[target])
    @given(st.data())
    def case(data: Any) -> None:
        what, err = run_case(target, data, tmp_path)
        if err is not None:
            raise AssertionError(f"{target}: {what}: {type(err).__name__}: {err}") from err

    case()


# -- explicit cases the contract names (readable regression tests) ---------------------------------


def test_zarr_claiming_1e12_voxels_opens_lazily_and_reads_small(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    for fmt in (2, 3):
        path = tmp_path / f"v{fmt}.zarr"
        zarr.create_array(str(path), data=np.ones((40, 50), np.float32), chunks=(20, 25), zarr_format=fmt)
        meta_file = _zarr_meta(path)
        meta = json.loads(meta_file.read_text())
        meta["shape"] = [10**6, 10**6]
        meta_file.write_text(json.dumps(meta))
        tracemalloc.start()
        try:
            out = read_small(str(path))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert out.shape == (8, 8) and peak < 16 << 20
        # chunks claimed enormous: refused at open, before any read allocates one
        if fmt == 3:
            meta["chunk_grid"]["configuration"]["chunk_shape"] = [10**5, 10**5]
        else:
            meta["chunks"] = [10**5, 10**5]
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(TdaError, match=r"chunks of shape \(100000, 100000\).*rechunk"):
            read_small(str(path))


def test_tiff_header_claiming_huge_image_is_refused_without_allocating(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.ones((40, 48), np.uint8), compression="zlib")

    class Always:
        def draw(self, strategy: Any, label: str | None = None) -> int:
            return 2**31 - 1

    _tiff_huge_header(path, Always())
    tracemalloc.start()
    try:
        with pytest.raises(TdaError, match=r"damaged TIFF: .*\(2147483647, 2147483647\).*restore"):
            read_small(str(path))
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_nothing_or_one_class_labelled_is_a_clear_error() -> None:
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with TrainableDomainAdaptation(img, n_trees=2, workers=1) as wf:
        with pytest.raises(TdaError, match="label"):
            wf.request("probabilities", Roi((0, 0, 0), (4, 4, 2)))
        wf.paint(Roi((0, 0), (2, 32)), np.ones((2, 32), bool), 1)
        with pytest.raises(TdaError, match="class"):
            wf.request("probabilities", Roi((0, 0, 0), (4, 4, 2)))


# found by target_cli: a read-only cached window of a float32 file source failed numba typing in the
# feature kernels (fixed in operators/kernels/features_cpu.py compute_features)
def test_cli_trains_and_predicts_on_a_valid_2d_float32_hdf5(tmp_path: Path) -> None:
    from tda_graph.frontends.cli import main

    lab = np.zeros((32, 40), np.uint8)
    lab[2:4], lab[20:22] = 1, 2
    image_spec = _write_image(tmp_path / "img.h5", np.random.default_rng(0).random((32, 40)).astype(np.float32))
    labels_spec = _write_image(tmp_path / "lab.h5", lab)
    project, out = tmp_path / "p.tdap", tmp_path / "out.h5"
    argv = ["train", "--image", image_spec, "--labels", labels_spec, "--project", str(project), "--trees", "2"]
    assert main(argv) == 0
    argv = ["predict", "--project", str(project), "--input", image_spec, "--output", f"{out}:/p", "--quiet"]
    assert main(argv + ["--workers", "1"]) == 0


def _set_bytecount(path: Path, page_index: int, value: int) -> None:
    """Overwrite the first StripByteCounts entry of one page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page_index].tags["StripByteCounts"]
        offset, fmt = tag.valueoffset, tif.byteorder + ("I" if tag.dtype == 4 else "H")
        value = min(value, 2 ** (8 * struct.calcsize(fmt)) - 1)
    data = bytearray(path.read_bytes())
    data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("shape", "axes", "page"),
    [
        ((6, 30, 40), None, 0),  # refused at open (the first page is checked there)
        ((6, 30, 40), None, 3),  # refused by the read that reaches page 3
        ((5, 3, 20, 30), "zcyx", 4),  # pages not on leading axes: all checked at the first read
    ],
)
def test_tiff_strip_beyond_end_of_file_is_refused_without_allocating(
    tmp_path: Path, shape: tuple[int, ...], axes: str | None, page: int
) -> None:
    # one flipped bit in a byte count made tifffile allocate the claimed 3.9 GB (found by the fuzz test)
    tifffile = pytest.importorskip("tifffile")
    from operators.file_sources import open_image

    path = tmp_path / "stack.tif"
    stack = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)
    tifffile.imwrite(path, stack)
    _set_bytecount(path, page, 4_000_000_000)
    if page == 3:  # pages before the damaged one still read
        src = open_image(str(path))
        assert src._read((slice(0, 2), slice(0, 30), slice(0, 40))).tolist() == stack[:2].tolist()
    tracemalloc.start()
    try:
        where = rf"page {page}" if axes is None else r"page \d+"  # planar stacks: tifffile numbers the pages
        with pytest.raises(TdaError, match=rf"damaged TIFF: strip/tile \d+ of {where} claims bytes \d+\.\.\d+ but"):
            read_small(str(path), axes=axes)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
