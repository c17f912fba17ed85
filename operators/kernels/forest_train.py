"""Random-forest training: scikit-learn's trees, without its per-tree Python overhead.

``RandomForestClassifier.fit`` spends about 1 ms of Python per tree (parameter
cloning, validation, target checks) around a tree build that, on the few hundred
to few thousand labelled pixels of interactive work, takes well under 1 ms and
releases the GIL.  For live updates (100 trees retrained after every stroke) that
overhead is most of the latency.

:func:`fit_random_forest` builds *the same trees* with scikit-learn's own Cython
tree builder (same criterion, splitter, bootstrap and per-tree seeds as
``RandomForestClassifier(n_estimators, max_depth=..., random_state=seed)``), calls
it directly from a small thread pool, and flattens the result with
:func:`~operators.kernels.forest_cpu.forest_arrays_from_trees`.  The result is
identical to fitting the public estimator (tested array for array).  If the
private builder API is missing or changed in the installed scikit-learn, it falls
back to the public estimator, with the same result, only slower.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .forest_cpu import ForestArrays, forest_arrays_from_sklearn, forest_arrays_from_trees

__all__ = ["fit_random_forest", "fit_random_forest_sklearn"]

_INT32_MAX = int(np.iinfo(np.int32).max)


def fit_random_forest_sklearn(
    X: np.ndarray, y: np.ndarray, *, n_trees: int = 100, max_depth: int | None = None, seed: int = 0, n_jobs: int = -1
) -> ForestArrays:
    """Fit the public ``RandomForestClassifier`` and flatten it (the reference path)."""
    from sklearn.ensemble import RandomForestClassifier

    clf = RandomForestClassifier(n_estimators=int(n_trees), max_depth=max_depth, random_state=seed, n_jobs=n_jobs)
    clf.fit(X, y)
    return forest_arrays_from_sklearn(clf)


def _n_threads(n_jobs: int | None, n_trees: int) -> int:
    cpus = os.cpu_count() or 1
    if n_jobs is None:
        n = 1
    elif n_jobs < 0:
        n = max(1, cpus + 1 + n_jobs)
    else:
        n = max(1, n_jobs)
    return min(n, n_trees)


def _direct_builder() -> tuple[Any, ...]:
    # Private scikit-learn API (stable from 1.3 to 1.9); any mismatch -> public fallback.
    from sklearn.tree import DecisionTreeClassifier
    from sklearn.tree._criterion import Gini
    from sklearn.tree._splitter import BestSplitter
    from sklearn.tree._tree import DepthFirstTreeBuilder, Tree

    return DecisionTreeClassifier, Gini, BestSplitter, DepthFirstTreeBuilder, Tree


def fit_random_forest(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_trees: int = 100,
    max_depth: int | None = None,
    seed: int = 0,
    n_jobs: int | None = -1,
) -> ForestArrays:
    """Train a random forest exactly like ``RandomForestClassifier(...).fit(X, y)``.

    Parameters
    ----------
    X : array_like, shape (n_samples, n_features)
        Training features (converted to float32, as scikit-learn does).
    y : array_like of int, shape (n_samples,)
        Class labels; the output columns follow ``np.unique(y)``.
    n_trees : int
        Number of trees (``n_estimators``).
    max_depth : int or None
        Maximum tree depth (None: grow until leaves are pure).
    seed : int
        ``random_state`` of the forest.
    n_jobs : int or None
        Threads for tree building (-1: all cores, None: one).

    Returns
    -------
    ForestArrays
        The same arrays as ``forest_arrays_from_sklearn`` of the fitted public estimator.

    Raises
    ------
    ValueError
        On empty input, mismatched lengths, or non-finite features with no NaN support.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"need X (n_samples, n_features) and y (n_samples,), got {X.shape} and {y.shape}")
    if n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    if np.isinf(X).any():
        # the public estimator rejects infinities with its own message; use it
        return fit_random_forest_sklearn(X, y, n_trees=n_trees, max_depth=max_depth, seed=seed, n_jobs=n_jobs or 1)
    try:
        DecisionTreeClassifier, Gini, BestSplitter, DepthFirstTreeBuilder, Tree = _direct_builder()
    except ImportError:
        return fit_random_forest_sklearn(X, y, n_trees=n_trees, max_depth=max_depth, seed=seed, n_jobs=n_jobs or 1)

    n, n_features = X.shape
    classes, y_enc = np.unique(y, return_inverse=True)
    y_fit = np.ascontiguousarray(y_enc.reshape(-1, 1), dtype=np.float64)
    n_classes = np.array([classes.shape[0]], dtype=np.intp)
    missing = DecisionTreeClassifier()._compute_missing_values_in_feature_mask(X)
    max_features = max(1, int(math.sqrt(n_features)))  # max_features="sqrt"
    depth = _INT32_MAX if max_depth is None else int(max_depth)
    # the forest draws one int seed per tree from RandomState(seed), in order
    rs = np.random.RandomState(seed)
    tree_seeds = [int(rs.randint(_INT32_MAX)) for _ in range(int(n_trees))]

    local = threading.local()

    def build(tree_seed: int) -> Any:
        # The forest draws the bootstrap and the splitter's seed each from a fresh
        # RandomState(tree_seed).  Re-seeding one RandomState per thread gives the same
        # streams: constructing one costs ~250 us (mostly under the GIL), re-seeding 3 us,
        # and two per tree were ~50 ms of every 100-tree retrain.
        rs = getattr(local, "rs", None)
        if rs is None:
            rs = local.rs = np.random.RandomState()
        rs.seed(tree_seed)
        idx = rs.randint(0, n, n).astype(np.int32)
        weight = np.bincount(idx, minlength=n).astype(np.float64)
        criterion = Gini(1, n_classes)
        rs.seed(tree_seed)  # the splitter takes its one draw when the build starts
        splitter = BestSplitter(criterion, max_features, 1, 0.0, rs, None)
        tree = Tree(n_features, n_classes, 1)
        DepthFirstTreeBuilder(splitter, 2, 1, 0.0, depth, 0.0).build(tree, X, y_fit, weight, missing)
        return tree

    try:
        threads = _n_threads(n_jobs, int(n_trees))
        if threads == 1:
            trees = [build(s) for s in tree_seeds]
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="tda-forest-fit") as pool:
                trees = list(pool.map(build, tree_seeds))
    except (TypeError, AttributeError):  # private API changed: same result via the public estimator
        return fit_random_forest_sklearn(X, y, n_trees=n_trees, max_depth=max_depth, seed=seed, n_jobs=n_jobs or 1)
    return forest_arrays_from_trees(trees, classes, n_features)
