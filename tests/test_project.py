"""Project files: round trip, atomic saves, locking, safety checks, moved folders, ilastik import."""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from operators.classifier import ClassifierSettings, train_forest
from operators.file_sources import Hdf5Source
from operators.kernels.forest_cpu import ForestArrays, predict_proba
from operators.labels import LabelClass, LabelStore
from tda_graph import Graph, Roi, SpecError
from tda_graph.workflows import project as project_mod
from tda_graph.workflows.project import (
    FORMAT_VERSION,
    EnhancerRef,
    ProjectError,
    ProjectLockedError,
    ProjectSaveInProgressWarning,
    ProjectState,
    import_ilastik_project,
    load_project,
    save_project,
)

ILP = Path(__file__).resolve().parents[1].parent / "shared" / "ilastik" / "pixel_classification_2d_cells.ilp"
FOREST_FIELDS = (
    "feature",
    "threshold",
    "left",
    "right",
    "missing_go_left",
    "leaf_value",
    "node_offsets",
    "leaf_offsets",
)


def _forest(seed: int = 0) -> ForestArrays:
    rng = np.random.default_rng(seed)
    X = rng.random((200, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1).astype(np.int32) + 1
    return train_forest(X, y, ClassifierSettings(n_trees=3, n_jobs=1, seed=seed))


def _labels() -> LabelStore:
    store = LabelStore((40, 50), "yx", [LabelClass("cells", (10, 20, 30)), "background", "edges"], block_shape=(16, 16))
    m = np.zeros((10, 20), bool)
    m[2:5, 3:17] = True
    store.paint(Roi((5, 5), (15, 25)), m, 1)
    store.paint(Roi((30, 30), (33, 50)), np.ones((3, 20), bool), 3)
    store.paint(Roi((20, 0), (21, 5)), np.ones((1, 5), bool), 2)
    return store


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    with h5py.File(ws / "data" / "img.h5", "w") as f:
        f["raw"] = np.random.default_rng(0).random((2, 40, 50)).astype(np.float32)
    (ws / "enhancer.weights").write_bytes(b"\x00weights\x01" * 100)
    return ws


def _full_state(ws: Path) -> ProjectState:
    return ProjectState(
        input_path=str(ws / "data" / "img.h5"),
        input_inner_path="/raw",
        axes="cyx",
        selection={"GaussianSmoothing": [0.3, 1.0], "HessianOfGaussianEigenvalues": [1.6]},
        in_2d=True,
        labels=_labels(),
        forest=_forest(),
        channel=1,
        enhancer=EnhancerRef.from_file(ws / "enhancer.weights"),
    )


def _assert_forest_equal(a: ForestArrays, b: ForestArrays) -> None:
    for name in FOREST_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert a.n_features == b.n_features
    X = np.random.default_rng(9).random((50, a.n_features)).astype(np.float32)
    np.testing.assert_array_equal(predict_proba(a, X), predict_proba(b, X))


def _assert_state_equal(a: ProjectState, b: ProjectState) -> None:
    assert Path(a.input_path).resolve() == Path(b.input_path).resolve()
    assert (a.input_inner_path, a.axes, a.selection, a.in_2d, a.channel) == (
        b.input_inner_path,
        b.axes,
        b.selection,
        b.in_2d,
        b.channel,
    )
    assert a.enhancer.sha256 == b.enhancer.sha256 and a.enhancer.name == b.enhancer.name
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert a.labels.classes == b.labels.classes
        assert a.labels.block_shape == b.labels.block_shape
        np.testing.assert_array_equal(a.labels.to_dense(), b.labels.to_dense())
    assert (a.forest is None) == (b.forest is None)
    if a.forest is not None:
        _assert_forest_equal(a.forest, b.forest)


def test_round_trip_every_field(workspace: Path) -> None:
    state = _full_state(workspace)
    path = workspace / "project.tdaproj"
    save_project(path, state)
    loaded = load_project(path)
    _assert_state_equal(state, loaded)
    assert loaded.selection == (
        ("GaussianSmoothing", 0.3),
        ("GaussianSmoothing", 1.0),
        ("HessianOfGaussianEigenvalues", 1.6),
    )
    assert loaded.labels.counts() == state.labels.counts()
    assert loaded.enhancer.path == str((workspace / "enhancer.weights").resolve())
    # the input opens as a lazy source with the stored axes
    src = loaded.open_input()
    assert isinstance(src, Hdf5Source)
    g = Graph(workers=1)
    g.add(src)
    assert g.spec(src).axes == "yxc" and g.spec(src).shape == (40, 50, 2)
    # nothing left behind
    assert sorted(p.name for p in workspace.iterdir()) == ["data", "enhancer.weights", "project.tdaproj"]
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f["input"].attrs["path_relative"] == os.path.join("data", "img.h5")


def test_round_trip_minimal_and_bundled_enhancer(tmp_path: Path) -> None:
    state = ProjectState(enhancer=EnhancerRef(name="shallow2deep-membranes"))
    save_project(tmp_path / "p.h5", state)
    loaded = load_project(tmp_path / "p.h5")
    assert loaded == ProjectState(enhancer=EnhancerRef(name="shallow2deep-membranes"))
    assert loaded.labels is None and loaded.forest is None and loaded.input_path is None
    # saving again replaces the file
    save_project(tmp_path / "p.h5", ProjectState(selection="default", channel=0))
    again = load_project(tmp_path / "p.h5")
    assert again.enhancer is None and again.channel == 0 and len(again.selection) == 24


def test_save_is_atomic(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = workspace / "project.h5"
    first = _full_state(workspace)
    save_project(path, first)
    before = path.read_bytes()

    def boom(group: h5py.Group, arrays: ForestArrays) -> None:
        group.create_dataset("feature", data=np.zeros(3, np.int32))  # half written
        raise RuntimeError("disk full")

    monkeypatch.setattr(project_mod, "save_forest", boom)
    second = ProjectState(selection="all", labels=LabelStore((8, 8), "yx"), forest=_forest(1))
    with pytest.raises(RuntimeError, match="disk full"):
        save_project(path, second)
    assert path.read_bytes() == before
    _assert_state_equal(first, load_project(path))
    leftovers = [p.name for p in workspace.iterdir() if p.name.startswith(".") or p.name.endswith(".lock")]
    assert leftovers == []


def test_lock_file_refuses_a_second_saver(workspace: Path) -> None:
    path = workspace / "p.h5"
    save_project(path, ProjectState(channel=2))
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live writer
    with pytest.raises(ProjectLockedError, match=r"being written by another process .*delete the lock file"):
        save_project(path, ProjectState(channel=3))
    lock.unlink()
    assert load_project(path).channel == 2


def test_load_during_a_save_reads_the_previous_save_and_warns(workspace: Path) -> None:
    path = workspace / "p.h5"
    save_project(path, ProjectState(channel=2))
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live writer that does not finish
    t0 = time.monotonic()
    with pytest.warns(ProjectSaveInProgressWarning, match=r"being saved by another process .*previous save"):
        state = load_project(path, wait=0.3)
    assert state.channel == 2
    assert time.monotonic() - t0 >= 0.3  # it waited for the save first
    assert lock.exists()  # a reader never touches a live lock


def test_load_waits_for_a_save_that_finishes(workspace: Path) -> None:
    path = workspace / "p.h5"
    save_project(path, ProjectState(channel=2))
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")

    def finish_save() -> None:  # what a saver does last: rename the new file over the target, drop the lock
        time.sleep(0.2)
        save_project(workspace / "new.h5", ProjectState(channel=3))
        os.replace(workspace / "new.h5", path)
        lock.unlink()

    saver = threading.Thread(target=finish_save)
    saver.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ProjectSaveInProgressWarning)
            assert load_project(path, wait=30.0).channel == 3  # the newest state, no warning
    finally:
        saver.join()


def test_load_of_a_first_save_in_progress_is_refused(workspace: Path) -> None:
    path = workspace / "p.h5"
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{os.getpid()} {os.uname().nodename}\n")
    with pytest.raises(ProjectLockedError, match=r"being saved for the first time .*try again when the save"):
        load_project(path, wait=0.1)
    lock.unlink()
    with pytest.raises(ProjectError, match="does not exist; check the path"):
        load_project(path)


def test_stale_lock_is_ignored(workspace: Path) -> None:
    path = workspace / "p.h5"
    save_project(path, ProjectState(channel=2))
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{2**22 + 12345} {os.uname().nodename}\n")  # no such process
    assert load_project(path).channel == 2
    save_project(path, ProjectState(channel=5))
    assert load_project(path).channel == 5
    assert not lock.exists()


def test_two_savers_breaking_one_stale_lock_do_not_both_write(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = workspace / "p.h5"
    save_project(path, ProjectState(channel=2))
    lock = workspace / "p.h5.lock"
    lock.write_text(f"{2**22 + 12345} {os.uname().nodename}\n")  # left by a dead process
    live = f"{os.getpid()} {os.uname().nodename}\n"
    judge = project_mod._lock_is_stale

    def other_saver_wins(candidate: Path) -> bool:
        stale = judge(candidate)
        # between our verdict and our removal, another saver breaks the lock and takes it
        candidate.unlink()
        (workspace / "other.tmp").write_text(live)
        os.link(workspace / "other.tmp", candidate)
        return stale

    monkeypatch.setattr(project_mod, "_lock_is_stale", other_saver_wins)
    with pytest.raises(ProjectLockedError, match="being written by another process"):
        save_project(path, ProjectState(channel=7))
    assert lock.read_text() == live  # the other saver's lock survives
    assert not list(workspace.glob(".p.h5.lock.*"))
    monkeypatch.setattr(project_mod, "_lock_is_stale", judge)
    lock.unlink()
    # a saver killed while breaking a lock leaves the renamed file; the next save removes it
    (workspace / f".p.h5.lock.{2**22 + 12345}.stale").write_text("x")
    save_project(path, ProjectState(channel=8))
    assert load_project(path).channel == 8 and not list(workspace.glob(".p.h5.lock.*"))


@pytest.mark.parametrize(
    "dataset", ["forest/threshold", "forest/leaf_value", "features/sigmas", "labels/starts", "labels/blocks"]
)
def test_bit_flipped_on_disk_is_detected(tmp_path: Path, dataset: str) -> None:
    # a flipped threshold, leaf value or label block position passes every shape and bound
    # check (a moved block stays inside the image); the stored checksum (HDF5 fletcher32)
    # is what catches it
    path = tmp_path / "p.h5"
    save_project(path, ProjectState(selection="default", labels=_labels(), forest=_forest()))
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ProjectError, match=r"corrupt: .*checksum .*restore it from a backup"):
        load_project(path)


def _flip_unique(path: Path, pattern: bytes, at: int, bit: int = 0x20) -> None:
    data = bytearray(path.read_bytes())
    assert data.count(pattern) == 1, f"{pattern!r} occurs {data.count(pattern)} times"
    data[data.index(pattern) + at] ^= bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("pattern", "at"),
    [
        (b"mitochondria-class", 0),  # class name: "Mitochondria-class"
        (bytes([201, 202, 203]), 1),  # class colour
    ],
    ids=["class name", "class colour"],
)
def test_attribute_flipped_on_disk_is_detected(tmp_path: Path, pattern: bytes, at: int) -> None:
    # fletcher32 covers datasets only; without the metadata digest each of these flips loads
    # silently: a renamed class, a recoloured class, labels moved to another block
    store = LabelStore((64, 64), "yx", [LabelClass("mitochondria-class", (201, 202, 203)), "bg"], block_shape=(16, 16))
    store.paint(Roi((48, 16), (50, 20)), np.ones((2, 4), bool), 1)
    path = tmp_path / "p.h5"
    save_project(path, ProjectState(labels=store))
    _flip_unique(path, pattern, at)
    with pytest.raises(ProjectError, match=r"corrupt: its metadata .*does not match the stored checksum"):
        load_project(path)
    # the escape hatch for a file edited by hand still opens it, with the change visible
    loaded = load_project(path, verify_metadata=False).labels
    assert loaded is not None
    before = (store.classes, store.to_dense().tolist())
    assert (loaded.classes, loaded.to_dense().tolist()) != before


def test_metadata_digest_passes_untouched_files_and_old_files(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    state = ProjectState(input_path=str(tmp_path / "raw.h5"), axes="yx", selection="default", labels=_labels())
    save_project(path, state)
    with h5py.File(path, "r") as f:
        assert len(f.attrs[project_mod.DIGEST_ATTR]) == 64
    load_project(path, check_files=False)
    with h5py.File(path, "r+") as f:
        f["input"].attrs["axes"] = "xy"  # an edit by hand is caught ...
    with pytest.raises(ProjectError, match="metadata"):
        load_project(path, check_files=False)
    with h5py.File(path, "r+") as f:
        del f.attrs[project_mod.DIGEST_ATTR]  # ... and a file written before the digest loads unchecked
    assert load_project(path, check_files=False).axes == "xy"


def _rewrite_labels_as_format_1(path: Path) -> None:
    """Turn a saved project into what tda-graph wrote before format 2: one dataset per label block."""
    with h5py.File(path, "r+") as f:
        g = f["labels"]
        starts, blocks = g["starts"][()], g["blocks"][()]
        shape = tuple(g.attrs["shape"])
        del g["starts"], g["blocks"], g.attrs["layout"]
        for n, (start, block) in enumerate(zip(starts, blocks)):
            crop = tuple(slice(0, min(b, m - s)) for b, m, s in zip(block.shape, shape, start))
            ds = g.create_dataset(f"block{n:06d}", data=block[crop], compression="gzip", fletcher32=True)
            ds.attrs["start"] = start
        f.attrs["format_version"] = 1
        f.attrs[project_mod.DIGEST_ATTR] = project_mod._metadata_digest(f)


def test_format_1_projects_still_load(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    store = _labels()  # 40 x 50 in 16 x 16 blocks: edge blocks are clipped
    save_project(path, ProjectState(labels=store))
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2 and sorted(f["labels"]) == ["blocks", "starts"]
        n = len(store.labelled_blocks())
        assert f["labels/blocks"].shape == (n, 16, 16)  # edge blocks zero-padded
    _rewrite_labels_as_format_1(path)
    with h5py.File(path, "r") as f:
        assert sorted(f["labels"]) == [f"block{k:06d}" for k in range(n)]
    loaded = load_project(path).labels
    assert loaded is not None
    np.testing.assert_array_equal(loaded.to_dense(), store.to_dense())
    assert loaded.classes == store.classes


def test_newer_format_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    save_project(path, ProjectState())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ProjectError, match=r"newer tda-graph .*upgrade tda-graph"):
        load_project(path)


@pytest.mark.parametrize("where", ["dataset", "attribute"])
def test_pickle_payload_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "p.h5"
    save_project(path, ProjectState(selection="default"))
    payload = np.void(pickle.dumps({"evil": True}))
    with h5py.File(path, "r+") as f:
        if where == "dataset":
            f["features"].create_dataset("extra", data=payload)
        else:
            f["input"].attrs["blob"] = payload
    with pytest.raises(ProjectError, match=r"opaque \(possibly pickled\).*nothing is unpickled"):
        load_project(path)


def test_object_reference_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    save_project(path, ProjectState())
    with h5py.File(path, "r+") as f:
        f.create_dataset("refs", data=[f["input"].ref], dtype=h5py.ref_dtype)
    with pytest.raises(ProjectError, match="reference data"):
        load_project(path)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    save_project(path, ProjectState(labels=_labels(), forest=_forest()))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ProjectError, match="corrupt or truncated"):
        load_project(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ProjectError, match="corrupt or truncated"):
        load_project(garbage)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ProjectError, match="not a tda-graph project"):
        load_project(foreign)
    with pytest.raises(ProjectError, match="does not exist"):
        load_project(tmp_path / "missing.h5")
    broken = tmp_path / "broken.h5"
    shutil.copy(path, broken)
    with h5py.File(broken, "r+") as f:
        del f["forest/leaf_value"]
    with pytest.raises(ProjectError, match="is corrupt: its metadata"):
        load_project(broken)  # the digest notices the missing dataset first ...
    with pytest.raises(ProjectError, match="is corrupt: forest dataset 'leaf_value' is missing"):
        load_project(broken, verify_metadata=False)  # ... and the structure checks still name it
    with h5py.File(broken, "r+") as f:
        del f["features"]
    with pytest.raises(ProjectError, match="is corrupt"):
        load_project(broken, verify_metadata=False)


def test_relative_input_after_moving_folder(workspace: Path, tmp_path: Path) -> None:
    save_project(workspace / "project.h5", _full_state(workspace))
    moved = tmp_path / "elsewhere" / "ws2"
    shutil.move(str(workspace), str(moved))
    loaded = load_project(moved / "project.h5")
    assert loaded.input_path == str((moved / "data" / "img.h5").resolve())
    assert loaded.enhancer.path == str((moved / "enhancer.weights").resolve())
    src = loaded.open_input()
    assert src.path == moved / "data" / "img.h5"


def test_input_found_next_to_project(workspace: Path, tmp_path: Path) -> None:
    save_project(workspace / "project.h5", _full_state(workspace))
    other = tmp_path / "flat"
    other.mkdir()
    shutil.copy(workspace / "project.h5", other / "project.h5")
    shutil.copy(workspace / "enhancer.weights", other / "enhancer.weights")
    shutil.copy(workspace / "data" / "img.h5", other / "img.h5")
    shutil.rmtree(workspace)
    loaded = load_project(other / "project.h5")
    assert loaded.input_path == str(other / "img.h5")


def test_missing_input_and_changed_enhancer(workspace: Path) -> None:
    save_project(workspace / "project.h5", _full_state(workspace))
    (workspace / "enhancer.weights").write_bytes(b"retrained")
    with pytest.raises(ProjectError, match="does not match the project's checksum"):
        load_project(workspace / "project.h5")
    shutil.rmtree(workspace / "data")
    with pytest.raises(ProjectError, match=r"input image was not found \(tried .*img\.h5.*check_files=False"):
        load_project(workspace / "project.h5")
    loaded = load_project(workspace / "project.h5", check_files=False)
    assert loaded.input_path == str((workspace / "data" / "img.h5").resolve())


def test_state_validation() -> None:
    with pytest.raises(SpecError, match="unknown letter"):
        ProjectState(axes="qyx")
    with pytest.raises(ProjectError, match="channel must be a non-negative integer"):
        ProjectState(channel=-1)
    with pytest.raises(ProjectError, match="exactly one of name="):
        EnhancerRef(name="a", path="b")
    with pytest.raises(ProjectError, match="no input image"):
        ProjectState().open_input()
    with pytest.raises(ProjectError, match="needs a ProjectState"):
        save_project("x.h5", {"channel": 1})  # type: ignore[arg-type]


@pytest.mark.skipif(not ILP.is_file(), reason="ilastik example project not available")
def test_import_ilastik_project(tmp_path: Path) -> None:
    state = import_ilastik_project(ILP)
    assert state.input_path == str(ILP) and state.axes == "yxc"
    assert state.input_inner_path == "/Input Data/local_data/3cccd446-5f3a-11eb-b5ca-00e04c00063c"
    assert len(state.selection) == 37 and ("GaussianSmoothing", 0.3) in state.selection
    assert ("HessianOfGaussianEigenvalues", 10.0) in state.selection
    assert ("LaplacianOfGaussian", 0.3) not in state.selection
    assert state.in_2d is True
    assert state.forest is None
    assert state.labels.classes == (LabelClass("Label 1", (255, 225, 25)), LabelClass("Label 2", (0, 130, 200)))
    assert state.labels.to_dense().shape == (1024, 1344)
    assert state.labels.counts() == {1: 294, 2: 838}  # ilastik trained on 1132 samples
    dense = state.labels.to_dense()
    with h5py.File(ILP, "r") as f:
        blk = f["PixelClassification/LabelSets/labels000/block0002"][()][..., 0]
    np.testing.assert_array_equal(dense[439:451, 191:196][blk > 0], blk[blk > 0])
    # the imported state saves and reloads like any project
    save_project(tmp_path / "imported.h5", state)
    loaded = load_project(tmp_path / "imported.h5")
    np.testing.assert_array_equal(loaded.labels.to_dense(), dense)
    assert loaded.selection == state.selection
    g = Graph(workers=1)
    src = g.add(loaded.open_input())
    assert g.spec(src).shape == (1024, 1344, 1)


def test_import_ilastik_errors(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="does not exist"):
        import_ilastik_project(tmp_path / "none.ilp")
    p = tmp_path / "other.ilp"
    with h5py.File(p, "w") as f:
        f["workflowName"] = b"Object Classification"
    with pytest.raises(ProjectError, match="not an ilastik Pixel Classification project"):
        import_ilastik_project(p)


def test_import_ilastik_external_input(tmp_path: Path) -> None:
    """A synthetic .ilp whose raw data lives in an external HDF5 file next to it."""
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f["volume/data"] = np.zeros((8, 30, 40), np.uint8)
    p = tmp_path / "ext.ilp"
    tags = '{"axes": [{"key": "z"}, {"key": "y"}, {"key": "x"}]}'
    with h5py.File(p, "w") as f:
        f["workflowName"] = b"Pixel Classification"
        fs = f.create_group("FeatureSelections")
        fs["FeatureIds"] = np.array([b"GaussianSmoothing", b"LaplacianOfGaussian"])
        fs["Scales"] = np.array([0.3, 1.0, 1.6])
        fs["SelectionMatrix"] = np.array([[True, False, True], [False, True, False]])
        fs["ComputeIn2d"] = np.array([False, False, False])
        info = f.create_group("Input Data/infos/lane0000/Raw Data")
        info["location"] = b"FileSystem"
        info["filePath"] = b"raw.h5/volume/data"
        info["axistags"] = tags.encode()
        info["shape"] = np.array([8, 30, 40])
        pc = f.create_group("PixelClassification")
        pc["LabelNames"] = np.array([b"a", b"b"])
        pc["LabelColors"] = np.array([[1, 2, 3], [4, 5, 6]])
        blk = pc.create_dataset("LabelSets/labels000/block0000", data=np.full((1, 2, 3), 2, np.uint8))
        blk.attrs["blockSlice"] = "[4:5,10:12,20:23]"
    state = import_ilastik_project(p)
    assert state.input_path == str(tmp_path / "raw.h5") and state.input_inner_path == "/volume/data"
    assert state.axes == "zyx" and state.in_2d is False
    assert state.selection == (("GaussianSmoothing", 0.3), ("GaussianSmoothing", 1.6), ("LaplacianOfGaussian", 1.0))
    assert state.labels.counts() == {2: 6}
    assert state.labels.to_dense()[4, 10:12, 20:23].tolist() == [[2, 2, 2], [2, 2, 2]]
    g = Graph(workers=1)
    src = g.add(state.open_input())
    assert g.spec(src).shape == (8, 30, 40)


def test_enhancer_tta_flag_round_trips_and_is_checked(tmp_path: Path) -> None:
    for tta in (False, True):
        state = ProjectState(enhancer=EnhancerRef(name="mitochondria_em2d", tta=tta))
        save_project(tmp_path / "p.h5", state)
        with h5py.File(tmp_path / "p.h5") as f:
            assert ("tta" in f["enhancer"].attrs) is tta  # absent when off: older readers see the same file
        assert load_project(tmp_path / "p.h5").enhancer.tta is tta
    with pytest.raises(ProjectError, match="tta must be True or False"):
        EnhancerRef(name="x", tta=1)
