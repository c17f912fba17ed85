"""Realistic scenario: brush strokes on a real FIB-SEM slice, forest segmentation of mitochondria."""

import numpy as np

from operators import ArraySource, FeatureFilters, LabelStore, PixelClassifier, Segmentation
from tda_graph import Graph, Roi
from tda_graph.workflows.strokes import simulate_strokes


def iou(pred, gt):
    return (pred & gt).sum() / max(1, (pred | gt).sum())


def test_strokes_on_epfl_slice_segment_mitochondria(shared_data):
    import h5py

    with h5py.File(shared_data / "epfl_train.h5", "r") as f:
        raw = f["raw"][0]
        mito = f["mitochondria"][0].astype(bool)
    g = Graph(workers=2)
    src = g.add(ArraySource(raw, axes="yx"))
    feats = g.add(FeatureFilters("default"), image=src)
    lab = g.add(LabelStore(raw.shape, "yx", ("background", "mitochondria")))
    clf = g.add(PixelClassifier(class_names=("background", "mitochondria"), seed=0), features=feats, labels=lab)
    seg = g.add(Segmentation(), probabilities=clf)
    strokes = simulate_strokes({1: ~mito, 2: mito}, pixels_per_class=300, seed=0)
    counts = {1: 0, 2: 0}
    for s in strokes:
        counts[s.label] += s.n_pixels
        assert (mito[s.roi.to_slices()][s.mask] == (s.label == 2)).all()  # strokes follow the ground truth
    assert all(300 <= n < 700 for n in counts.values())
    with g.batch():  # many strokes, one propagation
        for s in strokes:
            lab.paint(s.roi, s.mask, s.label)
    result = g.request(seg)
    assert clf.counters["trainings"] == 1
    score = iou(result == 2, mito)
    chance = iou(np.ones_like(mito), mito)  # "everything is mitochondria"
    print(
        f"EPFL slice 0: forest foreground IoU {score:.3f} (chance {chance:.3f}), "
        f"{sum(counts.values())} labelled pixels in {len(strokes)} strokes"
    )
    assert score > 2.5 * chance
    # a viewport after one more stroke: only the viewport is predicted again
    before = g.stats(clf)["voxels_computed"]
    extra = simulate_strokes({1: ~mito}, pixels_per_class=30, seed=5)[0]
    lab.paint(extra.roi, extra.mask, extra.label)
    g.request(clf, Roi((0, 0, 0), (256, 256, 2)))
    assert g.stats(clf)["voxels_computed"] - before == 256 * 256 * 2
    assert clf.counters["trainings"] == 2
