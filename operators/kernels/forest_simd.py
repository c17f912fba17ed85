"""The SIMD variant of :mod:`operators.kernels.forest_cpu`'s partition walk.

Sixteen samples per partition step (one AVX-512 step, or two AVX2 steps on CPUs without
AVX-512: :func:`operators.kernels.simd_x86.partition16`), then eight, then one
(:func:`_split_simd`).
Imported by :func:`operators.kernels.forest_cpu.predict_proba` only where
:func:`operators.kernels.simd_x86.avx2_available` is true: compiling these kernels for a
CPU without AVX2 fails.  Same comparisons and the same summation order as the scalar
kernel, so the results are bit-identical to it (``tests/test_forest_simd.py``).

numba's on-disk cache keys on the text of this file alone (numba 0.68 hashes it), not on
the helpers the kernel inlines from ``forest_cpu.py`` and ``simd_x86.py``.
:data:`HELPERS_SHA256` records their hash: when either changes, ``tests/test_forest_simd.py``
fails until the line is updated, and the changed line makes numba rebuild the cached kernel,
in a checkout and after an upgrade alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange, uint64

from .forest_cpu import (
    _block_buffers,
    _feature_major,
    _leaf_add,
    _push_children,
    _split_scalar,
    _tree_votes_start,
    _walk_branchy,
    _write_block,
)
from .simd_x86 import left_pack_table, partition8, partition8_iota, partition16, partition16_iota

__all__ = ["predict_kernel_simd", "LEFT_PACK"]

#: The permutation table the kernel's partition steps read (simd_x86.left_pack_table).
LEFT_PACK = left_pack_table()

#: sha256 of forest_cpu.py followed by simd_x86.py (see the module docstring).
HELPERS_SHA256 = "eeaef1d6b21ea6621928fbb7d245306154a85de619108d96432a639d783fe3bf"


@njit(nogil=True, cache=True, inline="always")
def _split_simd(
    buf: Any, i: Any, end: Any, Xb: Any, fo: Any, th: Any, lo: Any, hi: Any, lut: Any, root: bool
) -> Any:  # pragma: no cover - compiled
    # One split of buf[i:end] into the output list lo..hi: sixteen indices per step
    # (simd_x86.partition16) while at least 32 free slots remain between its two ends,
    # eight (partition8) while 16 remain, then one by one.  ``root`` (a constant at each
    # call, so the other branch compiles away): the indices are i..end-1 themselves, a
    # tree's root, whose list is never written and whose values are contiguous loads.
    step = uint64(8)
    step16 = uint64(16)
    while i + uint64(32) <= end:
        if root:
            n_left = partition16_iota(buf, i, Xb, fo, th, lo, hi, lut)
        else:
            n_left = partition16(buf, i, Xb, fo, th, lo, hi, lut)
        lo += n_left
        hi -= step16 - n_left
        i += step16
    while i + uint64(16) <= end:
        if root:
            n_left = partition8_iota(buf, i, Xb, fo, th, lo, hi, lut)
        else:
            n_left = partition8(buf, i, Xb, fo, th, lo, hi, lut)
        lo += n_left
        hi -= step - n_left
        i += step
    if not root:
        return _split_scalar(buf, i, end, Xb, fo, th, lo, hi)
    while i < end:
        go_left = uint64(Xb[fo + i] <= th)
        buf[lo] = np.uint32(i)
        buf[hi] = np.uint32(i)
        lo += go_left
        hi -= uint64(1) - go_left
        i += uint64(1)
    return lo, hi


@njit(nogil=True, cache=True)
def _walk_partition_simd(
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
    lut: Any,
) -> None:  # pragma: no cover - compiled
    # :func:`_walk_partition` with the SIMD split (:func:`_split_simd`).
    unb = uint64(nb)
    for t in range(roots.shape[0]):
        if vote:
            _tree_votes_start(tally, leaf_value.shape[1])
        root = roots[t]
        if root < 0:  # a tree that is a single leaf
            for i in range(nb):
                buf[i] = i
            _leaf_add(buf, uint64(0), unb, ~root, leaf_value, leaf_class, vote, acc, votes, tally)
            continue
        fo = uint64(feature[root]) * unb
        lo, hi = _split_simd(buf, uint64(0), unb, Xb, fo, thr[root], unb, unb + unb - uint64(1), lut, True)
        sp = _push_children(st_node, st_s, st_e, 0, left[root], right[root], 0, np.int64(lo - unb), nb, 0)
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
            lo, hi = _split_simd(
                buf, so + uint64(s), so + uint64(e), Xb, fo, thr[node], do + uint64(s), do + uint64(e - 1), lut, False
            )
            sp = _push_children(st_node, st_s, st_e, sp, left[node], right[node], s, np.int64(lo - do), e, which)


# The block loop repeats forest_cpu._predict_kernel's with another walk: passing the walk
# as an argument instead makes numba compile the kernel anew in every process (no cache
# for functions taking functions), and the scalar build must not contain this walk.
@njit(parallel=True, nogil=True, cache=True)
def predict_kernel_simd(
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
    lut: np.ndarray,
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
        _walk_partition_simd(
            Xb, nb, feature, thr, left, right, roots, leaf_value, leaf_class, vote, acc.reshape(-1), votes, tally,
            buf, st_node, st_s, st_e, lut,
        )  # fmt: skip
        _write_block(out, start, acc, votes, tally, vote, roots.shape[0])
