"""The ``tda`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tda_graph import Roi, TdaError

from .atomic import atomic_path


def _save_png(path: Path, panels: list[np.ndarray]) -> None:
    from PIL import Image

    def to8(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return ((a - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)

    gap = np.full((panels[0].shape[0], 4), 255, np.uint8)
    row = np.concatenate([p for a in panels for p in (to8(a), gap)][:-1], axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(row).save(tmp, format="PNG")


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & gt).sum() / max(1, (pred | gt).sum()))


def cmd_demo(args: argparse.Namespace) -> int:
    """The workflow on a generated EM-like image: strokes → features → forest, then one more stroke, live."""
    from operators.kernels.synthetic import em_like

    from ..workflows.pixel_classification import TrainableDomainAdaptation
    from ..workflows.strokes import simulate_strokes

    out = Path(args.out)
    t0 = time.perf_counter()
    em = em_like((args.size, args.size), seed=args.seed)
    gt = em.mitochondria > 0
    wf = TrainableDomainAdaptation(
        em.raw, axes="yx", class_names=("background", "mitochondria"), n_trees=args.trees, workers=args.workers
    )
    strokes = simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=args.pixels, seed=args.seed)
    painted = np.zeros(gt.shape, np.uint8)
    with wf.strokes():  # many strokes, one dirty event, one training
        for s in strokes:
            wf.paint(s.roi, s.mask, s.label)
            painted[s.roi.to_slices()][s.mask] = s.label
    t1 = time.perf_counter()
    prob = wf.request("probabilities")[..., 1]
    seg = wf.request("segmentation")
    t_first = time.perf_counter() - t1
    # live update: one more stroke, then only a viewport is predicted again
    side = min(512, args.size)
    view = Roi((0, 0), (side, side))
    extra = simulate_strokes({2: gt}, pixels_per_class=40, seed=args.seed + 1)[0]
    before = wf.graph.stats(wf.probabilities)["voxels_computed"]
    t1 = time.perf_counter()
    wf.paint(extra.roi, extra.mask, extra.label)
    wf.request("probabilities", Roi(view.start + (0,), view.stop + (2,)))
    t_live = time.perf_counter() - t1
    recomputed = wf.graph.stats(wf.probabilities)["voxels_computed"] - before
    summary = {
        "image": f"synthetic EM-like {args.size}x{args.size} (seed {args.seed})",
        "strokes": len(strokes),
        "labelled_pixels": int((painted > 0).sum()),
        "forest": {"trees": args.trees, "trainings": wf.probabilities.counters["trainings"]},
        "forest_iou_mitochondria": round(_iou(seg == 2, gt), 4),
        "chance_iou": round(_iou(np.ones_like(gt), gt), 4),
        "first_prediction_s": round(t_first, 3),
        "stroke_to_viewport_s": round(t_live, 3),
        "viewport": repr(view),
        "pixels_predicted_after_stroke": int(recomputed // 2),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _save_png(out / "overview.png", [em.raw, painted, prob, seg])
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    if args.dot:
        print(wf.graph.to_dot())
    print(json.dumps(summary, indent=2))
    panels = "raw | strokes | forest probability | segmentation"
    print(f"wrote {out / 'overview.png'} ({panels}) and {out / 'summary.json'}")
    wf.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tda", description="tda-graph: trainable domain adaptation engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo on a generated EM-like image (offline)")
    d.add_argument("--out", default="tda-demo-out", help="output folder (default: %(default)s)")
    d.add_argument("--size", type=int, default=768, help="image side in pixels (default: %(default)s)")
    d.add_argument("--trees", type=int, default=100, help="forest size (default: %(default)s)")
    d.add_argument("--pixels", type=int, default=400, help="labelled pixels per class (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None, help="worker threads (default: CPU count)")
    d.add_argument("--dot", action="store_true", help="also print the graph in Graphviz dot syntax")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TdaError as e:
        print(f"tda: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tda: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
