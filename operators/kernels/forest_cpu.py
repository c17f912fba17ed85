"""Random-forest inference on the CPU without scikit-learn at predict time.

A fitted :class:`sklearn.ensemble.RandomForestClassifier` (or ``ExtraTreesClassifier``)
is flattened once into plain arrays (:class:`ForestArrays`); :func:`predict_proba`
evaluates them with a parallel numba kernel (per block of samples and tree, the
samples go down together: each split partitions the list of those that reached it)
and reproduces sklearn's ``predict_proba`` to
about 1e-7 on float32 inputs, including NaN routing.  On x86-64 CPUs with AVX2 the
partition takes eight samples per step, sixteen with AVX-512 (:mod:`forest_simd`,
bit-identical results).
Forests grown to purity (one-hot leaves, sklearn's default) count integer votes
instead of summing fractions: the same sums, exactly, with counters that stay in L1;
per tree, the class most samples reach is not counted but derived.

Node encoding
-------------
Only *internal* (split) nodes are stored, concatenated over trees in sklearn's own
order (parents always precede their children, so ``child > parent`` and a walk always
terminates).  A child index ``c >= 0`` refers to another internal node (a global
index into the node arrays); ``c < 0`` refers to the leaf ``~c`` (a global row of
``leaf_value``).  A tree that is a single leaf has no internal nodes; its root is
``~leaf_offsets[t]``.

For the GPU walk the nodes are also packed into 16-byte records
``[feature | missing-go-left << 31, threshold bits, left, right]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange, uint64

__all__ = [
    "ForestArrays",
    "FORMAT_VERSION",
    "forest_arrays_from_sklearn",
    "forest_arrays_from_trees",
    "round_threshold_down",
    "predict_proba",
    "predict_proba_image",
    "DEFAULT_BLOCK",
    "auto_block",
    "simd_available",
    "simd_name",
]

#: Version of the array layout (also written to HDF5 by :mod:`forest_io`).
FORMAT_VERSION = 1

#: Most samples per parallel block of the CPU kernel.  Larger blocks spread the
#: per-split costs (stack, the last few samples of each split taken one by one) over
#: more samples; measured on the EPFL viewport (13 features): on Zen 3, 4096 and 16384
#: alike, 1024 about 10 % slower; on Zen 4, 16384 is 20-25 % faster than 4096.
#: :func:`predict_proba` takes smaller blocks when that keeps every thread busy.
DEFAULT_BLOCK = 16384

_MGL_BIT = np.int32(-(2**31))  # sign bit of the packed feature word = missing-go-left


def round_threshold_down(threshold: np.ndarray) -> np.ndarray:
    """Map float64 thresholds to the largest float32 that is ``<=`` each of them.

    WHY: sklearn casts X to float32 and then compares ``x32 <= thr64`` in double.
    For a float32 ``x`` and ``t32 = max{float32 f : f <= thr64}``:
    ``x <= t32`` implies ``x <= thr64`` (as ``t32 <= thr64``), and ``x <= thr64``
    implies ``x <= t32`` (``x`` is itself a float32 ``<= thr64``, and ``t32`` is the
    largest such).  So the float32 comparison gives exactly sklearn's branch, whereas
    plain round-to-nearest could round a midpoint threshold *up* onto the next sample
    value and flip it.

    Parameters
    ----------
    threshold : ndarray of float64
        Thresholds as stored in ``tree_.threshold``.

    Returns
    -------
    ndarray of float32
        Rounded-down thresholds (``+inf``/``-inf`` preserved; values beyond the
        float32 range map to ``+-max float32`` or ``-inf`` as appropriate).
    """
    thr64 = np.asarray(threshold, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        thr32 = thr64.astype(np.float32)
        too_big = thr32.astype(np.float64) > thr64  # rounding went up (or overflowed)
    thr32[too_big] = np.nextafter(thr32[too_big], np.float32(-np.inf))
    return thr32


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"forest dataset {name!r}: {msg}")


def _check_array(name: str, value: Any, dtype: Any, ndim: int) -> None:
    if not isinstance(value, np.ndarray):
        _fail(name, f"expected a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        _fail(name, f"expected dtype {np.dtype(dtype)}, got {value.dtype}")
    if value.ndim != ndim:
        _fail(name, f"expected {ndim} dimension(s), got shape {value.shape}")


def _check_offsets(name: str, offsets: np.ndarray, total: int, strict: bool) -> None:
    if offsets.shape[0] < 2:
        _fail(name, f"needs at least 2 entries (one tree), got shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != total:
        _fail(name, f"must start at 0 and end at {total}, got {offsets[0]}..{offsets[-1]}")
    steps = np.diff(offsets)
    if np.any(steps < 1 if strict else steps < 0):
        kind = "strictly increasing" if strict else "non-decreasing"
        _fail(name, f"must be {kind}")


@dataclass(frozen=True, eq=False)
class ForestArrays:
    """A fitted random-forest classifier as plain, validated arrays.

    Parameters
    ----------
    feature : ndarray of int32, shape (n_nodes,)
        Split feature of every internal node, in ``[0, n_features)``.
    threshold : ndarray of float32, shape (n_nodes,)
        Split threshold, rounded down from sklearn's float64 (see
        :func:`round_threshold_down`); a sample goes left iff ``x <= threshold``.
    left, right : ndarray of int32, shape (n_nodes,)
        Children: ``>= 0`` a global internal-node index greater than the parent's and
        inside the same tree, ``< 0`` the global leaf ``~c`` of the same tree.
    missing_go_left : ndarray of bool, shape (n_nodes,)
        Where a NaN feature value goes (sklearn's ``missing_go_to_left``).
    leaf_value : ndarray of float32, shape (n_leaves, n_classes)
        Class probabilities of each leaf (rows sum to 1).
    node_offsets : ndarray of int64, shape (n_trees + 1,)
        Tree ``t`` owns internal nodes ``node_offsets[t]:node_offsets[t+1]``.
    leaf_offsets : ndarray of int64, shape (n_trees + 1,)
        Tree ``t`` owns leaves ``leaf_offsets[t]:leaf_offsets[t+1]`` (at least one).
    classes : ndarray, shape (n_classes,)
        Class labels in output column order (sklearn's ``classes_``).
    n_features : int
        Number of input features the forest expects.

    Raises
    ------
    ValueError
        If any array has a wrong dtype, shape, or an out-of-range index; the message
        names the offending array (the same name as its HDF5 dataset).
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    missing_go_left: np.ndarray
    leaf_value: np.ndarray
    node_offsets: np.ndarray
    leaf_offsets: np.ndarray
    classes: np.ndarray
    n_features: int
    # Kernel-ready derived data (not part of the stored format).
    _packed: np.ndarray = field(init=False, repr=False)
    _roots: np.ndarray = field(init=False, repr=False)
    _max_tree_nodes: int = field(init=False, repr=False)
    _leaf_class: np.ndarray = field(init=False, repr=False)
    _one_hot: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        # The GPU kernel packs each node into one 16-byte record [feature|mgl<<31, thr
        # bits, left, right]: one memory transaction per step of a walk.
        packed = np.empty((self.n_nodes, 4), dtype=np.int32)
        packed[:, 0] = self.feature | np.where(self.missing_go_left, _MGL_BIT, 0)
        packed[:, 1] = self.threshold.view(np.int32)
        packed[:, 2] = self.left
        packed[:, 3] = self.right
        n_int = np.diff(self.node_offsets)
        roots = np.where(n_int > 0, self.node_offsets[:-1], ~self.leaf_offsets[:-1]).astype(np.int32)
        object.__setattr__(self, "_packed", packed)
        object.__setattr__(self, "_roots", roots)
        # The CPU partition walk keeps a stack of at most one entry per internal node of a tree.
        object.__setattr__(self, "_max_tree_nodes", int(n_int.max(initial=0)))
        # Trees grown to purity (sklearn's default) have one-hot leaves: the kernel then
        # counts votes instead of summing fractions (the same sums, exactly).
        lv = self.leaf_value
        one_hot = bool(np.all((lv == 0.0) | (lv == 1.0)) and np.all(lv.sum(axis=1) == 1.0))
        object.__setattr__(self, "_leaf_class", np.argmax(lv, axis=1).astype(np.int32))
        object.__setattr__(self, "_one_hot", one_hot)

    # ------------------------------------------------------------------ properties
    @property
    def n_trees(self) -> int:
        """Number of trees."""
        return int(self.node_offsets.shape[0] - 1)

    @property
    def n_nodes(self) -> int:
        """Number of internal (split) nodes over all trees."""
        return int(self.feature.shape[0])

    @property
    def n_leaves(self) -> int:
        """Number of leaves over all trees."""
        return int(self.leaf_value.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes (output columns)."""
        return int(self.leaf_value.shape[1])

    @property
    def packed_nodes(self) -> np.ndarray:
        """(n_nodes, 4) int32 records ``[feature | mgl << 31, threshold bits, left, right]``."""
        return self._packed

    @property
    def roots(self) -> np.ndarray:
        """(n_trees,) int32 root reference of each tree (node index, or ``~leaf``)."""
        return self._roots

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _check_array("feature", self.feature, np.int32, 1)
        _check_array("threshold", self.threshold, np.float32, 1)
        _check_array("left", self.left, np.int32, 1)
        _check_array("right", self.right, np.int32, 1)
        _check_array("missing_go_left", self.missing_go_left, np.bool_, 1)
        _check_array("leaf_value", self.leaf_value, np.float32, 2)
        _check_array("node_offsets", self.node_offsets, np.int64, 1)
        _check_array("leaf_offsets", self.leaf_offsets, np.int64, 1)
        if not isinstance(self.classes, np.ndarray) or self.classes.ndim != 1:
            _fail("classes", "expected a 1-d numpy array")
        if isinstance(self.n_features, bool) or not isinstance(self.n_features, (int, np.integer)):
            _fail("n_features", f"expected an int, got {type(self.n_features).__name__}")
        if self.n_features < 1:
            _fail("n_features", f"must be >= 1, got {self.n_features}")

        n_nodes = self.feature.shape[0]
        for name in ("threshold", "left", "right", "missing_go_left"):
            if getattr(self, name).shape[0] != n_nodes:
                _fail(name, f"length {getattr(self, name).shape[0]} != len(feature) {n_nodes}")
        n_leaves, n_classes = self.leaf_value.shape
        if n_classes < 1:
            _fail("leaf_value", "needs at least one class column")
        if self.classes.shape[0] != n_classes:
            _fail("classes", f"length {self.classes.shape[0]} != n_classes {n_classes}")
        if n_nodes >= 2**31 - 1 or n_leaves >= 2**31 - 1:
            _fail("feature", "forest too large for int32 node indices")

        _check_offsets("node_offsets", self.node_offsets, n_nodes, strict=False)
        _check_offsets("leaf_offsets", self.leaf_offsets, n_leaves, strict=True)
        if self.leaf_offsets.shape != self.node_offsets.shape:
            _fail("leaf_offsets", f"shape {self.leaf_offsets.shape} != node_offsets shape {self.node_offsets.shape}")
        # A binary tree has exactly one more leaf than internal nodes.
        if not np.array_equal(np.diff(self.leaf_offsets), np.diff(self.node_offsets) + 1):
            _fail("leaf_offsets", "each tree must have exactly (internal nodes + 1) leaves")

        if n_nodes:
            bad = np.flatnonzero((self.feature < 0) | (self.feature >= self.n_features))
            if bad.size:
                _fail("feature", f"node {bad[0]} has feature {self.feature[bad[0]]}, outside [0, {self.n_features})")
            if np.isnan(self.threshold).any():
                _fail("threshold", "contains NaN")
            tree = np.repeat(np.arange(self.n_trees), np.diff(self.node_offsets))
            node_end = self.node_offsets[1:][tree]
            leaf_lo = self.leaf_offsets[:-1][tree]
            leaf_hi = self.leaf_offsets[1:][tree]
            parent = np.arange(n_nodes)
            for name in ("left", "right"):
                child = getattr(self, name).astype(np.int64)
                is_node = child >= 0
                leaf = ~child
                ok = np.where(
                    is_node,
                    (child > parent) & (child < node_end),
                    (leaf >= leaf_lo) & (leaf < leaf_hi),
                )
                bad = np.flatnonzero(~ok)
                if bad.size:
                    i = bad[0]
                    _fail(
                        name,
                        f"child {child[i]} of node {i} (tree {tree[i]}) is out of "
                        "range (must be a later node of the same tree, or ~leaf of it)",
                    )
        lv = self.leaf_value
        if not np.all(np.isfinite(lv)) or lv.min(initial=0.0) < 0 or lv.max(initial=0.0) > 1:
            _fail("leaf_value", "probabilities must be finite and in [0, 1]")


# ---------------------------------------------------------------------- sklearn
def forest_arrays_from_sklearn(clf: Any) -> ForestArrays:
    """Flatten a fitted sklearn forest classifier into :class:`ForestArrays`.

    Parameters
    ----------
    clf : RandomForestClassifier or ExtraTreesClassifier
        A fitted single-output forest classifier.

    Returns
    -------
    ForestArrays

    Raises
    ------
    ValueError
        If ``clf`` is not fitted, not a forest classifier, or has several outputs.
    """
    estimators = getattr(clf, "estimators_", None)
    if estimators is None or not hasattr(clf, "classes_"):
        raise ValueError(
            f"{type(clf).__name__} is not a fitted forest classifier (no estimators_/classes_); call fit() first"
        )
    if getattr(clf, "n_outputs_", 1) != 1:
        raise ValueError(f"only single-output forests are supported, got n_outputs_={clf.n_outputs_}")
    if len(estimators) == 0:
        raise ValueError("forest has no trees")
    classes = np.asarray(clf.classes_)
    n_classes = int(classes.shape[0])
    trees = []
    for k, est in enumerate(estimators):
        tree = getattr(est, "tree_", None)
        if tree is None:
            raise ValueError(f"estimator {k} has no tree_ (not a fitted decision tree)")
        # sklearn's forest encodes y once and fits every tree on all of it (the
        # bootstrap is done with sample weights), so each tree has all forest classes
        # in the same order, even if its bootstrap sample missed some (they get 0).
        # Anything else would make sklearn's own predict_proba fail, so reject it.
        if est.n_classes_ != n_classes or not np.array_equal(
            np.asarray(est.classes_, dtype=np.float64), np.arange(n_classes)
        ):
            raise ValueError(
                f"tree {k} has classes {est.classes_!r}, expected the forest's encoded classes 0..{n_classes - 1}"
            )
        trees.append(tree)
    return forest_arrays_from_trees(trees, classes, int(clf.n_features_in_))


def forest_arrays_from_trees(trees: Any, classes: np.ndarray, n_features: int) -> ForestArrays:
    """Flatten fitted sklearn ``Tree`` objects (``estimator.tree_``) into :class:`ForestArrays`.

    Parameters
    ----------
    trees : sequence of sklearn.tree._tree.Tree
        Single-output classification trees over the encoded classes ``0..K-1``.
    classes : ndarray, shape (K,)
        Class labels in output column order.
    n_features : int
        Number of input features.

    Returns
    -------
    ForestArrays
    """
    classes = np.asarray(classes)
    n_classes = int(classes.shape[0])
    if len(trees) == 0:
        raise ValueError("forest has no trees")
    # One vectorised pass over all trees' nodes: a per-tree Python loop of numpy calls
    # cost ~15 ms for 100 small trees, in the path of every stroke.
    cls, crs, fts, ths, mgs, vals = [], [], [], [], [], []
    for k, tree in enumerate(trees):
        if tree.value.shape[1] != 1 or tree.value.shape[2] < n_classes:
            raise ValueError(f"tree {k} has value shape {tree.value.shape}, expected (nodes, 1, {n_classes})")
        cls.append(tree.children_left)
        crs.append(tree.children_right)
        fts.append(tree.feature)
        ths.append(tree.threshold)
        mgl = getattr(tree, "missing_go_to_left", None)
        mgs.append(np.zeros(tree.node_count, bool) if mgl is None else mgl)
        vals.append(tree.value[:, 0, :n_classes])
    sizes = np.array([c.shape[0] for c in cls], dtype=np.int64)
    tree_of = np.repeat(np.arange(sizes.size), sizes)
    raw_base = np.concatenate([[0], np.cumsum(sizes)])[:-1][tree_of]  # first raw row of each node's tree
    cl = np.concatenate(cls).astype(np.int64)
    cr = np.concatenate(crs).astype(np.int64)
    is_leaf = cl == -1
    internal = np.flatnonzero(~is_leaf)
    local = internal - raw_base[internal]
    bad = (cl[internal] <= local) | (cr[internal] <= local)
    if bad.any():
        raise ValueError(f"tree {tree_of[internal[np.argmax(bad)]]}: children must follow their parent")
    # Compact renumbering preserves order, and sklearn appends children after their
    # parent, so child > parent still holds afterwards.
    node_id = np.cumsum(~is_leaf) - 1
    leaf_id = np.cumsum(is_leaf) - 1
    glob = np.where(is_leaf, ~leaf_id, node_id)
    value = np.concatenate(vals)[is_leaf].astype(np.float64)
    # Recent sklearn stores fractions already; older stored weighted counts and
    # normalised in predict_proba.  Normalising again is a no-op for fractions.
    norm = value.sum(axis=1, keepdims=True)
    norm[norm == 0.0] = 1.0
    n_int = np.bincount(tree_of[internal], minlength=sizes.size)
    n_leaf = sizes - n_int

    return ForestArrays(
        feature=np.concatenate(fts)[internal].astype(np.int32),
        threshold=round_threshold_down(np.concatenate(ths)[internal]),
        left=glob[cl[internal] + raw_base[internal]].astype(np.int32),
        right=glob[cr[internal] + raw_base[internal]].astype(np.int32),
        missing_go_left=np.concatenate(mgs)[internal].astype(bool),
        leaf_value=np.ascontiguousarray((value / norm).astype(np.float32)),
        node_offsets=np.concatenate([[0], np.cumsum(n_int)]).astype(np.int64),
        leaf_offsets=np.concatenate([[0], np.cumsum(n_leaf)]).astype(np.int64),
        classes=classes,
        n_features=int(n_features),
    )


# ---------------------------------------------------------------------- kernel
@njit(nogil=True, cache=True, inline="always")
def _leaf_votes(
    buf: Any, lo: Any, hi: Any, leaf: int, leaf_class: Any, votes: Any, tally: Any, n_classes: int
) -> None:  # pragma: no cover - compiled
    # One-hot leaves: the samples buf[lo:hi] get one vote for the leaf's class, kept as
    # integers (exactly the float64 sums, but the counters stay in L1).  The last class
    # is derived at the end as trees - the others.  The class ``skip`` (chosen per tree
    # by _tree_votes_start) costs nothing: every sample holds its vote by default
    # (``base``, one counter per block) and samples of the other classes give it back;
    # when ``skip`` is the last class there is nothing to give back.  On an image that
    # is mostly background, background leaves are then free whichever class it is.
    c = np.int64(leaf_class[leaf])
    k = np.int64(n_classes)
    tally[c] += np.int64(hi - lo)
    s = tally[2 * k]
    if c == s:
        return
    km = uint64(n_classes - 1)
    if c != k - 1:
        if s == k - 1:
            for i in range(lo, hi):
                votes[uint64(buf[i]) * km + uint64(c)] += np.int32(1)
        else:
            for i in range(lo, hi):
                j = uint64(buf[i]) * km
                votes[j + uint64(c)] += np.int32(1)
                votes[j + uint64(s)] -= np.int32(1)
    else:
        for i in range(lo, hi):
            votes[uint64(buf[i]) * km + uint64(s)] -= np.int32(1)


@njit(nogil=True, cache=True)
def _tree_votes_start(tally: Any, n_classes: int) -> None:  # pragma: no cover - compiled
    # Before each tree: pick the class whose samples will cost nothing, from how many
    # samples each class got in the tree before (neighbouring trees agree closely).
    # Counting a sample costs one update, or two for a non-last class when ``skip`` is
    # not the last class (its own vote and the skip class's give-back).
    k = n_classes
    n_rest = np.int64(0)
    for c in range(k - 1):
        n_rest += tally[c]
    skip = k - 1
    best = n_rest
    for c in range(k - 1):
        cost = 2 * (n_rest - tally[c]) + tally[k - 1]
        if cost < best:
            best = cost
            skip = c
    for c in range(k):
        tally[c] = 0
    tally[2 * k] = skip
    if skip != k - 1:
        tally[k + skip] += 1


@njit(nogil=True, cache=True, inline="always")
def _leaf_sums(buf: Any, lo: Any, hi: Any, leaf: int, leaf_value: Any, acc: Any) -> None:  # pragma: no cover
    # The samples buf[lo:hi] reached ``leaf``: add its class fractions.
    n_classes = leaf_value.shape[1]
    for c in range(n_classes):
        v = np.float64(leaf_value[leaf, c])
        if v == 0.0:  # adding 0.0 changes no sum
            continue
        for i in range(lo, hi):
            acc[uint64(buf[i]) * uint64(n_classes) + uint64(c)] += v


@njit(nogil=True, cache=True, inline="always")
def _leaf_add(
    buf: Any,
    lo: Any,
    hi: Any,
    leaf: int,
    leaf_value: Any,
    leaf_class: Any,
    vote: bool,
    acc: Any,
    votes: Any,
    tally: Any,
) -> None:  # pragma: no cover - compiled
    # The samples buf[lo:hi] reached ``leaf``: votes for one-hot forests, else fractions.
    if vote:
        _leaf_votes(buf, lo, hi, leaf, leaf_class, votes, tally, leaf_value.shape[1])
    else:
        _leaf_sums(buf, lo, hi, leaf, leaf_value, acc)


@njit(nogil=True, cache=True, inline="always")
def _split_scalar(buf: Any, i: Any, end: Any, Xb: Any, fo: Any, th: Any, lo: Any, hi: Any) -> Any:  # pragma: no cover
    # Branch-free: every index is written to both ends of the output list and only
    # the end it belongs to advances.  Returns the new (lo, hi).
    for k in range(i, end):
        j = buf[k]
        go_left = uint64(Xb[fo + uint64(j)] <= th)
        buf[lo] = j
        buf[hi] = j
        lo += go_left
        hi -= uint64(1) - go_left
    return lo, hi


@njit(nogil=True, cache=True)
def _walk_partition(
    Xb: Any,
    nb: int,
    feature: Any,
    thr: Any,
    left: Any,
    right: Any,
    roots: Any,
    leaf_value: Any,
    leaf_class: Any,
    vote: bool,
    acc: Any,
    votes: Any,
    tally: Any,
    buf: Any,
    st_node: Any,
    st_s: Any,
    st_e: Any,
) -> None:  # pragma: no cover - compiled
    # Tree by tree, the block's samples go down together: each split partitions the
    # list of sample indices that reached it into the left and the right part, a
    # branch-free streaming loop with no chain of dependent loads from one level to the
    # next (a per-sample walk is bound by such chains). ``Xb`` is the block feature-major
    # (``Xb[f * nb + i]``), ``buf`` two index lists of ``nb`` (the parts are written
    # from both ends of the other list), and the stack holds (node, start | list << 31,
    # stop); every index is unsigned, which spares numba's negative-index fix-ups.
    unb = uint64(nb)
    for t in range(roots.shape[0]):
        if vote:
            _tree_votes_start(tally, leaf_value.shape[1])
        for i in range(nb):
            buf[i] = i
        st_node[0] = roots[t]
        st_s[0] = 0
        st_e[0] = nb
        sp = 1
        while sp > 0:
            sp -= 1
            node = st_node[sp]
            s = st_s[sp]
            e = st_e[sp]
            which = uint64(s >> 31)
            s = s & 0x7FFFFFFF
            so = which * unb
            if node < 0:
                _leaf_add(buf, so + uint64(s), so + uint64(e), ~node, leaf_value, leaf_class, vote, acc, votes, tally)
                continue
            do = (uint64(1) - which) * unb
            fo = uint64(feature[node]) * unb
            lo, hi = _split_scalar(
                buf, so + uint64(s), so + uint64(e), Xb, fo, thr[node], do + uint64(s), do + uint64(e - 1)
            )
            sp = _push_children(st_node, st_s, st_e, sp, left[node], right[node], s, np.int64(lo - do), e, which)


@njit(nogil=True, cache=True, inline="always")
def _push_children(
    st_node: Any, st_s: Any, st_e: Any, sp: int, left: int, right: int, s: int, mid: int, e: int, which: Any
) -> int:  # pragma: no cover - compiled
    # Left on top, so it is taken next; an empty part is not pushed.  The children's
    # lists live in the other half of ``buf``.
    flag = np.int64(1 - which) << 31
    if e > mid:
        st_node[sp] = right
        st_s[sp] = mid | flag
        st_e[sp] = e
        sp += 1
    if mid > s:
        st_node[sp] = left
        st_s[sp] = s | flag
        st_e[sp] = mid
        sp += 1
    return sp


@njit(nogil=True, cache=True)
def _walk_branchy(
    X: Any,
    start: int,
    stop: int,
    feature: Any,
    thr: Any,
    left: Any,
    right: Any,
    mgl: Any,
    roots: Any,
    leaf_value: Any,
    acc: Any,
) -> None:  # pragma: no cover - compiled
    # For blocks that contain NaN, which needs sklearn's per-split missing_go_to_left.
    n_classes = leaf_value.shape[1]
    for t in range(roots.shape[0]):
        r = roots[t]
        for i in range(start, stop):
            cur = r
            while cur >= 0:
                x = X[i, feature[cur]]
                if x <= thr[cur]:
                    cur = left[cur]
                elif x != x and mgl[cur]:  # NaN never compares <=
                    cur = left[cur]
                else:
                    cur = right[cur]
            leaf = ~cur
            for c in range(n_classes):
                acc[i - start, c] += leaf_value[leaf, c]


@njit(nogil=True, cache=True)
def _feature_major(X: Any, start: int, stop: int) -> Any:  # pragma: no cover - compiled
    # The block's rows, feature-major (``Xb[f * nb + i]``), and whether any is NaN.
    nb = stop - start
    n_feat = X.shape[1]
    Xb = np.empty(n_feat * nb, np.float32)
    nan = False
    for i in range(nb):
        for f in range(n_feat):
            x = X[start + i, f]
            nan |= x != x
            Xb[f * nb + i] = x
    return Xb, nan


@njit(nogil=True, cache=True)
def _write_block(
    out: Any, start: int, acc: Any, votes: Any, tally: Any, use_votes: bool, n_trees: int
) -> None:  # pragma: no cover - compiled
    # float64 sums (or integer votes, which are the same sums) divided once: summing
    # 100 float32 probabilities in float32 can drift by a few 1e-6; float64 keeps us
    # ~1e-8 from sklearn's float64 average.
    nb, n_classes = acc.shape
    if use_votes:
        km = n_classes - 1
        for i in range(nb):
            rest = n_trees
            for c in range(km):
                v = np.int64(votes[i * km + c]) + tally[n_classes + c]
                rest -= v
                out[start + i, c] = np.float64(v) / n_trees
            out[start + i, km] = np.float64(rest) / n_trees
        return
    for i in range(nb):
        for c in range(n_classes):
            out[start + i, c] = acc[i, c] / n_trees


@njit(nogil=True, cache=True)
def _block_buffers(nb: int, n_classes: int, vote: bool, max_tree_nodes: int) -> Any:  # pragma: no cover
    acc = np.zeros((nb, n_classes), np.float64)
    votes = np.zeros(nb * (n_classes - 1) if vote else 0, np.int32)
    tally = np.zeros(2 * n_classes + 1, np.int64)  # per class: samples in the last tree, base; skip class
    buf = np.empty(2 * nb, np.uint32)
    st_node = np.empty(max_tree_nodes + 2, np.int32)
    st_s = np.empty(max_tree_nodes + 2, np.int64)
    st_e = np.empty(max_tree_nodes + 2, np.int64)
    return acc, votes, tally, buf, st_node, st_s, st_e


@njit(parallel=True, nogil=True, cache=True)
def _predict_kernel(
    X: np.ndarray,
    feature: np.ndarray,
    thr: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    mgl: np.ndarray,
    roots: np.ndarray,
    leaf_value: np.ndarray,
    leaf_class: np.ndarray,
    vote: bool,
    block: int,
    max_tree_nodes: int,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    n = X.shape[0]
    n_classes = leaf_value.shape[1]
    n_blocks = (n + block - 1) // block
    for b in prange(n_blocks):
        start = b * block
        stop = min(n, start + block)
        nb = stop - start
        acc, votes, tally, buf, st_node, st_s, st_e = _block_buffers(nb, n_classes, vote, max_tree_nodes)
        Xb, nan = _feature_major(X, start, stop)
        if nan:
            _walk_branchy(X, start, stop, feature, thr, left, right, mgl, roots, leaf_value, acc)
            _write_block(out, start, acc, votes, tally, False, roots.shape[0])
            continue
        _walk_partition(
            Xb, nb, feature, thr, left, right, roots, leaf_value, leaf_class, vote, acc.reshape(-1), votes, tally,
            buf, st_node, st_s, st_e,
        )  # fmt: skip
        _write_block(out, start, acc, votes, tally, vote, roots.shape[0])


def simd_available() -> bool:
    """Whether :func:`predict_proba` can use its SIMD kernel on this machine.

    Returns
    -------
    bool
        True on x86-64 CPUs with AVX2 when numba targets the host CPU.
    """
    from .simd_x86 import avx2_available

    return avx2_available()


def simd_name() -> str:
    """The instruction set the SIMD kernel's partition steps use here, for reports.

    Returns
    -------
    str
        ``"AVX-512"``, ``"AVX2"``, or ``"none"`` (the scalar kernel is used).
    """
    from .simd_x86 import avx512_available

    if not simd_available():
        return "none"
    return "AVX-512" if avx512_available() else "AVX2"


def auto_block(n_samples: int) -> int:
    """The block size :func:`predict_proba` uses by default for ``n_samples`` rows.

    :data:`DEFAULT_BLOCK`, or less when that would leave some of numba's threads
    without a block (two blocks per thread, so that uneven blocks even out).

    Parameters
    ----------
    n_samples : int
        Rows to predict.

    Returns
    -------
    int
        At least 1.
    """
    from numba import get_num_threads

    per_thread = -(-int(n_samples) // (2 * get_num_threads()))
    return max(1, min(DEFAULT_BLOCK, per_thread))


def predict_proba(
    arrays: ForestArrays,
    X: np.ndarray,
    *,
    out: np.ndarray | None = None,
    block: int | None = None,
    simd: bool | None = None,
) -> np.ndarray:
    """Class probabilities of a forest, equal to sklearn's ``predict_proba``.

    Parameters
    ----------
    arrays : ForestArrays
        The forest.
    X : array_like, shape (n_samples, n_features)
        Feature rows.  Converted to C-contiguous float32 (a copy if needed), exactly
        as sklearn does before predicting, so results agree for any input dtype.
        NaN values are routed like sklearn (``missing_go_left`` of each split);
        ``+-inf`` compare as ordinary numbers.
    out : ndarray of float32, shape (n_samples, n_classes), optional
        C-contiguous array to write into.
    block : int, optional
        Samples per parallel block (tuning knob); default :func:`auto_block`.
    simd : bool, optional
        Use the SIMD kernel (:mod:`forest_simd`: AVX2, and AVX-512 where the CPU has
        it).  ``None`` (default): where :func:`simd_available`; ``True``: require it;
        ``False``: the scalar kernel.  All give bit-identical results.

    Returns
    -------
    ndarray of float32, shape (n_samples, n_classes)
        Columns follow ``arrays.classes``.  Within ~1e-7 of sklearn's float64 result.

    Raises
    ------
    ValueError
        On wrong shapes or an unusable ``out``, or ``simd=True`` without AVX2.
    """
    if not isinstance(arrays, ForestArrays):
        raise ValueError(f"arrays must be ForestArrays, got {type(arrays).__name__}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != arrays.n_features:
        raise ValueError(f"X must have shape (n_samples, {arrays.n_features}), got {X.shape}")
    shape = (X.shape[0], arrays.n_classes)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif (
        not isinstance(out, np.ndarray)
        or out.shape != shape
        or out.dtype != np.float32
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {shape}")
    if block is None:
        block = auto_block(X.shape[0])
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    block = min(int(block), 1 << 30)  # the partition walk keeps list positions in 31 bits
    if simd and not simd_available():
        raise ValueError("simd=True needs an x86-64 CPU with AVX2 (and numba targeting the host CPU)")
    if X.shape[0] == 0:
        return out
    args = (
        X,
        arrays.feature,
        arrays.threshold,
        arrays.left,
        arrays.right,
        arrays.missing_go_left,
        arrays.roots,
        arrays.leaf_value,
        arrays._leaf_class,
        arrays._one_hot,
        int(block),
        arrays._max_tree_nodes,
        out,
    )
    if simd is None:
        simd = simd_available()
    if simd:
        from .forest_simd import LEFT_PACK, predict_kernel_simd

        predict_kernel_simd(*args, LEFT_PACK)
    else:
        _predict_kernel(*args)
    return out


def predict_proba_image(arrays: ForestArrays, features: np.ndarray, **kwargs: Any) -> np.ndarray:
    """:func:`predict_proba` for feature images of shape ``(..., n_features)``.

    Parameters
    ----------
    arrays : ForestArrays
        The forest.
    features : array_like, shape (..., n_features)
        Per-pixel feature vectors, channel last.
    **kwargs
        Passed to :func:`predict_proba` (``block``).

    Returns
    -------
    ndarray of float32, shape (..., n_classes)
    """
    features = np.asarray(features)
    if features.ndim < 1 or features.shape[-1] != arrays.n_features:
        raise ValueError(f"features must have shape (..., {arrays.n_features}), got {features.shape}")
    lead = features.shape[:-1]
    proba = predict_proba(arrays, features.reshape(-1, arrays.n_features), **kwargs)
    return proba.reshape(*lead, arrays.n_classes)
