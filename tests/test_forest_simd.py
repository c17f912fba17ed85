"""The SIMD forest kernel (AVX2 / AVX-512) and the vote counting give exactly the scalar kernel's results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

from operators.kernels import forest_cpu, simd_x86
from operators.kernels.forest_cpu import forest_arrays_from_sklearn, predict_proba, simd_available

needs_avx2 = pytest.mark.skipif(not simd_available(), reason="needs an x86-64 CPU with AVX2")


def make_data(seed: int, n_classes: int, n: int, n_features: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    score = X[:, 0] - 0.7 * X[:, 1] ** 2 + X[:, 2] * X[:, 3] + 0.4 * rng.normal(size=n)
    edges = np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])
    X[:, -1] = np.round(X[:, -1] * 3) / 3  # ties, and inputs exactly on thresholds
    return X, np.searchsorted(edges, score)


def with_votes(arrays: forest_cpu.ForestArrays, on: bool) -> forest_cpu.ForestArrays:
    # The same forest with vote counting switched on or off (a derived kernel flag).
    copy = forest_cpu.ForestArrays(
        **{f: getattr(arrays, f) for f in forest_cpu.ForestArrays.__dataclass_fields__ if not f.startswith("_")}
    )
    object.__setattr__(copy, "_one_hot", on)
    return copy


FORESTS = [
    # (seed, classes, trees, max_depth, estimator): grown to purity -> one-hot leaves
    (0, 2, 50, None, RandomForestClassifier),
    (1, 3, 30, None, RandomForestClassifier),
    (2, 5, 20, None, ExtraTreesClassifier),
    # depth-limited -> fractional leaves, the float64 sums
    (3, 2, 40, 4, RandomForestClassifier),
    (4, 4, 25, 7, RandomForestClassifier),
]


@needs_avx2
@pytest.mark.parametrize(("seed", "n_classes", "trees", "depth", "cls"), FORESTS)
# 16-31 samples take eight-lane steps only, 32 and more sixteen-lane steps too
@pytest.mark.parametrize("block", [1, 15, 16, 17, 23, 31, 32, 33, 47, 64, 4096])
def test_simd_kernel_is_bit_identical_to_the_scalar_kernel(seed, n_classes, trees, depth, cls, block):
    X, y = make_data(seed, n_classes, 700)
    clf = cls(n_estimators=trees, max_depth=depth, random_state=seed).fit(X, y)
    arrays = forest_arrays_from_sklearn(clf)
    assert arrays._one_hot == (depth is None)
    X_test = make_data(seed + 50, n_classes, 2999)[0]
    X_test[::97] = X[: X_test[::97].shape[0]]  # training rows: inputs land on leaf boundaries
    simd = predict_proba(arrays, X_test, block=block, simd=True)
    scalar = predict_proba(arrays, X_test, block=block, simd=False)
    np.testing.assert_array_equal(simd, scalar)
    np.testing.assert_allclose(simd, clf.predict_proba(X_test), rtol=0, atol=1e-6)


@needs_avx2
def test_simd_kernel_with_nan_blocks_single_leaf_trees_and_one_class():
    X, y = make_data(5, 3, 300)
    # Bootstraps of 3 samples: some trees see one class and are a single leaf.
    clf = RandomForestClassifier(60, max_samples=3, random_state=0).fit(X, y)
    arrays = forest_arrays_from_sklearn(clf)
    assert (arrays.roots < 0).any() and (arrays.roots >= 0).any()
    X_test = make_data(6, 3, 1000)[0]
    X_test[500, 2] = np.nan  # one block of 64 takes the NaN walk
    simd = predict_proba(arrays, X_test, block=64, simd=True)
    np.testing.assert_array_equal(simd, predict_proba(arrays, X_test, block=64, simd=False))
    np.testing.assert_allclose(simd, clf.predict_proba(X_test), atol=1e-6)
    one = RandomForestClassifier(4, random_state=0).fit(X, np.zeros(300, int))
    np.testing.assert_array_equal(predict_proba(forest_arrays_from_sklearn(one), X_test, simd=True), 1.0)


@pytest.mark.parametrize(("seed", "n_classes", "trees", "depth", "cls"), FORESTS[:3])
def test_votes_equal_the_float64_sums_exactly(seed, n_classes, trees, depth, cls):
    X, y = make_data(seed, n_classes, 500)
    arrays = forest_arrays_from_sklearn(cls(n_estimators=trees, max_depth=depth, random_state=seed).fit(X, y))
    X_test = make_data(seed + 9, n_classes, 1500)[0]
    for simd in [False, True] if simd_available() else [False]:
        votes = predict_proba(with_votes(arrays, True), X_test, simd=simd)
        sums = predict_proba(with_votes(arrays, False), X_test, simd=simd)
        np.testing.assert_array_equal(votes, sums)


@pytest.mark.parametrize("n_classes", [2, 3, 4])
@pytest.mark.parametrize("block", [64, 4096])
def test_votes_are_exact_whichever_class_the_trees_skip(n_classes, block):
    # Mostly one class per block of rows (an image that is mostly background, or
    # mostly one organelle): the kernel stops counting that class's votes and derives
    # them, each class in turn, including the 2-update path of a non-last skip class.
    X, y = make_data(11, n_classes, 900)
    clf = RandomForestClassifier(30, random_state=1).fit(X, y)
    arrays = forest_arrays_from_sklearn(clf)
    rows = [X[y == c][np.random.default_rng(c).integers(0, (y == c).sum(), 4096)] for c in range(n_classes)]
    X_test = np.concatenate(rows + [make_data(12, n_classes, 777)[0]])
    sums = predict_proba(with_votes(arrays, False), X_test, block=block, simd=False)
    np.testing.assert_allclose(sums, clf.predict_proba(X_test), atol=1e-6)
    for simd in [False, True] if simd_available() else [False]:
        np.testing.assert_array_equal(predict_proba(arrays, X_test, block=block, simd=simd), sums)


@pytest.mark.parametrize(
    ("last_tree", "skip"),
    [
        ([0, 0], 1),  # the first tree: nothing known, the last class (free anyway)
        ([90, 10], 0),  # two classes: skip the one most samples reach
        ([10, 90], 1),
        ([50, 50], 1),  # a tie keeps the last class
        ([80, 10, 10], 0),  # cost 2*10 + 10 = 30 < 90
        ([45, 45, 10], 2),  # cost 2*45 + 10 = 100 > 90: keep the last class
        ([10, 70, 20], 1),
    ],
)
def test_each_tree_skips_the_class_that_saves_most_vote_updates(last_tree, skip):
    k = len(last_tree)
    tally = np.zeros(2 * k + 1, np.int64)
    tally[:k] = last_tree
    forest_cpu._tree_votes_start(tally, k)
    assert tally[2 * k] == skip
    assert list(tally[:k]) == [0] * k  # counting starts afresh for the next tree
    base = [0] * k
    if skip != k - 1:
        base[skip] = 1  # every sample holds this tree's vote until it gives it back
    assert list(tally[k : 2 * k]) == base


def test_fractional_leaves_are_not_counted_as_votes():
    X, y = make_data(7, 2, 400)
    arrays = forest_arrays_from_sklearn(RandomForestClassifier(10, max_depth=2, random_state=0).fit(X, y))
    assert not arrays._one_hot


def test_simd_true_without_avx2_is_a_clear_error(monkeypatch):
    X, y = make_data(8, 2, 200)
    arrays = forest_arrays_from_sklearn(RandomForestClassifier(5, random_state=0).fit(X, y))
    monkeypatch.setattr(forest_cpu, "simd_available", lambda: False)
    with pytest.raises(ValueError, match="simd=True needs an x86-64 CPU with AVX2"):
        predict_proba(arrays, X, simd=True)
    # the default then takes the scalar kernel
    np.testing.assert_array_equal(predict_proba(arrays, X), predict_proba(arrays, X, simd=False))


def test_avx2_is_not_used_for_a_portable_numba_target(monkeypatch):
    import numba

    simd_x86.avx2_available.cache_clear()
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    try:
        assert simd_x86.avx2_available() is False
        monkeypatch.setattr(numba.config, "CPU_NAME", None)
        monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
        simd_x86.avx2_available.cache_clear()
        assert simd_x86.avx2_available() is False
    finally:
        simd_x86.avx2_available.cache_clear()


def test_left_pack_table_rows_are_permutations_that_keep_lane_order():
    table = simd_x86.left_pack_table()
    assert table.shape == (256, 16) and table.dtype == np.int32
    for m in range(256):
        left = [k for k in range(8) if m >> k & 1]
        right = [k for k in range(8) if not m >> k & 1]
        assert list(table[m, : len(left)]) == left
        # stored at the top end of the list, which grows downwards: first right-goer last
        assert list(table[m, 16 - len(right) :][::-1]) == right


def _reference_partition(idx: np.ndarray, x: np.ndarray, th: np.float32) -> tuple[list, list]:
    go = x[idx] <= th
    return list(idx[go]), list(idx[~go])


@needs_avx2
@pytest.mark.parametrize("seed", range(6))
def test_partition_steps_append_left_goers_upwards_and_right_goers_downwards(seed):
    from numba import njit, uint64

    @njit
    def run(buf, n, xb, th, lut, wide):
        # partition buf[0:n] into buf[n:2n] with 16-, then 8-lane steps, then scalar
        lo = uint64(n)
        hi = uint64(2 * n - 1)
        i = uint64(0)
        while wide and i + uint64(32) <= uint64(n):
            k = simd_x86.partition16(buf, i, xb, uint64(0), th, lo, hi, lut)
            lo += k
            hi -= uint64(16) - k
            i += uint64(16)
        while i + uint64(16) <= uint64(n):
            k = simd_x86.partition8(buf, i, xb, uint64(0), th, lo, hi, lut)
            lo += k
            hi -= uint64(8) - k
            i += uint64(8)
        while i < uint64(n):
            if xb[buf[i]] <= th:
                buf[lo] = buf[i]
                lo += uint64(1)
            else:
                buf[hi] = buf[i]
                hi -= uint64(1)
            i += uint64(1)
        return lo - uint64(n)

    rng = np.random.default_rng(seed)
    n = int(rng.integers(32, 300))
    xb = np.round(rng.normal(size=500) * 4).astype(np.float32) / 4  # ties with the threshold
    idx = rng.choice(500, n, replace=False).astype(np.uint32)
    th = np.float32(rng.choice(xb))
    want_left, want_right = _reference_partition(idx, xb, th)
    lut = simd_x86.left_pack_table()
    for wide in (True, False):
        buf = np.concatenate([idx, np.full(n, 7777, np.uint32)])
        n_left = run(buf, n, xb, th, lut, wide)
        assert n_left == len(want_left)
        assert list(buf[n : n + n_left]) == want_left  # in input order
        assert list(buf[n + n_left :][::-1]) == want_right  # first right-goer at the top
        assert list(buf[:n]) == list(idx)  # the input list is not written


def test_auto_block_keeps_every_thread_busy(monkeypatch):
    import numba

    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    assert forest_cpu.auto_block(262_144) == forest_cpu.DEFAULT_BLOCK  # a 512x512 viewport: 16 blocks
    assert forest_cpu.auto_block(20_000) == 5000  # two blocks per thread
    assert forest_cpu.auto_block(3) == 1
    assert forest_cpu.auto_block(0) == 1


def test_simd_name_says_what_the_kernel_uses(monkeypatch):
    expected = "none"
    if simd_available():
        expected = "AVX-512" if simd_x86.avx512_available() else "AVX2"
    assert forest_cpu.simd_name() == expected
    monkeypatch.setattr(forest_cpu, "simd_available", lambda: False)
    assert forest_cpu.simd_name() == "none"


def test_simd_follows_the_cpu_features_numba_compiles_for(monkeypatch):
    import numba

    def clear():
        simd_x86.avx2_available.cache_clear()
        simd_x86.avx512_available.cache_clear()

    on_x86 = simd_x86.platform.machine().lower() in ("x86_64", "amd64") and not numba.config.DISABLE_JIT
    try:
        for features, avx2, avx512 in [
            ("+avx2,+fma,-avx512f", True, False),
            ("+avx2,+avx512f,+avx512vl", True, True),
            ("-avx2,+sse4.2", False, False),  # a portable build: no vpermd, the scalar kernel
        ]:
            clear()
            monkeypatch.setattr(numba.config, "CPU_NAME", None)
            monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
            assert simd_x86.avx2_available() is (avx2 and on_x86)
            assert simd_x86.avx512_available() is (avx512 and on_x86)
    finally:
        clear()


@pytest.mark.skipif(not simd_x86.avx512_available(), reason="needs a CPU with AVX-512 (the other build runs here)")
def test_the_build_without_avx512_is_bit_identical_too(tmp_path):
    # On this AVX-512 machine the kernel compiles to sixteen-lane steps; compile it once
    # more for the same CPU without AVX-512 (two AVX2 steps instead), in a fresh process
    # with its own numba cache, and compare with the scalar kernel and sklearn there.
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    for name in list(features):
        if name.startswith("avx512"):
            features[name] = False
    script = textwrap.dedent(
        """
        import numpy as np
        from sklearn.ensemble import RandomForestClassifier
        from operators.kernels import forest_cpu, simd_x86
        assert simd_x86.avx2_available() and not simd_x86.avx512_available()
        rng = np.random.default_rng(0)
        X = rng.normal(size=(800, 6)).astype(np.float32)
        y = (X[:, 0] + X[:, 1] ** 2 > 0.5).astype(int) + 2 * (X[:, 2] > 1)
        clf = RandomForestClassifier(20, random_state=0).fit(X, y)
        arrays = forest_cpu.forest_arrays_from_sklearn(clf)
        Xt = rng.normal(size=(3001, 6)).astype(np.float32)
        for block in (33, 64, 3001):
            simd = forest_cpu.predict_proba(arrays, Xt, block=block, simd=True)
            assert np.array_equal(simd, forest_cpu.predict_proba(arrays, Xt, block=block, simd=False))
            assert np.abs(simd - clf.predict_proba(Xt)).max() < 1e-6
        print("AVX2 build ok")
        """
    )
    env = dict(os.environ, NUMBA_CPU_FEATURES=features.flatten(), NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "AVX2 build ok" in res.stdout


def test_the_simd_module_records_the_helpers_its_cached_kernel_inlines():
    # numba rebuilds a cached kernel only when the text of its own file changes
    import hashlib
    import re

    kernels = Path(forest_cpu.__file__).parent
    digest = hashlib.sha256()
    for name in ("forest_cpu.py", "simd_x86.py"):
        digest.update((kernels / name).read_bytes().replace(b"\r\n", b"\n"))  # as git checks it out anywhere
    recorded = re.search(r'^HELPERS_SHA256 = "(.*)"$', (kernels / "forest_simd.py").read_text(), re.M)
    assert recorded is not None
    assert recorded.group(1) == digest.hexdigest(), (
        f'forest_cpu.py or simd_x86.py changed: set HELPERS_SHA256 = "{digest.hexdigest()}" in forest_simd.py'
    )
