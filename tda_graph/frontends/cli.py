"""The ``tda`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tda_graph import Graph, Roi, TdaError

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


def cmd_demo(args: argparse.Namespace) -> int:
    """Engine demo on a generated EM-like image: ROI request, edit, precise recompute."""
    from operators import ArraySource, GaussianSmoothing
    from operators.kernels.synthetic import em_like

    out = Path(args.out)
    t0 = time.perf_counter()
    em = em_like((args.size, args.size), seed=args.seed)
    g = Graph(workers=args.workers)
    src = g.add(ArraySource(em.raw.copy(), axes="yx", name="raw"))
    smooth = g.add(GaussianSmoothing(sigma=2.0, name="smooth"), image=src)
    view = Roi((args.size // 4,) * 2, (args.size // 4 + 512,) * 2).clip((args.size, args.size))
    first = g.request(smooth, view)
    s1 = g.stats(smooth)
    stroke = Roi((view.start[0] + 100, view.start[1] + 100), (view.start[0] + 110, view.start[1] + 110))
    src.write(stroke, 255)
    g.reset_stats()
    second = g.request(smooth, view)
    s2 = g.stats(smooth)
    summary = {
        "image": list(em.raw.shape),
        "viewport": repr(view),
        "first_request": {k: s1[k] for k in ("blocks_computed", "voxels_computed", "cache_hits")},
        "after_edit": {k: s2[k] for k in ("blocks_computed", "voxels_computed", "cache_hits")},
        "edit": repr(stroke),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _save_png(out / "overview.png", [em.raw[view.to_slices()], first, second])
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(g.to_dot() if args.dot else "", end="")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'overview.png'} and {out / 'summary.json'}")
    g.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tda", description="tda-graph: trainable domain adaptation engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo on a generated EM-like image (offline)")
    d.add_argument("--out", default="tda-demo-out", help="output folder (default: %(default)s)")
    d.add_argument("--size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
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
