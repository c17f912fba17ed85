"""Live-update latency: stroke applied -> updated viewport returned.

Features are cached first (as when a user has been looking at the image);
then for each of 20 simulated strokes: paint, retrain (lazily, in the
request), predict the viewport, measure. Reports median and 90th percentile,
in 2D (512x512 viewport on a 1024x1024 EM slice) and 3D (128³ viewport), and
forest prediction throughput against sklearn ``predict_proba`` in the same run.

Run: ``python benchmarks/bench_live.py [--quick] [--trees N]``
Uses ``../shared/data/epfl_train.h5`` / ``flyem_medulla.h5`` when present,
otherwise generated EM-like images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from operators import ArraySource, FeatureFilters, LabelStore, PixelClassifier
from operators.kernels import forest_cpu
from operators.kernels.synthetic import em_like
from tda_graph import Graph, Roi
from tda_graph.frontends.bench import LIVE_SELECTION
from tda_graph.workflows.strokes import simulate_strokes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_2d() -> tuple[np.ndarray, np.ndarray, str]:
    p = DATA / "epfl_train.h5"
    if p.exists():
        import h5py

        with h5py.File(p, "r") as f:
            raw = f["raw"][0, :, :1024]
            mito = f["mitochondria"][0, :, :1024]
        pad = 1024 - raw.shape[0]  # 768 rows: mirror to a square 1024x1024 slice
        raw = np.concatenate([raw, raw[::-1][:pad]])
        mito = np.concatenate([mito, mito[::-1][:pad]])
        return raw, mito, "EPFL slice 0 (mirrored to 1024x1024)"
    em = em_like((1024, 1024), seed=0)
    return em.raw, em.mitochondria, "synthetic EM 1024x1024"


def load_3d() -> tuple[np.ndarray, np.ndarray, str]:
    p = DATA / "flyem_medulla.h5"
    if p.exists():
        import h5py

        with h5py.File(p, "r") as f:
            raw = f["raw"][:192, :192, :192]
            gt = f["boundaries"][:192, :192, :192]
        return raw, gt, "FlyEM medulla 192³ (boundaries)"
    em = em_like((192, 192, 192), seed=0)
    return em.raw, em.membranes, "synthetic EM 192³ (membranes)"


def live(
    raw, gt, viewport: Roi, axes: str, trees: int, n_strokes: int, selection, depth: int | None = None, keep=False
) -> dict:
    g = Graph()
    src = g.add(ArraySource(raw, axes=axes))
    feats = g.add(FeatureFilters(selection), image=src)
    lab = g.add(LabelStore(raw.shape, axes, ("background", "foreground")))
    clf = g.add(
        PixelClassifier(class_names=("background", "foreground"), n_trees=trees, max_depth=depth),
        features=feats,
        labels=lab,
    )
    fvp = Roi(viewport.start + (0,), viewport.stop + (feats.spec.shape[-1],))
    t0 = time.perf_counter()
    g.request(feats, fvp)
    t_feat = time.perf_counter() - t0
    strokes = simulate_strokes({1: gt == 0, 2: gt > 0}, pixels_per_class=40 * n_strokes, seed=1)
    # one initial stroke per class so the forest can train, then timed strokes
    first = {s.label: s for s in reversed(strokes)}
    for s in first.values():
        lab.paint(s.roi, s.mask, s.label)
    strokes = [s for s in strokes if s not in first.values()]
    out_roi = Roi(viewport.start + (0,), viewport.stop + (2,))
    g.request(clf, out_roi)
    lat = []
    train0 = clf.counters["training_seconds"]
    for s in strokes[:n_strokes]:
        t0 = time.perf_counter()
        lab.paint(s.roi, s.mask, s.label)
        g.request(clf, out_roi)
        lat.append(time.perf_counter() - t0)
    kept = {}
    if keep:  # the final training set and the viewport's features, for forest_speed_live
        labels = g.request(lab, Roi((0,) * raw.ndim, raw.shape))
        mask = labels > 0
        full = g.request(feats, Roi((0,) * raw.ndim + (0,), raw.shape + (feats.spec.shape[-1],)))
        kept = {"X": full[mask], "y": labels[mask], "viewport_features": g.request(feats, fvp)}
    g.close()
    lat.sort()
    return {
        "features_s": t_feat,
        "median_ms": statistics.median(lat) * 1e3,
        "p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
        "train_ms": (clf.counters["training_seconds"] - train0) / max(1, len(lat)) * 1e3,
        "samples": clf.counters["training_samples"],
        "n": len(lat),
        "channels": feats.spec.shape[-1],
        **kept,
    }


def _race(clf, X: np.ndarray, repeat: int = 5) -> dict:
    """Median seconds of our kernel (SIMD where available, and the scalar one) and of
    sklearn's ``predict_proba`` (n_jobs=-1) on ``X``, alternating."""
    arrays = forest_cpu.forest_arrays_from_sklearn(clf)
    X = np.ascontiguousarray(X, dtype=np.float32)
    simd = forest_cpu.simd_available()
    for s in {simd, False}:
        forest_cpu.predict_proba(arrays, X[:1000], simd=s)  # compile / warm
    ours_t, scalar_t, sk_t = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ours = forest_cpu.predict_proba(arrays, X, simd=simd)
        ours_t.append(time.perf_counter() - t0)
        if simd:
            t0 = time.perf_counter()
            forest_cpu.predict_proba(arrays, X, simd=False)
            scalar_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = clf.predict_proba(X)
        sk_t.append(time.perf_counter() - t0)
    t_ours, t_sk = statistics.median(ours_t), statistics.median(sk_t)
    t_scalar = statistics.median(scalar_t) if simd else t_ours
    depth = statistics.mean(e.tree_.max_depth for e in clf.estimators_)
    return {
        "ours_s": t_ours,
        "sklearn_s": t_sk,
        "ratio": t_sk / t_ours,
        "kernel": f"SIMD {forest_cpu.simd_name()}" if simd else "scalar",
        "scalar_s": t_scalar,
        "max_diff": float(np.abs(ours - ref).max()),
        "n": X.shape[0],
        "depth": depth,
        "nodes": arrays.n_nodes,
    }


def forest_speed_live(trees: int, X: np.ndarray, y: np.ndarray, viewport_features: np.ndarray) -> dict:
    """The forest a user's strokes give (the 2D run's training set), predicting the viewport."""
    from sklearn.ensemble import RandomForestClassifier

    clf = RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=-1).fit(X, y)
    return _race(clf, viewport_features.reshape(-1, viewport_features.shape[-1]))


def forest_speed(trees: int, n: int) -> dict:
    """A deep forest on noisy random data, predicting random rows (no spatial coherence)."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    Xtr = rng.normal(size=(3000, 24)).astype(np.float32)
    ytr = (Xtr[:, 0] + 0.5 * Xtr[:, 1] ** 2 + rng.normal(0, 0.5, 3000) > 0.5).astype(int) + 1
    clf = RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=-1).fit(Xtr, ytr)
    return _race(clf, rng.normal(size=(n, 24)).astype(np.float32), repeat=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--strokes", type=int, default=20)
    ap.add_argument("--depth", type=int, default=None, help="forest max_depth (default unlimited, like ilastik)")
    ap.add_argument(
        "--runs", type=int, default=1, help="repeat the 2D scenario (fresh graph each time) to show the spread"
    )
    a = ap.parse_args()
    n = 5 if a.quick else a.strokes
    raw, gt, name = load_2d()
    sel = LIVE_SELECTION  # the same 13 channels as `tda bench`
    runs = []
    for k in range(max(1, a.runs)):
        r2 = live(raw, gt, Roi((256, 256), (768, 768)), "yx", a.trees, n, sel, a.depth, keep=k == 0)
        runs.append(r2)
        print(
            f"2D {name}, 512x512 viewport, {r2['channels']} feature channels, {a.trees} trees "
            f"(max_depth {a.depth}), {r2['n']} strokes "
            f"(features cached in {r2['features_s']:.2f} s first): median {r2['median_ms']:.0f} ms, "
            f"p90 {r2['p90_ms']:.0f} ms (training {r2['train_ms']:.0f} ms of it on average), "
            f"{r2['samples']} training samples at the end",
            flush=True,
        )
    r2 = runs[0]
    if len(runs) > 1:
        meds = sorted(r["median_ms"] for r in runs)
        print(f"2D over {len(runs)} runs: medians {', '.join(f'{m:.0f}' for m in meds)} ms")
    raw3, gt3, name3 = load_3d()
    r3 = live(raw3, gt3, Roi((32, 32, 32), (160, 160, 160)), "zyx", a.trees, n, sel, a.depth)
    print(
        f"3D {name3}, 128³ viewport, {r3['channels']} feature channels, {a.trees} trees "
        f"(max_depth {a.depth}), {r3['n']} strokes "
        f"(features cached in {r3['features_s']:.2f} s first): median {r3['median_ms']:.0f} ms, "
        f"p90 {r3['p90_ms']:.0f} ms (training {r3['train_ms']:.0f} ms of it on average), "
        f"{r3['samples']} training samples at the end"
    )
    fl = forest_speed_live(a.trees, r2["X"], r2["y"], r2["viewport_features"])
    fs = forest_speed(a.trees, 200_000 if a.quick else 1_000_000)
    for what, f in (("the 2D run's forest on its 512x512 viewport", fl), ("deep forest on random rows", fs)):
        print(
            f"forest prediction, {what} ({a.trees} trees, mean depth {f['depth']:.1f}, {f['nodes']} split nodes, "
            f"{f['n']} samples): ours ({f['kernel']} kernel) {f['ours_s'] * 1e3:.0f} ms, sklearn predict_proba "
            f"(n_jobs=-1) {f['sklearn_s'] * 1e3:.0f} ms -> {f['ratio']:.2f}x (scalar kernel "
            f"{f['scalar_s'] * 1e3:.0f} ms, {f['sklearn_s'] / f['scalar_s']:.2f}x; max |diff| {f['max_diff']:.1e}; "
            "medians, alternating)"
        )


if __name__ == "__main__":
    main()
