"""Lazy file-backed sources: HDF5, zarr v2/v3, OME-Zarr, TIFF, and open_image."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from operators import FeatureFilters, GaussianSmoothing
from operators.file_sources import (
    Hdf5Source,
    SourceError,
    TiffSource,
    ZarrSource,
    chunk_block_shape,
    open_image,
    parse_image_spec,
    validate_axes,
)
from tda_graph import Graph, GraphError, Roi, SpecError, testing

ILP = Path(__file__).resolve().parents[1].parent / "shared" / "ilastik" / "pixel_classification_2d_cells.ilp"


@pytest.fixture
def img3d() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, (9, 37, 41)).astype(np.uint16)


def _graph_of(src):
    g = Graph(workers=2)
    g.add(src)
    return g


def _check_rois(src, expected: np.ndarray) -> None:
    try:
        g = src.graph
    except GraphError:
        g = _graph_of(src)
    assert g.spec(src).shape == expected.shape
    assert g.spec(src).dtype == expected.dtype
    testing.check_roi_equals_full(g, src, n=8)
    np.testing.assert_array_equal(g.recompute(src), expected)
    r = Roi((1,) * expected.ndim, tuple(min(n, 7) for n in expected.shape))
    np.testing.assert_array_equal(g.request(src, r), expected[r.to_slices()])


# -- HDF5 ----------------------------------------------------------------------------------------


def test_hdf5_roi_reads(tmp_path: Path, img3d: np.ndarray) -> None:
    p = tmp_path / "img.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("volumes/raw", data=img3d, chunks=(3, 8, 8))
        f.create_dataset("other", data=np.zeros((4, 4)))
    src = Hdf5Source(p, "/volumes/raw")
    assert src.inner_path == "/volumes/raw"
    _check_rois(src, img3d)
    assert Hdf5Source(p, "volumes/raw").inner_path == "/volumes/raw"  # leading slash optional


def test_hdf5_reads_only_the_roi(tmp_path: Path, img3d: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "img.h5"
    with h5py.File(p, "w") as f:
        f["raw"] = img3d
    src = Hdf5Source(p, "raw")
    g = Graph()
    g.add(src, cache=False)
    seen = []
    orig = Hdf5Source._read

    def spy(self, slices):
        seen.append(slices)
        return orig(self, slices)

    monkeypatch.setattr(Hdf5Source, "_read", spy)
    g.request(src, Roi((2, 3, 4), (4, 10, 12)))
    assert seen == [(slice(2, 4), slice(3, 10), slice(4, 12))]


@pytest.mark.parametrize(
    ("chunks", "shape", "axes", "itemsize", "expected"),
    [
        ((1, 512, 512), (20, 1024, 1024), "zyx", 1, (1, 512, 512)),  # a chunk is a good block already
        ((1, 64, 64), (20, 1024, 1024), "zyx", 1, (1, 256, 1024)),  # tiny chunks: whole chunks, x then y
        ((4, 32, 32), (8, 40, 40), "zyx", 2, (8, 40, 40)),  # growth stops at the array
        ((512, 512, 3), (600, 700, 3), "yxc", 4, (512, 512, 3)),  # whole channels
        ((1, 2048, 4096), (1, 4096, 4096), "tyx", 16, None),  # 128 MiB chunks: too coarse, engine default
        (None, (10, 10), "yx", 1, None),  # contiguous storage: engine default
    ],
)
def test_chunk_block_shape(chunks, shape, axes, itemsize, expected) -> None:
    assert chunk_block_shape(chunks, shape, axes, itemsize) == expected


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_cache_grid_follows_chunks(tmp_path: Path, fmt: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A per-slice request must decode each touched chunk once, not once per default-grid block.
    data = np.random.default_rng(1).integers(0, 255, (12, 600, 600)).astype(np.uint8)
    zarr.create_array(tmp_path / "v.zarr", data=data, chunks=(1, 256, 256), zarr_format=fmt)
    src = ZarrSource(tmp_path / "v.zarr")
    g = _graph_of(src)
    assert g.block_shape(src) == (1, 512, 600)  # whole chunks, grown to >= 256 KiB
    reads: list[tuple[slice, ...]] = []
    orig = ZarrSource._read
    monkeypatch.setattr(ZarrSource, "_read", lambda self, sl: reads.append(sl) or orig(self, sl))
    out = g.request(src, Roi((5, 10, 10), (6, 590, 590)))
    np.testing.assert_array_equal(out, data[5:6, 10:590, 10:590])
    assert all(sl[0] == slice(5, 6) for sl in reads)  # only the requested slice is read
    assert sorted(sl[1].start for sl in reads) == [0, 512]  # one read per chunk-aligned block


def test_tiff_stack_cache_grid_follows_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(2).integers(0, 255, (6, 600, 600)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", data, tile=(128, 128))
    src = TiffSource(tmp_path / "s.tif")
    g = _graph_of(src)
    assert g.block_shape(src) == (1, 512, 600)  # whole tiles of one page, not (6, 64, 64)
    reads: list[tuple[slice, ...]] = []
    orig = TiffSource._read
    monkeypatch.setattr(TiffSource, "_read", lambda self, sl: reads.append(sl) or orig(self, sl))
    np.testing.assert_array_equal(g.request(src, Roi((4, 0, 0), (5, 600, 600))), data[4:5])
    assert reads and all(sl[0] == slice(4, 5) for sl in reads)


def test_hdf5_ilastik_axistags_and_transpose(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((2, 20, 30)).astype(np.float32)  # stored c, y, x
    tags = {"axes": [{"key": k, "typeFlags": 0} for k in "cyx"]}
    p = tmp_path / "tagged.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("data", data=data)
        ds.attrs["axistags"] = json.dumps(tags)
    src = Hdf5Source(p)  # the only dataset
    g = _graph_of(src)
    assert g.spec(src).axes == "yxc" and g.spec(src).shape == (20, 30, 2)
    assert src.stored_axes == "cyx"
    _check_rois(src, np.moveaxis(data, 0, -1))


def test_hdf5_dimension_labels(tmp_path: Path) -> None:
    p = tmp_path / "dims.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("d", data=np.zeros((5, 6, 3), np.uint8))
        for i, k in enumerate("yxc"):
            ds.dims[i].label = k
    src = Hdf5Source(p, "d")
    assert _graph_of(src).spec(src).axes == "yxc"


def test_hdf5_errors(tmp_path: Path, img3d: np.ndarray) -> None:
    p = tmp_path / "img.h5"
    with h5py.File(p, "w") as f:
        f["raw"] = img3d
        f["seg"] = img3d
        f.create_group("grp")
    with pytest.raises(SourceError, match=r"does not exist; check the path"):
        Hdf5Source(tmp_path / "missing.h5", "raw")
    with pytest.raises(SourceError, match=r"dataset 'nope' does not exist .* available datasets: /raw, /seg"):
        Hdf5Source(p, "nope")
    with pytest.raises(SourceError, match=r"'grp' is a group, not a dataset"):
        Hdf5Source(p, "grp")
    with pytest.raises(SourceError, match=r"holds 2 image datasets; name one .*available: /raw, /seg"):
        Hdf5Source(p)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(SourceError, match="not a readable HDF5 file"):
        Hdf5Source(bad, "raw")


def test_hdf5_rejects_non_numeric(tmp_path: Path) -> None:
    p = tmp_path / "c.h5"
    with h5py.File(p, "w") as f:
        f["z"] = np.zeros((4, 4), np.complex64)
    with pytest.raises(SourceError, match="only boolean, integer and float"):
        Hdf5Source(p, "z")


# -- axes ----------------------------------------------------------------------------------------


def test_axes_validation(tmp_path: Path, img3d: np.ndarray) -> None:
    p = tmp_path / "img.h5"
    with h5py.File(p, "w") as f:
        f["raw"] = img3d
        f["rgb"] = np.zeros((40, 50, 3), np.uint8)
        f["four"] = np.zeros((2, 3, 4, 5), np.uint8)
    with pytest.raises(SpecError, match=r"unknown letter\(s\) \['q'\]; use one letter per axis from 'tzyxc'"):
        Hdf5Source(p, "raw", axes="qyx")
    with pytest.raises(SpecError, match="repeat a letter"):
        Hdf5Source(p, "raw", axes="yyx")
    with pytest.raises(SpecError, match=r"name 2 axes but .* has 3 .*pass one letter per axis"):
        Hdf5Source(p, "raw", axes="yx")
    with pytest.raises(SpecError, match="no spatial axis"):
        validate_axes("tc", (3, 4))
    with pytest.raises(SpecError, match="pass axes='yxc' for a colour image"):
        Hdf5Source(p, "rgb")
    with pytest.raises(SpecError, match="cannot guess the axes .* 4 dimensions"):
        Hdf5Source(p, "four")
    src = Hdf5Source(p, "rgb", axes="YXC")  # case-insensitive
    assert _graph_of(src).spec(src).axes == "yxc"
    src = Hdf5Source(p, "four", axes="ctyx")  # any stored order; output is canonical
    g = _graph_of(src)
    assert g.spec(src).axes == "tyxc" and g.spec(src).shape == (3, 4, 5, 2)


# -- zarr ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_array_roi_reads(tmp_path: Path, img3d: np.ndarray, fmt: int) -> None:
    p = tmp_path / f"img{fmt}.zarr"
    arr = zarr.create_array(str(p), shape=img3d.shape, chunks=(2, 16, 16), dtype=img3d.dtype, zarr_format=fmt)
    arr[:] = img3d
    src = ZarrSource(p)
    assert src.inner_path is None
    _check_rois(src, img3d)
    assert isinstance(open_image(str(p)), ZarrSource)


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_group_array_path(tmp_path: Path, img3d: np.ndarray, fmt: int) -> None:
    p = tmp_path / "grp.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=fmt)
    g.create_array("a/raw", shape=img3d.shape, chunks=(3, 10, 10), dtype=img3d.dtype)[:] = img3d
    g.create_array("b", shape=(4, 4), dtype="f4")
    _check_rois(ZarrSource(p, "a/raw"), img3d)
    _check_rois(open_image(f"{p}:a/raw"), img3d)
    with pytest.raises(SourceError, match=r"holds 2 arrays .*\(available: a/raw, b\)"):
        ZarrSource(p)
    with pytest.raises(SourceError, match=r"array 'zz' not found .* available arrays: a/raw, b"):
        ZarrSource(p, "zz")
    with pytest.raises(SourceError, match="does not exist"):
        ZarrSource(tmp_path / "nothing.zarr")


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_zarr_axes_and_scale0(tmp_path: Path, fmt: int) -> None:
    rng = np.random.default_rng(2)
    s0 = rng.random((2, 6, 32, 24)).astype(np.float32)  # c z y x
    s1 = s0[:, :, ::2, ::2].copy()
    p = tmp_path / "image.ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=fmt)
    g.create_array("0", shape=s0.shape, chunks=(1, 3, 16, 16), dtype="f4")[:] = s0
    g.create_array("1", shape=s1.shape, chunks=(1, 3, 16, 16), dtype="f4")[:] = s1
    ms = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space"},
                {"name": "y", "type": "space"},
                {"name": "x", "type": "space"},
            ],
            "datasets": [{"path": "0"}, {"path": "1"}],
        }
    ]
    omero = {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}
    if fmt == 2:
        g.attrs.update({"multiscales": ms, "omero": omero})
    else:
        g.attrs.update({"ome": {"version": "0.5", "multiscales": ms, "omero": omero}})
    src = ZarrSource(p)
    gr = _graph_of(src)
    spec = gr.spec(src)
    assert src.inner_path == "0" and src.stored_axes == "czyx"
    assert spec.axes == "zyxc" and spec.shape == (6, 32, 24, 2)
    assert spec.channel_names == ("DAPI", "GFP")
    _check_rois(src, np.moveaxis(s0, 0, -1))
    low = ZarrSource(p, "1")  # another scale keeps the multiscales axes
    assert _graph_of(low).spec(low).shape == (6, 16, 12, 2)
    direct = ZarrSource(p / "0")  # the scale array opened directly
    assert direct.stored_axes == "czyx"
    assert _graph_of(direct).spec(direct).channel_names == ("DAPI", "GFP")
    override = ZarrSource(p, axes="tzyx")  # explicit axes win over metadata
    assert _graph_of(override).spec(override).axes == "tzyx"


def test_zarr_v3_dimension_names(tmp_path: Path) -> None:
    p = tmp_path / "named.zarr"
    arr = zarr.create_array(str(p), shape=(3, 20, 10), dtype="u1", zarr_format=3, dimension_names=("c", "y", "x"))
    arr[:] = 7
    src = ZarrSource(p)
    assert _graph_of(src).spec(src).axes == "yxc"


# -- TIFF ----------------------------------------------------------------------------------------


def test_tiff_stack_roi_reads(tmp_path: Path, img3d: np.ndarray) -> None:
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, img3d)
    src = TiffSource(p)
    _check_rois(src, img3d)
    assert isinstance(open_image(str(p)), TiffSource)


def test_tiff_big_endian_tiled_2d(tmp_path: Path) -> None:
    data = np.random.default_rng(3).random((70, 90)).astype(">f4")
    p = tmp_path / "tiled.tiff"
    tifffile.imwrite(p, data, tile=(32, 32), byteorder=">")
    src = TiffSource(p)
    g = _graph_of(src)
    assert g.spec(src).axes == "yx" and g.spec(src).dtype == np.dtype(np.float32)
    _check_rois(src, data.astype(np.float32))


def test_tiff_ome_axes_and_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(4).integers(0, 255, (30, 40, 3)).astype(np.uint8)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, rgb, photometric="rgb")
    src = TiffSource(p)
    assert _graph_of(src).spec(src).axes == "yxc"
    _check_rois(src, rgb)
    with pytest.raises(SourceError, match="not a readable TIFF"):
        bad = tmp_path / "bad.tif"
        bad.write_bytes(b"garbage")
        TiffSource(bad)


# -- open_image, threading, downstream -----------------------------------------------------------


def test_parse_image_spec() -> None:
    assert parse_image_spec("/d/a.h5:/raw/data") == ("/d/a.h5", "/raw/data", "hdf5")
    assert parse_image_spec("a.H5") == ("a.H5", None, "hdf5")
    assert parse_image_spec("/x.h5dir/b.hdf5:g") == ("/x.h5dir/b.hdf5", "g", "hdf5")
    assert parse_image_spec("img.ome.zarr") == ("img.ome.zarr", None, "zarr")
    assert parse_image_spec("img.zarr:0") == ("img.zarr", "0", "zarr")
    assert parse_image_spec("s.tiff") == ("s.tiff", None, "tiff")
    with pytest.raises(SourceError, match="cannot tell the format of 'image.png'"):
        parse_image_spec("image.png")
    with pytest.raises(SourceError, match="TIFF file has no inner path"):
        parse_image_spec("a.tif:0")


def test_open_image_hdf5_with_axes(tmp_path: Path) -> None:
    data = np.arange(2 * 12 * 10, dtype=np.int32).reshape(2, 12, 10)
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f["g/d"] = data
    src = open_image(f"{p}:/g/d", axes="cyx")
    assert isinstance(src, Hdf5Source) and src.location == f"{p}:/g/d"
    _check_rois(src, np.moveaxis(data, 0, -1))


def test_concurrent_requests(tmp_path: Path) -> None:
    data = np.random.default_rng(5).random((128, 160)).astype(np.float32)
    srcs = []
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=(32, 32))
    srcs.append(Hdf5Source(tmp_path / "c.h5", "d"))
    tifffile.imwrite(tmp_path / "c.tif", data, tile=(32, 32))
    srcs.append(TiffSource(tmp_path / "c.tif"))
    zarr.create_array(str(tmp_path / "c.zarr"), shape=data.shape, chunks=(32, 32), dtype="f4")[:] = data
    srcs.append(ZarrSource(tmp_path / "c.zarr"))
    errors: list[BaseException] = []
    for src in srcs:
        g = Graph(workers=4)
        g.add(src, cache=True, block_shape=(32, 32))

        def worker(i: int, g: Graph = g, src=src) -> None:
            try:
                r = Roi((i * 7 % 90, i * 11 % 120), (i * 7 % 90 + 38, i * 11 % 120 + 40))
                np.testing.assert_array_equal(g.request(src, r), data[r.to_slices()])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_downstream_operator_matches_numpy_source(tmp_path: Path) -> None:
    from operators import ArraySource

    data = np.random.default_rng(6).random((48, 56)).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["d"] = data
    g = Graph(workers=2)
    fsrc = g.add(Hdf5Source(tmp_path / "s.h5", "d"))
    asrc = g.add(ArraySource(data.copy(), "yx"))
    a = g.add(GaussianSmoothing(sigma=1.5), image=fsrc)
    b = g.add(GaussianSmoothing(sigma=1.5), image=asrc)
    testing.check_roi_equals_full(g, a, n=6)
    np.testing.assert_array_equal(g.request(a), g.request(b))


@pytest.mark.skipif(not ILP.is_file(), reason="ilastik example project not available")
def test_ilastik_project_raw_data() -> None:
    src = open_image(f"{ILP}:/Input Data/local_data/3cccd446-5f3a-11eb-b5ca-00e04c00063c")
    g = Graph(workers=2)
    g.add(src)
    spec = g.spec(src)
    assert spec.axes == "yxc" and spec.shape == (1024, 1344, 1) and spec.dtype == np.uint8
    feats = g.add(FeatureFilters({"GaussianSmoothing": [1.0]}), image=src)
    out = g.request(feats, Roi((100, 200, 0), (140, 260, 1)))
    assert out.shape == (40, 60, 1)
    with h5py.File(ILP, "r") as f:
        raw = f["Input Data/local_data/3cccd446-5f3a-11eb-b5ca-00e04c00063c"][100:140, 200:260]
    np.testing.assert_array_equal(g.request(src, Roi((100, 200, 0), (140, 260, 1))), raw)
