"""LabelStore: sparse blocks, versions, precise dirtiness, undo, import/export."""

import h5py
import numpy as np
import pytest

from operators import LabelClass, LabelError, LabelStore
from tda_graph import Graph, Roi
from tda_graph import testing as kit


def make(shape=(100, 130), **kw):
    g = Graph(workers=1)
    lab = g.add(LabelStore(shape, "yx" if len(shape) == 2 else "zyx", ("bg", "fg", "mito"), **kw))
    events = []
    sub = g.subscribe(lab, events.append)
    return g, lab, events, sub


def disk(r):
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r


def test_paint_stores_only_touched_blocks_and_dirties_changed_box():
    g, lab, events, sub = make()
    lab.paint(Roi((60, 60), (69, 69)), disk(4), 2)
    assert set(lab.labelled_blocks()) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert events[-1].rois == (Roi((60, 60), (69, 69)),)  # per-block boxes, merged
    covered = np.zeros((100, 130), bool)
    for r in events[-1].rois:
        covered[r.to_slices()] = True
    dense = lab.to_dense()
    assert (dense[covered] >= 0).all() and not (dense.astype(bool) & ~covered).any()
    assert lab.counts() == {2: int(disk(4).sum())}
    v = lab.block_version((0, 0))
    lab.paint(Roi((60, 60), (69, 69)), disk(4), 2)  # no change -> no event, no version bump
    assert len(events) == 1 and lab.block_version((0, 0)) == v
    np.testing.assert_array_equal(g.request(lab, Roi((60, 60), (69, 69))), disk(4) * 2)


def test_erase_and_undo():
    g, lab, events, sub = make()
    lab.paint(Roi((0, 0), (9, 9)), disk(4), 1)
    lab.paint(Roi((5, 5), (14, 14)), disk(4), 3)
    before = lab.to_dense()
    lab.erase(Roi((0, 0), (20, 20)))
    assert lab.to_dense().sum() == 0 and lab.labelled_blocks() == {}
    lab.undo()
    np.testing.assert_array_equal(lab.to_dense(), before)
    lab.undo()
    assert set(np.unique(lab.to_dense())) == {0, 1}
    lab.undo()
    assert lab.to_dense().sum() == 0
    with pytest.raises(LabelError, match="nothing to undo"):
        lab.undo()


@pytest.mark.parametrize(
    "label, match", [(0, "not a class"), (4, "use 1..3"), (True, "not a class"), (1.5, "not a class")]
)
def test_paint_rejects_bad_labels(label, match):
    g, lab, events, sub = make()
    with pytest.raises(LabelError, match=match):
        lab.paint(Roi((0, 0), (2, 2)), np.ones((2, 2), bool), label)


def test_paint_rejects_bad_masks_and_rois():
    g, lab, events, sub = make()
    with pytest.raises(LabelError, match="does not match"):
        lab.paint(Roi((0, 0), (2, 2)), np.ones((3, 3), bool), 1)
    with pytest.raises(Exception, match="outside"):
        lab.paint(Roi((99, 0), (101, 2)), np.ones((2, 2), bool), 1)


def test_dense_import_export_and_hdf5_round_trip(tmp_path, rng):
    g, lab, events, sub = make((20, 70, 90), block_shape=(8, 32, 32))
    dense = np.zeros((20, 70, 90), np.uint8)
    dense[3:5, 10:20, 40:80] = 1
    dense[10, 60:70, 0:5] = 3
    lab.load_dense(dense)
    np.testing.assert_array_equal(lab.to_dense(), dense)
    with pytest.raises(LabelError, match=r"outside 0..3"):
        lab.load_dense(np.full((2, 2, 2), 9, np.uint8))
    with pytest.raises(LabelError, match="integers"):
        lab.load_dense(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(LabelError, match="do not fit"):
        lab.load_dense(np.zeros((2, 2, 2), np.uint8), offset=(19, 0, 0))
    with h5py.File(tmp_path / "l.h5", "w") as f:
        lab.save_h5(f.create_group("labels"))
    with h5py.File(tmp_path / "l.h5", "r") as f:
        back = LabelStore.load_h5(f["labels"])
    np.testing.assert_array_equal(back.to_dense(), dense)
    assert back.class_names == ("bg", "fg", "mito") and back.classes[0].color == lab.classes[0].color
    assert back.block_shape == (8, 32, 32)


def test_hdf5_layout_stores_two_datasets_and_pads_edge_blocks(tmp_path, rng):
    g, lab, events, sub = make((20, 70, 90), block_shape=(8, 32, 32))
    dense = (rng.random((20, 70, 90)) < 0.01).astype(np.uint8) * rng.integers(1, 4, (20, 70, 90)).astype(np.uint8)
    lab.load_dense(dense)
    with h5py.File(tmp_path / "l.h5", "w") as f:
        lab.save_h5(f.create_group("labels"))
    with h5py.File(tmp_path / "l.h5", "r") as f:
        grp = f["labels"]
        assert sorted(grp) == ["blocks", "starts"] and grp.attrs["layout"] == 2
        n = len(lab.labelled_blocks())
        assert grp["blocks"].shape == (n, 8, 32, 32) and grp["starts"].shape == (n, 3)
        assert grp["blocks"].fletcher32 and grp["starts"].fletcher32
        # an edge block (x from 64, 26 wide) is padded with zeros, which are not labels
        k = int(np.flatnonzero(grp["starts"][:, 2] == 64)[0])
        assert not grp["blocks"][k][:, :, 26:].any()
        back = LabelStore.load_h5(grp)
    np.testing.assert_array_equal(back.to_dense(), dense)
    assert back.labelled_blocks().keys() == lab.labelled_blocks().keys()


def test_hdf5_empty_store_round_trip(tmp_path):
    g, lab, events, sub = make((20, 70, 90), block_shape=(8, 32, 32))
    with h5py.File(tmp_path / "l.h5", "w") as f:
        lab.save_h5(f.create_group("labels"))
    with h5py.File(tmp_path / "l.h5", "r") as f:
        assert list(f["labels"]) == []
        back = LabelStore.load_h5(f["labels"])
    assert not back.to_dense().any() and back.class_names == lab.class_names


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda g: g.attrs.__setitem__("layout", 7), r"layout 7; .*upgrade tda-graph"),
        (lambda g: g.__delitem__("starts"), r"expected datasets starts and blocks, got \['blocks'\]"),
        (lambda g: g.create_group("extra"), r"expected datasets starts and blocks"),
        (lambda g: g.attrs.__setitem__("block_shape", np.asarray([8, 16, 32])), r"do not match the block shape"),
        (lambda g: g["starts"].__setitem__((0, 1), 500), r"starts at \[\d+, 500, \d+\], outside"),
    ],
    ids=["newer layout", "starts missing", "extra object", "block shape", "start outside"],
)
def test_hdf5_malformed_label_group_is_refused(tmp_path, damage, message):
    g, lab, events, sub = make((20, 70, 90), block_shape=(8, 32, 32))
    lab.paint(Roi((2, 3, 4), (4, 9, 70)), np.ones((2, 6, 66), bool), 2)
    with h5py.File(tmp_path / "l.h5", "w") as f:
        lab.save_h5(f.create_group("labels"))
        damage(f["labels"])
    with h5py.File(tmp_path / "l.h5", "r") as f, pytest.raises(LabelError, match=message):
        LabelStore.load_h5(f["labels"])


def test_set_classes_refuses_removing_used_class():
    g, lab, events, sub = make()
    lab.paint(Roi((0, 0), (1, 1)), np.ones((1, 1)), 3)
    with pytest.raises(LabelError, match="in use"):
        lab.set_classes(["a", "b"])
    lab.set_classes(["a", "b", LabelClass("c", (1, 2, 3)), "d"])
    assert lab.class_names == ("a", "b", "c", "d")


def test_label_store_contract_dirty_covers_changes():
    g, lab, events, sub = make((40, 50))
    sub.disconnect()

    def write(roi, values):
        lab.paint(roi, np.asarray(values) % 2 == 0, 1 + int(abs(values.flat[0])) % 3)

    kit.check_dirty_covers_changes(g, lab, lab, n_edits=5, write=write)
    kit.check_roi_equals_full(g, lab)
