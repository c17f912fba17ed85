"""PixelClassifier: lazy training, per-block training rows, exact forest, no stale tiles."""

import threading

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from operators import ArraySource, ClassifierNotReady, LabelStore, PixelClassifier, Segmentation, Uncertainty
from operators.classifier import train_forest
from tda_graph import Graph, Roi
from tda_graph import testing as kit


def two_region_features(shape=(128, 160), seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(0, 0.3, shape + (4,)).astype(np.float32)
    f[: shape[0] // 2, :, 0] += 1.0
    f[:, : shape[1] // 3, 1] += 1.0
    return f


def build(features, classes=("bg", "fg"), **settings):
    g = Graph(workers=2)
    f = g.add(ArraySource(features, axes="yxc" if features.ndim == 3 else "zyxc"))
    lab = g.add(LabelStore(features.shape[:-1], "yx" if features.ndim == 3 else "zyx", classes))
    clf = g.add(PixelClassifier(class_names=classes, **{"n_trees": 10, **settings}), features=f, labels=lab)
    return g, f, lab, clf


def stroke(lab, y, x, label, n=6):
    lab.paint(Roi((y, x), (y + 1, x + n)), np.ones((1, n), bool), label)


def test_needs_two_classes_clear_state():
    g, f, lab, clf = build(two_region_features())
    with pytest.raises(ClassifierNotReady, match=r"at least two classes.*labelled so far: none"):
        g.request(clf)
    stroke(lab, 10, 10, 2)
    with pytest.raises(ClassifierNotReady, match="labelled so far: fg"):
        g.request(clf, Roi((0, 0, 0), (4, 4, 2)))
    assert clf.state == "untrained"
    stroke(lab, 100, 10, 1)
    p = g.request(clf)
    assert clf.state == "trained" and p.shape == (128, 160, 2)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def test_predictions_equal_sklearn_on_same_training_set():
    feats = two_region_features()
    g, f, lab, clf = build(feats, n_trees=25, seed=3)
    stroke(lab, 10, 5, 2, 40)
    stroke(lab, 100, 60, 1, 40)
    stroke(lab, 90, 5, 1, 30)
    p = g.request(clf)
    dense = lab.to_dense()
    mask = dense > 0
    # same rows in the same order (blocks in sorted order, C order inside a block)
    Xs, ys = [], []
    for r in Roi.full(dense.shape).iter_blocks((64, 64), dense.shape):
        m = mask[r.to_slices()]
        Xs.append(feats[r.to_slices()][m])
        ys.append(dense[r.to_slices()][m].astype(np.int32))
    ref = RandomForestClassifier(n_estimators=25, random_state=3, n_jobs=-1).fit(np.concatenate(Xs), np.concatenate(ys))
    expected = ref.predict_proba(feats.reshape(-1, 4)).reshape(128, 160, 2)
    np.testing.assert_allclose(p, expected, atol=1e-6)


def test_label_change_rebuilds_only_touched_blocks_and_never_features():
    g, f, lab, clf = build(two_region_features((192, 192)))
    stroke(lab, 10, 10, 2)
    stroke(lab, 150, 150, 1)
    stroke(lab, 150, 10, 1)
    g.request(clf, Roi((0, 0, 0), (32, 32, 2)))
    assert clf.counters == {**clf.counters, "trainings": 1, "row_blocks_rebuilt": 3}
    reads = g.stats(f)["voxels_computed"]
    stroke(lab, 12, 10, 2)  # same block (0, 0)
    g.request(clf, Roi((0, 0, 0), (32, 32, 2)))
    assert clf.counters["trainings"] == 2 and clf.counters["row_blocks_rebuilt"] == 4
    # features read again: block (0,0)'s rows for training + the one predicted cache block (whole image)
    assert g.stats(f)["voxels_computed"] - reads == 64 * 64 * 4 + 192 * 192 * 4
    lab.erase(Roi((150, 150), (151, 156)))
    stroke(lab, 150, 100, 1)
    g.request(clf, Roi((0, 0, 0), (32, 32, 2)))
    assert clf.counters["trainings"] == 3 and clf.counters["row_blocks_rebuilt"] == 5
    assert clf.counters["training_samples"] == 24  # 4 strokes of 6 remain (one erased, one added)


def test_training_happens_once_for_many_concurrent_tiles():
    g, f, lab, clf = build(two_region_features((256, 256)))
    stroke(lab, 10, 10, 2)
    stroke(lab, 200, 200, 1)
    barrier = threading.Barrier(8)
    errs = []

    def ask(i):
        barrier.wait()
        try:
            g.request(clf, Roi(((i // 4) * 128, (i % 4) * 64, 0), ((i // 4) * 128 + 64, (i % 4) * 64 + 64, 2)))
        except Exception as e:  # pragma: no cover
            errs.append(e)

    ts = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert not errs and clf.counters["trainings"] == 1


def test_no_stale_tile_after_stroke_during_prediction():
    """A stroke landing while tiles are being predicted never leaves old-forest tiles as current."""
    g, f, lab, clf = build(two_region_features((256, 256)))
    stroke(lab, 10, 10, 2)
    stroke(lab, 200, 200, 1)
    entered, release = threading.Event(), threading.Event()
    orig = clf.compute

    def slow_compute(roi, inputs):
        entered.set()
        release.wait(10)
        return orig(roi, inputs)

    clf.compute = slow_compute
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("p", g.request(clf, Roi((64, 64, 0), (128, 128, 2)))))
    t.start()
    assert entered.wait(10)
    # the stroke flips the meaning: label the top region as class 1 now
    stroke(lab, 12, 10, 1, 60)
    stroke(lab, 14, 10, 1, 60)
    stroke(lab, 202, 200, 2, 40)
    release.set()
    t.join(30)
    clf.compute = orig
    assert g.stats(clf)["stale_discards"] >= 1
    after = g.request(clf)
    np.testing.assert_array_equal(after, g.recompute(clf))
    np.testing.assert_array_equal(box["p"], after[64:128, 64:128])


def test_segmentation_and_uncertainty():
    g, f, lab, clf = build(two_region_features(), classes=("a", "b", "c"))
    seg = g.add(Segmentation(), probabilities=clf)
    unc = g.add(Uncertainty(), probabilities=clf)
    stroke(lab, 10, 100, 2, 30)
    stroke(lab, 100, 100, 1, 30)
    p = g.request(clf)
    assert p.shape[-1] == 3 and (p[..., 2] == 0).all()  # class "c" unlabelled -> probability 0
    s = g.request(seg)
    np.testing.assert_array_equal(s, p.argmax(-1) + 1)
    srt = np.sort(p, -1)
    np.testing.assert_allclose(g.request(unc), 1 - (srt[..., -1] - srt[..., -2]), atol=1e-6)
    assert seg.spec.dtype == np.uint8 and unc.spec.axes == "yx"
    kit.check_roi_equals_full(g, seg, n=4)
    kit.check_roi_equals_full(g, unc, n=4)


def test_mismatched_label_shape_is_rejected():
    from tda_graph import IncompatibleInputError

    g = Graph(workers=1)
    f = g.add(ArraySource(np.zeros((10, 10, 3), np.float32), axes="yxc"))
    lab = g.add(LabelStore((10, 11), "yx"))
    with pytest.raises(IncompatibleInputError, match=r"labels .* do not match the features' spatial shape \(10, 10\)"):
        g.add(PixelClassifier(), features=f, labels=lab)


def test_train_forest_is_deterministic():
    rng = np.random.default_rng(0)
    X = rng.random((200, 5)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(int) + 1
    from operators.classifier import ClassifierSettings

    a = train_forest(X, y, ClassifierSettings(n_trees=5, seed=1))
    b = train_forest(X, y, ClassifierSettings(n_trees=5, seed=1))
    np.testing.assert_array_equal(a.threshold, b.threshold)


def build_with_cached_features(shape=(128, 160)):
    from operators import FeatureFilters

    rng = np.random.default_rng(4)
    img = rng.normal(0, 0.2, shape).astype(np.float32)
    img[: shape[0] // 2] += 1.0
    g = Graph(workers=2)
    src = g.add(ArraySource(img, axes="yx"))
    feats = g.add(FeatureFilters({"GaussianSmoothing": (1.0,), "GaussianGradientMagnitude": (1.0,)}), image=src)
    lab = g.add(LabelStore(shape, "yx", ("bg", "fg")))
    clf = g.add(PixelClassifier(class_names=("bg", "fg"), n_trees=5), features=feats, labels=lab)
    return g, feats, lab, clf


def test_cold_request_through_cached_features_does_not_deadlock():
    """Training pulls feature blocks that the same request needs: it must not wait on itself."""
    g, feats, lab, clf = build_with_cached_features()
    seg = g.add(Segmentation(), probabilities=clf)
    stroke(lab, 10, 10, 2, 30)
    stroke(lab, 100, 10, 1, 30)
    fut = g.request_async(seg)
    s = fut.result(timeout=60)
    assert clf.counters["trainings"] == 1
    assert (s[:64] == 2).mean() > 0.9 and (s[64:] == 1).mean() > 0.9


def test_stroke_between_training_and_claiming_retrains():
    """An edit after prepare() but before blocks are claimed is not served with the old forest."""
    g, feats, lab, clf = build_with_cached_features()
    stroke(lab, 10, 10, 2, 30)
    stroke(lab, 100, 10, 1, 30)
    orig = clf.prepare
    calls = []

    def prepare_then_edit(context):
        orig(context)
        calls.append(1)
        if len(calls) == 1:  # lands after training, before this request claims its blocks
            stroke(lab, 12, 10, 1, 30)

    clf.prepare = prepare_then_edit
    p = g.request(clf)
    clf.prepare = orig
    assert len(calls) == 2 and clf.counters["trainings"] == 2 and clf.state == "trained"
    np.testing.assert_array_equal(p, g.recompute(clf))


def test_feature_selection_change_during_training_gathers_rows_again(monkeypatch):
    # a selection change between two blocks' rows once mixed rows of two widths (a crash in _train)
    import operators.classifier as oc
    from operators import FeatureFilters

    rng = np.random.default_rng(3)
    img = rng.random((96, 160)).astype(np.float32)
    img[:, 80:] += 1.0
    g = Graph(workers=2)
    src = g.add(ArraySource(img, axes="yx"))
    feats = g.add(FeatureFilters({"GaussianSmoothing": [0.7, 1.6]}), image=src)
    lab = g.add(LabelStore(img.shape, "yx", ("bg", "fg")))
    clf = g.add(PixelClassifier(class_names=("bg", "fg"), n_trees=5, row_block=64), features=feats, labels=lab)
    lab.paint(Roi((10, 10), (11, 30)), np.ones((1, 20), bool), 1)  # row block (0, 0)
    lab.paint(Roi((10, 100), (11, 140)), np.ones((1, 40), bool), 2)  # row blocks (0, 1) and (0, 2)
    calls = []
    real = oc.block_roi

    def switching_block_roi(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # after the first block's rows: the user picks another selection
            g.configure(feats, selection={"GaussianSmoothing": [0.7, 1.6, 3.5], "LaplacianOfGaussian": [1.6]})
        return real(*a, **k)

    monkeypatch.setattr(oc, "block_roi", switching_block_roi)
    out = g.request(clf, Roi((0, 0, 0), (96, 160, 2)))
    assert clf.forest.n_features == feats.spec.n_channels == 4
    assert out[5, 5, 0] > 0.5 and out[5, 150, 1] > 0.5
    g.close()


def test_infinite_features_at_labels_are_a_clear_state():
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    img[10:14, 10:20] = np.inf
    g = Graph(workers=1)
    src = g.add(ArraySource(img, axes="yx"))
    from operators import FeatureFilters

    feats = g.add(FeatureFilters({"GaussianSmoothing": [0.7]}), image=src)
    lab = g.add(LabelStore(img.shape, "yx", ("bg", "fg")))
    clf = g.add(PixelClassifier(class_names=("bg", "fg"), n_trees=3), features=feats, labels=lab)
    lab.paint(Roi((11, 11), (12, 15)), np.ones((1, 4), bool), 1)
    lab.paint(Roi((40, 40), (41, 45)), np.ones((1, 5), bool), 2)
    with pytest.raises(ClassifierNotReady, match=r"infinite at \d+ labelled pixel.*erase the labels there"):
        g.request(clf, Roi((0, 0, 0), (8, 8, 2)))
    lab.erase(Roi((11, 11), (12, 15)))
    lab.paint(Roi((50, 11), (51, 15)), np.ones((1, 4), bool), 1)
    assert g.request(clf, Roi((0, 0, 0), (8, 8, 2))).shape == (8, 8, 2)  # usable again
    g.close()
