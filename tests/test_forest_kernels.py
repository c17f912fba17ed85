"""Tests of the random-forest kernels against sklearn's ``predict_proba``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

from operators.kernels import forest_gpu
from operators.kernels.forest_cpu import (
    ForestArrays,
    forest_arrays_from_sklearn,
    forest_arrays_from_trees,
    predict_proba,
    predict_proba_image,
    round_threshold_down,
)
from operators.kernels.forest_io import load_forest, save_forest

ATOL = 1e-6


def make_data(seed: int, n_classes: int, n: int = 600, n_features: int = 6):
    """Seeded, partly noisy classification data (float32 X, int y)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    score = X[:, 0] + 0.5 * X[:, 1] ** 2 - X[:, 2] * X[:, 3] + 0.3 * rng.normal(size=n)
    edges = np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])
    y = np.searchsorted(edges, score)
    # Quantised feature: many exact ties and thresholds between repeated values.
    X[:, -1] = np.round(X[:, -1] * 4) / 4
    return X, y


def fit(seed: int, n_classes: int, n_estimators: int, max_depth: int | None, **kw):
    X, y = make_data(seed, n_classes)
    clf = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, random_state=seed, **kw).fit(X, y)
    return clf, X


def check_equal(clf, X) -> np.ndarray:
    arrays = forest_arrays_from_sklearn(clf)
    got = predict_proba(arrays, X)
    ref = clf.predict_proba(X)
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    return got


@pytest.mark.parametrize(
    ("seed", "n_classes", "n_estimators", "max_depth"),
    [
        (0, 2, 1, None),
        (1, 2, 100, None),
        (2, 3, 100, 12),
        (3, 4, 10, 3),
        (4, 5, 100, None),
        (5, 5, 1, 20),
    ],
)
def test_matches_sklearn(seed, n_classes, n_estimators, max_depth):
    clf, _ = fit(seed, n_classes, n_estimators, max_depth)
    X_test, _ = make_data(seed + 100, n_classes, n=3000)
    check_equal(clf, X_test)


@pytest.mark.parametrize("block", [1, 7, 512, 10_000])
def test_block_sizes_and_ragged_tail(block):
    clf, _ = fit(6, 3, 20, None)
    X_test, _ = make_data(7, 3, n=1001)
    arrays = forest_arrays_from_sklearn(clf)
    np.testing.assert_allclose(predict_proba(arrays, X_test, block=block), clf.predict_proba(X_test), atol=ATOL)


def test_bootstrap_trees_missing_classes_stay_aligned():
    # Tiny bootstrap samples: many trees never see the rare classes, yet sklearn keeps
    # every class column in every tree; columns must line up with clf.classes_.
    X, y = make_data(8, 5, n=400)
    y = np.where(np.arange(y.size) < 6, 4, np.minimum(y, 3))  # class 4 is rare
    labels = np.array([10, 20, 30, 40, 50])[y]
    clf = RandomForestClassifier(50, max_samples=8, random_state=0).fit(X, labels)
    arrays = forest_arrays_from_sklearn(clf)
    per_tree_max = [
        arrays.leaf_value[arrays.leaf_offsets[t] : arrays.leaf_offsets[t + 1], 4].max() for t in range(arrays.n_trees)
    ]
    assert min(per_tree_max) == 0.0  # some tree really lacked the rare class
    assert list(arrays.classes) == [10, 20, 30, 40, 50]
    check_equal(clf, make_data(9, 5, n=2000)[0])


def test_string_labels_extra_trees_and_float64_input():
    X, y = make_data(10, 3)
    clf = ExtraTreesClassifier(30, random_state=0).fit(X, np.array(["a", "b", "c"])[y])
    X64 = make_data(11, 3, n=2000)[0].astype(np.float64) + 1e-9  # not float32-exact
    check_equal(clf, X64)


def test_single_class_and_stump_only_forest():
    X, _ = make_data(12, 2, n=50)
    clf = RandomForestClassifier(5, random_state=0).fit(X, np.zeros(50, int))
    arrays = forest_arrays_from_sklearn(clf)
    assert arrays.n_nodes == 0 and arrays.n_classes == 1
    np.testing.assert_array_equal(predict_proba(arrays, X), np.ones((50, 1), np.float32))


def test_inputs_exactly_on_and_next_to_thresholds():
    clf, X = fit(13, 3, 30, None)
    rng = np.random.default_rng(0)
    thr, feat = [], []
    for est in clf.estimators_:
        inner = est.tree_.children_left != -1
        thr.append(est.tree_.threshold[inner])
        feat.append(est.tree_.feature[inner])
    thr64, feat = np.concatenate(thr), np.concatenate(feat)
    near = thr64.astype(np.float32)
    cands = np.stack(
        [
            near,
            np.nextafter(near, np.float32(np.inf)),
            np.nextafter(near, np.float32(-np.inf)),
            round_threshold_down(thr64),
        ]
    )
    X_test = np.repeat(X[:200], 4, axis=0)
    for row in range(X_test.shape[0]):
        # Put several features exactly on (or one ulp around) some split threshold.
        for j in rng.choice(thr64.size, size=4, replace=False):
            X_test[row, feat[j]] = cands[rng.integers(4), j]
    check_equal(clf, X_test)


def test_round_threshold_down():
    t = np.array([0.1, 1.0, -0.1, 1e39, -1e39, np.inf, -np.inf, 2.5])
    r = round_threshold_down(t)
    assert r.dtype == np.float32
    assert np.all(r.astype(np.float64) <= t)
    with np.errstate(over="ignore"):
        up = np.nextafter(r, np.float32(np.inf)).astype(np.float64)
    finite = np.isfinite(r)
    assert np.all(up[finite] > t[finite])  # largest float32 <= t
    assert r[3] == np.finfo(np.float32).max and r[4] == -np.inf


def test_nan_inputs_follow_sklearn_missing_value_routing():
    # Documented behaviour: NaN is routed like sklearn (missing_go_to_left per split),
    # both for forests trained with and without missing values.
    clf, _ = fit(14, 3, 40, None)
    X_test, _ = make_data(15, 3, n=1000)
    rng = np.random.default_rng(1)
    X_test[rng.random(X_test.shape) < 0.2] = np.nan
    check_equal(clf, X_test)

    X, y = make_data(16, 3)
    X[rng.random(X.shape) < 0.1] = np.nan
    clf_nan = RandomForestClassifier(40, random_state=0).fit(X, y)
    check_equal(clf_nan, X_test)


def test_nan_in_some_blocks_only():
    # Blocks with NaN take the branchy walk (missing_go_to_left), the others the
    # partition walk: one call mixing both must still equal sklearn everywhere.
    X, y = make_data(21, 3)
    rng = np.random.default_rng(2)
    X[rng.random(X.shape) < 0.05] = np.nan
    clf = RandomForestClassifier(30, random_state=0).fit(X, y)
    X_test, _ = make_data(22, 3, n=1000)
    X_test[[5, 6, 700], [0, 2, 1]] = np.nan  # blocks 0 and 10 of 16 (block=64)
    arrays = forest_arrays_from_sklearn(clf)
    np.testing.assert_allclose(predict_proba(arrays, X_test, block=64), clf.predict_proba(X_test), atol=ATOL)


def test_out_argument_and_image_api():
    clf, _ = fit(17, 4, 10, None)
    arrays = forest_arrays_from_sklearn(clf)
    img = make_data(18, 4, n=6 * 7 * 5)[0].reshape(6, 7, 5, -1)
    proba = predict_proba_image(arrays, img)
    assert proba.shape == (6, 7, 5, 4)
    np.testing.assert_allclose(proba.reshape(-1, 4), clf.predict_proba(img.reshape(-1, img.shape[-1])), atol=ATOL)
    out = np.full((10, 4), -1, np.float32)
    assert predict_proba(arrays, img.reshape(-1, 6)[:10], out=out) is out
    assert predict_proba(arrays, np.empty((0, 6), np.float32)).shape == (0, 4)
    with pytest.raises(ValueError, match="out must be"):
        predict_proba(arrays, img.reshape(-1, 6)[:10], out=np.empty((10, 4)))
    with pytest.raises(ValueError, match=r"shape \(n_samples, 6\)"):
        predict_proba(arrays, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        predict_proba_image(arrays, np.zeros((3, 3, 2)))


def _fake_tree(left, right, value):
    n = len(left)
    return SimpleNamespace(
        children_left=np.array(left),
        children_right=np.array(right),
        feature=np.zeros(n, np.int64),
        threshold=np.zeros(n),
        missing_go_to_left=np.zeros(n, np.uint8),
        value=np.asarray(value, np.float64),
        node_count=n,
    )


def test_from_trees_flattens_several_trees_and_rejects_bad_ones():
    good = _fake_tree([1, -1, -1], [2, -1, -1], [[[2, 2]], [[1, 0]], [[0, 1]]])
    stump = _fake_tree([-1], [-1], [[[3, 1]]])
    arrays = forest_arrays_from_trees([stump, good, good], np.array([0, 1]), 1)
    assert arrays.node_offsets.tolist() == [0, 0, 1, 2] and arrays.leaf_offsets.tolist() == [0, 1, 3, 5]
    assert arrays.left.tolist() == [~1, ~3] and arrays.right.tolist() == [~2, ~4]
    np.testing.assert_allclose(arrays.leaf_value[0], [0.75, 0.25])  # counts normalised
    X = np.array([[-1.0], [1.0]], np.float32)  # left (x <= 0) / right of the split
    expected = [[(0.75 + 1 + 1) / 3, 0.25 / 3], [0.75 / 3, (0.25 + 1 + 1) / 3]]
    np.testing.assert_allclose(predict_proba(arrays, X), expected, atol=1e-7)
    backwards = _fake_tree([-1, 0, -1], [-1, 2, -1], [[[1, 0]], [[1, 1]], [[0, 1]]])
    with pytest.raises(ValueError, match="tree 1: children must follow their parent"):
        forest_arrays_from_trees([good, backwards], np.array([0, 1]), 1)
    with pytest.raises(ValueError, match=r"tree 0 has value shape \(3, 1, 1\)"):
        forest_arrays_from_trees([_fake_tree([1, -1, -1], [2, -1, -1], [[[1]], [[1]], [[1]]])], np.array([0, 1]), 1)


def test_from_sklearn_rejects_bad_models():
    with pytest.raises(ValueError, match="not a fitted"):
        forest_arrays_from_sklearn(RandomForestClassifier())
    X, y = make_data(19, 2, n=100)
    multi = RandomForestClassifier(3, random_state=0).fit(X, np.stack([y, y], axis=1))
    with pytest.raises(ValueError, match="single-output"):
        forest_arrays_from_sklearn(multi)


# ------------------------------------------------------------------------ HDF5 I/O
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, RandomForestClassifier]:
    X, y = make_data(20, 3)
    clf = RandomForestClassifier(25, random_state=0).fit(X, np.array(["bg", "memb", "mito"])[y])
    path = tmp_path_factory.mktemp("forest") / "forest.h5"
    with h5py.File(path, "w") as f:
        save_forest(f.create_group("rf"), forest_arrays_from_sklearn(clf))
    return path, clf


def test_save_load_round_trip_predicts_without_sklearn(saved):
    path, clf = saved
    original = forest_arrays_from_sklearn(clf)
    with h5py.File(path, "r") as f:
        loaded = load_forest(f["rf"])
    for name in (
        "feature",
        "threshold",
        "left",
        "right",
        "missing_go_left",
        "leaf_value",
        "node_offsets",
        "leaf_offsets",
        "classes",
    ):
        a, b = getattr(original, name), getattr(loaded, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert loaded.n_features == original.n_features
    X_test, _ = make_data(21, 3, n=2000)
    np.testing.assert_allclose(predict_proba(loaded, X_test), clf.predict_proba(X_test), atol=ATOL)


def corrupt(path: Path, tmp_path: Path, edit) -> h5py.File:
    """Copy the saved group, apply ``edit(group)``, and return the file open read-only."""
    dst = tmp_path / "bad.h5"
    with h5py.File(path, "r") as src, h5py.File(dst, "w") as f:
        src.copy("rf", f)
        edit(f["rf"])
    return h5py.File(dst, "r")


def _replace(name, fn):
    def edit(g):
        data = g[name][()]
        del g[name]
        g.create_dataset(name, data=fn(data))

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda g: g.__delitem__("threshold"), "'threshold' is missing"),
        (_replace("left", lambda a: a.astype(np.int64)), "'left' has dtype int64"),
        (_replace("leaf_value", lambda a: a.ravel()), "'leaf_value'.*dimension"),
        (_replace("right", lambda a: np.where(np.arange(a.size) == 3, 10**6, a)), "'right'.*out of range"),
        (
            _replace("left", lambda a: np.where(np.arange(a.size) == 2, 2, a).astype(np.int32)),
            "'left'.*out of range",
        ),  # self-loop would never terminate
        (
            _replace("left", lambda a: np.where(np.arange(a.size) == 0, -(10**6), a).astype(np.int32)),
            "'left'.*out of range",
        ),
        (_replace("feature", lambda a: np.where(np.arange(a.size) == 1, 6, a).astype(np.int32)), "'feature'.*outside"),
        (_replace("node_offsets", lambda a: a[:-1]), "'(node|leaf)_offsets'"),
        (_replace("leaf_value", lambda a: a * 2), "'leaf_value'.*\\[0, 1\\]"),
        (lambda g: g.attrs.__setitem__("format_version", 99), "format_version 99"),
        (lambda g: g.attrs.__setitem__("format", "pickle"), "not a 'tda-forest'"),
    ],
    ids=[
        "missing",
        "dtype",
        "ndim",
        "child-range",
        "self-loop",
        "leaf-range",
        "feature-range",
        "offsets",
        "leaf-values",
        "version",
        "format",
    ],
)
def test_corrupted_file_raises(saved, tmp_path, edit, match):
    path, _ = saved
    with corrupt(path, tmp_path, edit) as f, pytest.raises(ValueError, match=match):
        load_forest(f["rf"])


def test_forest_arrays_constructor_validates():
    clf, _ = fit(22, 2, 3, None)
    a = forest_arrays_from_sklearn(clf)
    fields = {
        k: getattr(a, k)
        for k in (
            "feature",
            "threshold",
            "left",
            "right",
            "missing_go_left",
            "leaf_value",
            "node_offsets",
            "leaf_offsets",
            "classes",
            "n_features",
        )
    }
    with pytest.raises(ValueError, match="'threshold'.*float32"):
        ForestArrays(**{**fields, "threshold": fields["threshold"].astype(np.float64)})
    with pytest.raises(ValueError, match="'classes'"):
        ForestArrays(**{**fields, "classes": np.arange(5)})


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not forest_gpu.is_available(), reason="needs cupy and a CUDA device")
def test_gpu_matches_sklearn():  # pragma: no cover - needs a GPU
    import cupy as cp

    clf, _ = fit(23, 4, 50, None)
    X_test, _ = make_data(24, 4, n=5000)
    X_test[::17, 2] = np.nan
    arrays = forest_arrays_from_sklearn(clf)
    dev = forest_gpu.to_device(arrays)
    got = cp.asnumpy(forest_gpu.predict_proba(dev, cp.asarray(X_test)))
    np.testing.assert_allclose(got, clf.predict_proba(X_test), atol=ATOL)
    np.testing.assert_allclose(got, predict_proba(arrays, X_test), atol=ATOL)
