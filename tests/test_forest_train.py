"""The fast forest trainer builds exactly the trees of sklearn's RandomForestClassifier."""

from __future__ import annotations

import numpy as np
import pytest

from operators.kernels import forest_train
from operators.kernels.forest_cpu import ForestArrays, predict_proba

FIELDS = ("feature", "threshold", "left", "right", "missing_go_left", "leaf_value", "node_offsets", "leaf_offsets")


def _data(n: int, n_features: int, n_classes: int, seed: int, nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    y = np.digitize(X[:, 0] + rng.normal(0, 0.7, n), np.linspace(-1, 1, n_classes - 1)) + 1
    if nan:
        X[rng.random(X.shape) < 0.05] = np.nan
    return X, y


def _same(a: ForestArrays, b: ForestArrays) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert a.n_features == b.n_features


@pytest.mark.parametrize(
    ("n", "n_features", "n_classes", "depth", "seed", "nan"),
    [
        (300, 13, 2, None, 0, False),
        (700, 24, 3, None, 5, False),
        (200, 48, 4, 6, 1, False),
        (150, 5, 2, None, 2, True),  # NaN routing (missing_go_to_left) learnt by sklearn
        (40, 3, 3, 2, 7, False),
    ],
)
def test_fit_equals_sklearn_estimator(n, n_features, n_classes, depth, seed, nan) -> None:
    X, y = _data(n, n_features, n_classes, seed, nan)
    fast = forest_train.fit_random_forest(X, y, n_trees=25, max_depth=depth, seed=seed, n_jobs=2)
    ref = forest_train.fit_random_forest_sklearn(X, y, n_trees=25, max_depth=depth, seed=seed, n_jobs=1)
    _same(fast, ref)


def test_threads_do_not_change_the_forest() -> None:
    X, y = _data(400, 10, 3, 3)
    one = forest_train.fit_random_forest(X, y, n_trees=16, seed=9, n_jobs=1)
    two = forest_train.fit_random_forest(X, y, n_trees=16, seed=9, n_jobs=2)
    _same(one, two)


def test_label_values_become_sorted_classes() -> None:
    X, y = _data(300, 6, 3, 4)
    forest = forest_train.fit_random_forest(X, y * 10, n_trees=8)
    np.testing.assert_array_equal(forest.classes, [10, 20, 30])
    p = predict_proba(forest, X)
    assert p.shape == (300, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_private_api_missing_falls_back_to_public_estimator(monkeypatch) -> None:
    X, y = _data(200, 8, 2, 6)
    expected = forest_train.fit_random_forest(X, y, n_trees=10, seed=1)

    def missing() -> None:
        raise ImportError("no private builder")

    monkeypatch.setattr(forest_train, "_direct_builder", missing)
    _same(forest_train.fit_random_forest(X, y, n_trees=10, seed=1), expected)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0), "need X"),
        (np.zeros((5, 3)), np.zeros(4), "need X"),
        (np.zeros(5), np.zeros(5), "need X"),
    ],
)
def test_bad_shapes(X, y, match) -> None:
    with pytest.raises(ValueError, match=match):
        forest_train.fit_random_forest(X, y)
