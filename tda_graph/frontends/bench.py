"""``tda bench``: operator throughput and live-update latency on this machine.

Everything runs on generated EM-like data (no download), each measurement
against a reference computed in the same run, so the printed ratios do not
depend on how fast the machine is:

- features: the numba kernels vs scipy/numpy (ilastik's feature set);
- forest training: :func:`~operators.kernels.forest_train.fit_random_forest` vs
  ``RandomForestClassifier.fit`` (identical trees);
- forest prediction: the compiled evaluator vs ``predict_proba``;
- live update: stroke applied -> updated viewport returned, through the workflow.

The numbers are printed as a table and can be written as JSON (``--json``).
``benchmarks/`` holds the longer, more detailed scripts.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["run_bench"]

#: Feature selection of the live-update measurements here and in benchmarks/bench_live.py (13 channels).
LIVE_SELECTION = {
    "GaussianSmoothing": [0.7, 1.6, 3.5],
    "LaplacianOfGaussian": [1.6, 3.5],
    "GaussianGradientMagnitude": [1.6],
    "DifferenceOfGaussians": [1.6],
    "StructureTensorEigenvalues": [1.6],
    "HessianOfGaussianEigenvalues": [1.6, 3.5],
}


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, res = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def bench_features(size: int, repeat: int) -> dict[str, float]:
    """Every default feature on a ``size``² EM-like image: numba kernels vs the scipy reference."""
    from operators.features import normalize_selection
    from operators.kernels import features_cpu
    from operators.kernels.reference import ref_compute_features
    from operators.kernels.synthetic import em_like

    img = em_like((size, size), seed=0).raw.astype(np.float32)[..., None]
    sel = list(normalize_selection("default"))
    features_cpu.compute_features(img[:48, :48], sel)  # load / compile the kernels
    t_ours, ours = _best(lambda: features_cpu.compute_features(img, sel), repeat)
    t_ref, ref = _best(lambda: ref_compute_features(img, sel), 1)
    mvox = size * size / 1e6
    return {
        "size": size,
        "channels": int(ours.shape[-1]),
        "ours_s": t_ours,
        "reference_s": t_ref,
        "ours_mvox_per_s": mvox / t_ours,
        "speedup": t_ref / t_ours,
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref).max()),
    }


def bench_forest(n_train: int, n_predict: int, trees: int, repeat: int) -> dict[str, float]:
    """Training and prediction of a ``trees``-tree forest vs scikit-learn on the same data."""
    from sklearn.ensemble import RandomForestClassifier

    from operators.kernels import forest_cpu, forest_train

    rng = np.random.default_rng(0)
    n_features = 24
    X = rng.normal(size=(n_train, n_features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + rng.normal(0, 0.5, n_train) > 0.5).astype(int) + 1
    t_fit, forest = _best(lambda: forest_train.fit_random_forest(X, y, n_trees=trees), repeat)
    clf = RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=-1)
    t_fit_sk, _ = _best(lambda: clf.fit(X, y), repeat)
    Xp = rng.normal(size=(n_predict, n_features)).astype(np.float32)
    forest_cpu.predict_proba(forest, Xp[:1000])  # load / compile
    t_pred, ours = _best(lambda: forest_cpu.predict_proba(forest, Xp), repeat)
    t_pred_sk, ref = _best(lambda: clf.predict_proba(Xp), repeat)
    return {
        "trees": trees,
        "train_samples": n_train,
        "fit_s": t_fit,
        "sklearn_fit_s": t_fit_sk,
        "fit_speedup": t_fit_sk / t_fit,
        "predict_samples": n_predict,
        "predict_s": t_pred,
        "sklearn_predict_s": t_pred_sk,
        "predict_msamples_per_s": n_predict / t_pred / 1e6,
        "predict_speedup": t_pred_sk / t_pred,
        "max_abs_diff": float(np.abs(ours.astype(np.float64) - ref).max()),
    }


def bench_live(size: int, viewport: int, strokes: int, trees: int) -> dict[str, float]:
    """Latency from a stroke to the updated ``viewport``² probabilities, features cached."""
    from operators.kernels.synthetic import em_like
    from tda_graph import Roi
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation
    from tda_graph.workflows.strokes import simulate_strokes

    em = em_like((size, size), seed=0)
    gt = em.mitochondria > 0
    lo = (size - viewport) // 2
    view = Roi((lo, lo), (lo + viewport, lo + viewport))
    with TrainableDomainAdaptation(em.raw, selection=LIVE_SELECTION, n_trees=trees) as wf:
        t0 = time.perf_counter()
        wf.request("features", Roi(view.start + (0,), view.stop + (wf.features.spec.n_channels,)))
        t_feat = time.perf_counter() - t0
        drawn = simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=40 * (strokes + 2), seed=1)
        for s in drawn[:2]:  # one stroke per class so that the forest can train
            wf.paint(s.roi, s.mask, s.label)
        out = Roi(view.start + (0,), view.stop + (2,))
        wf.request("probabilities", out)
        lat = []
        for s in drawn[2 : 2 + strokes]:
            t0 = time.perf_counter()
            wf.paint(s.roi, s.mask, s.label)
            wf.request("probabilities", out)
            lat.append(time.perf_counter() - t0)
    lat.sort()
    return {
        "image": size,
        "viewport": viewport,
        "strokes": len(lat),
        "features_s": t_feat,
        "median_ms": statistics.median(lat) * 1e3,
        "p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1e3,
    }


def run_bench(
    *,
    quick: bool = False,
    trees: int = 100,
    only: tuple[str, ...] = ("features", "forest", "live"),
    json_path: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Run the selected measurements, print a summary, optionally write JSON.

    Parameters
    ----------
    quick : bool
        Smaller sizes (seconds instead of about a minute).
    trees : int
        Trees of the forests.
    only : tuple of str
        Any of ``"features"``, ``"forest"``, ``"live"``.
    json_path : str, optional
        Also write the results there (atomically).
    echo : callable
        Where the lines go.

    Returns
    -------
    dict
        Results per measurement.
    """
    res: dict[str, dict[str, float]] = {}
    cpus = os.cpu_count() or 1
    echo(f"tda bench on {cpus} CPU core(s){' (quick)' if quick else ''}; ratios are against a reference in this run")
    if "features" in only:
        f = res["features"] = bench_features(256 if quick else 1024, 2 if quick else 3)
        echo(
            f"features   {f['size']}² image, {f['channels']} channels: {f['ours_s'] * 1e3:.0f} ms "
            f"({f['ours_mvox_per_s']:.2f} Mpixel/s), scipy reference {f['reference_s'] * 1e3:.0f} ms "
            f"-> {f['speedup']:.1f}x (max |diff| {f['max_abs_diff']:.1e})"
        )
    if "forest" in only:
        r = res["forest"] = bench_forest(1000 if quick else 3000, 100_000 if quick else 1_000_000, trees, 2)
        echo(
            f"forest fit {r['trees']} trees on {r['train_samples']} samples: {r['fit_s'] * 1e3:.0f} ms, "
            f"sklearn fit {r['sklearn_fit_s'] * 1e3:.0f} ms -> {r['fit_speedup']:.1f}x (identical trees)"
        )
        echo(
            f"forest predict {r['predict_samples']} samples: {r['predict_s'] * 1e3:.0f} ms "
            f"({r['predict_msamples_per_s']:.2f} M/s), sklearn predict_proba {r['sklearn_predict_s'] * 1e3:.0f} ms "
            f"-> {r['predict_speedup']:.1f}x (max |diff| {r['max_abs_diff']:.1e})"
        )
    if "live" in only:
        lv = res["live"] = bench_live(512 if quick else 1024, 256 if quick else 512, 5 if quick else 20, trees)
        echo(
            f"live       {lv['viewport']}² viewport of a {lv['image']}² image, {lv['strokes']} strokes: "
            f"median {lv['median_ms']:.0f} ms, p90 {lv['p90_ms']:.0f} ms (stroke -> updated probabilities)"
        )
    if json_path:
        from ..atomic import atomic_path

        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(res, indent=2))
        echo(f"wrote {json_path}")
    return res
