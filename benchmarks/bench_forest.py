"""Benchmark: numba forest kernel vs sklearn ``predict_proba`` on EM-like pixel data.

Usage::

    python benchmarks/bench_forest.py [--quick] [--depth N] [--trees N] [--block N]

A synthetic electron-microscopy-like image (Voronoi cells with dark membranes and
blob "mitochondria", blurred, noisy) is turned into 48 filter-bank features per pixel
(8 filters x 6 scales); a ``RandomForestClassifier`` is trained on 10k labelled pixels
and then both implementations predict every pixel (1024 x 1024 = 1M by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from operators.kernels.forest_cpu import (  # noqa: E402
    auto_block,
    forest_arrays_from_sklearn,
    predict_proba,
    simd_available,
    simd_name,
)

SCALES = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)


def synthetic_em(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return an EM-like float32 image and its labels (0 cytoplasm, 1 membrane, 2 mito)."""
    rng = np.random.default_rng(seed)
    n_cells = max(8, size * size // 3500)
    seeds = rng.uniform(0, size, size=(n_cells, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    pts = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    dist, _ = cKDTree(seeds).query(pts, k=2)
    membrane = ((dist[:, 1] - dist[:, 0]) < 2.5).reshape(size, size)
    labels = np.zeros((size, size), np.int64)
    mito = np.zeros((size, size), bool)
    for _ in range(max(4, n_cells // 2)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(4, 14, 2)
        mito |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    mito &= ~membrane
    labels[membrane] = 1
    labels[mito] = 2
    img = np.full((size, size), 0.65)
    img += 0.05 * ndi.gaussian_filter(rng.normal(size=(size, size)), 3.0) * 10
    img[membrane] = 0.15
    img[mito] = 0.35 + 0.1 * np.sin(xx[mito] * 0.9)
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 0.08, size=(size, size))
    return img.astype(np.float32), labels


def features(img: np.ndarray) -> np.ndarray:
    """48 filter responses per pixel: (H, W, 48) float32."""
    out = []
    for s in SCALES:
        g = ndi.gaussian_filter(img, s)
        gy = ndi.gaussian_filter(img, s, order=(1, 0))
        gx = ndi.gaussian_filter(img, s, order=(0, 1))
        hyy = ndi.gaussian_filter(img, s, order=(2, 0))
        hxx = ndi.gaussian_filter(img, s, order=(0, 2))
        hxy = ndi.gaussian_filter(img, s, order=(1, 1))
        root = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
        syy = ndi.gaussian_filter(gy * gy, 2 * s)
        sxx = ndi.gaussian_filter(gx * gx, 2 * s)
        sxy = ndi.gaussian_filter(gx * gy, 2 * s)
        sroot = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
        out += [
            g,
            np.hypot(gx, gy),
            hxx + hyy,
            (hxx + hyy) / 2 + root,
            (hxx + hyy) / 2 - root,
            (sxx + syy) / 2 + sroot,
            (sxx + syy) / 2 - sroot,
            g - ndi.gaussian_filter(img, 1.6 * s),
        ]
    return np.stack(out, axis=-1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256x256 image, 20 trees")
    ap.add_argument("--depth", type=int, default=None, help="max_depth (default unlimited)")
    ap.add_argument("--trees", type=int, default=None, help="n_estimators (default 100)")
    ap.add_argument("--block", type=int, default=None, help="kernel block size (default: auto_block)")
    ap.add_argument(
        "--label-noise", type=float, default=0.0, help="fraction of training labels replaced at random (deeper trees)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (best of)")
    args = ap.parse_args()

    from sklearn.ensemble import RandomForestClassifier

    size = 256 if args.quick else 1024
    n_trees = args.trees or (20 if args.quick else 100)
    t0 = time.perf_counter()
    img, labels = synthetic_em(size)
    feat = features(img)
    X = feat.reshape(-1, feat.shape[-1])
    y = labels.ravel()
    print(
        f"data: {X.shape[0]} samples x {X.shape[1]} features, classes "
        f"{np.bincount(y).tolist()} ({time.perf_counter() - t0:.1f} s)"
    )

    rng = np.random.default_rng(1)
    train = rng.choice(X.shape[0], size=min(10_000, X.shape[0]), replace=False)
    y_train = y[train].copy()
    flip = rng.random(y_train.size) < args.label_noise
    y_train[flip] = rng.integers(0, y.max() + 1, int(flip.sum()))
    t0 = time.perf_counter()
    clf = RandomForestClassifier(n_trees, max_depth=args.depth, n_jobs=2, random_state=0)
    clf.fit(X[train], y_train)
    depths = [e.tree_.max_depth for e in clf.estimators_]
    print(
        f"train: {n_trees} trees, max_depth={args.depth}, tree depth "
        f"{min(depths)}..{max(depths)}, {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    arrays = forest_arrays_from_sklearn(clf)
    t_conv = time.perf_counter() - t0
    print(f"convert: {arrays.n_nodes} internal nodes, {arrays.n_leaves} leaves, {t_conv * 1e3:.1f} ms")

    t0 = time.perf_counter()
    predict_proba(arrays, X[:100], block=args.block)
    print(f"numba first call (compile or cache load): {time.perf_counter() - t0:.2f} s")

    def best(fn) -> tuple[float, np.ndarray]:
        times, res = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t)
        return min(times), res

    t_sk, p_sk = best(lambda: clf.predict_proba(X))
    out = np.empty((X.shape[0], arrays.n_classes), np.float32)
    t_nb, p_nb = best(lambda: predict_proba(arrays, X, out=out, block=args.block))
    n = X.shape[0]
    kernel = f"SIMD {simd_name()}" if simd_available() else "scalar"
    print(f"sklearn predict_proba (n_jobs=2): {t_sk:.3f} s  {n / t_sk / 1e6:.2f} M samples/s")
    block = args.block or auto_block(n)
    print(f"numba predict_proba ({kernel} kernel, block={block}): {t_nb:.3f} s  {n / t_nb / 1e6:.2f} M samples/s")
    print(f"speed-up: {t_sk / t_nb:.2f}x")
    if simd_available():
        predict_proba(arrays, X[:100], block=args.block, simd=False)
        t_sc, p_sc = best(lambda: predict_proba(arrays, X, block=args.block, simd=False))
        same = "bit-identical" if np.array_equal(p_sc, p_nb) else "DIFFERENT"
        print(f"scalar kernel: {t_sc:.3f} s, speed-up {t_sk / t_sc:.2f}x ({same} to the SIMD kernel)")
    print(f"max |diff|: {np.abs(p_nb.astype(np.float64) - p_sk).max():.3g}")


if __name__ == "__main__":
    main()
