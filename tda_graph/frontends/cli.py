"""The ``tda`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tda_graph import Roi, SettingsError, TdaError

from ..atomic import atomic_path


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
    if args.size < 64:
        raise SettingsError(f"--size {args.size}: give an image side of at least 64 pixels")
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out}: a file of that name exists; give a folder for the demo's outputs")
    t0 = time.perf_counter()
    em = em_like((args.size, args.size), seed=args.seed)
    target = args.target
    gt = getattr(em, target) > 0
    wf = TrainableDomainAdaptation(
        em.raw, axes="yx", class_names=("background", target), n_trees=args.trees, workers=args.workers
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
    panels = [em.raw, painted, prob, seg]
    enhanced_iou = None
    t_enh = None
    if not args.no_enhancer:
        from ..models import bundled_enhancers

        enhancer = f"{target}_em2d"
        if enhancer in bundled_enhancers():
            wf.set_enhancer(enhancer, tta=args.tta)
            t1 = time.perf_counter()
            enh = wf.request("enhanced")[..., 0]
            t_enh = time.perf_counter() - t1
            enhanced_iou = round(_iou(enh > 0.5, gt), 4)
            panels.append(enh)
    summary = {
        "image": f"synthetic EM-like {args.size}x{args.size} (seed {args.seed})",
        "strokes": len(strokes),
        "labelled_pixels": int((painted > 0).sum()),
        "forest": {"trees": args.trees, "trainings": wf.probabilities.counters["trainings"]},
        "target": target,
        "forest_iou": round(_iou(seg == 2, gt), 4),
        "enhanced_iou": enhanced_iou,
        "enhancer": f"{target}_em2d (bundled{', tta' if args.tta else ''})" if enhanced_iou is not None else None,
        "enhancer_s": None if t_enh is None else round(t_enh, 3),
        "chance_iou": round(_iou(np.ones_like(gt), gt), 4),
        "first_prediction_s": round(t_first, 3),
        "stroke_to_viewport_s": round(t_live, 3),
        "viewport": repr(view),
        "pixels_predicted_after_stroke": int(recomputed // 2),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _save_png(out / "overview.png", panels)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    if args.dot:
        print(wf.graph.to_dot())
    print(json.dumps(summary, indent=2))
    names = "raw | strokes | forest probability | segmentation" + (" | enhanced" if len(panels) > 4 else "")
    print(f"wrote {out / 'overview.png'} ({names}) and {out / 'summary.json'}")
    wf.close()
    return 0


def _progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        width = 30
        fill = width * done // max(total, 1)
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} blocks", end=end, file=sys.stderr)

    return show


def _parse_memory(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise TdaError(f"--memory {text!r} is not a size; write e.g. 512M or 2G") from None


def cmd_train(args: argparse.Namespace) -> int:
    """Headless training: image + sparse label image → project file."""
    from ..workflows.headless import train_project

    t0 = time.perf_counter()
    state = train_project(
        args.image,
        args.labels,
        args.project,
        axes=args.axes,
        features=args.features,
        in_2d=args.in_2d,
        channel=args.channel,
        n_trees=args.trees,
        seed=args.seed,
        enhancer=args.enhancer,
        tta=args.tta,
        allow_code=args.allow_code,
    )
    counts = state.labels.counts() if state.labels is not None else {}
    print(
        f"trained {args.trees} trees on {sum(counts.values())} labelled voxels "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}), {len(state.selection)} features, "
        f"in {time.perf_counter() - t0:.1f} s; wrote {args.project}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Headless batch prediction: project + inputs → outputs, blockwise and resumable."""
    from ..workflows.headless import predict_to_file

    inputs, outputs = args.input, args.output
    if len(inputs) != len(outputs):
        raise TdaError(f"give one --output per --input ({len(inputs)} inputs, {len(outputs)} outputs)")
    scheduler = getattr(args, "scheduler", None)
    if scheduler:
        bad = [o for o in outputs if not o.split(":")[0].lower().endswith(".zarr")]
        if bad:
            raise TdaError(f"--scheduler writes zarr outputs only; {bad[0]!r} is not a .zarr (e.g. out.zarr)")
    for inp, out in zip(inputs, outputs):
        t0 = time.perf_counter()
        if scheduler:
            from .distributed import predict_distributed

            r = predict_distributed(
                args.project,
                inp,
                out,
                args.export,
                scheduler=scheduler,
                roi=args.roi,
                memory=_parse_memory(args.memory),
                axes=args.axes,
                progress=not args.quiet,
                allow_code=args.allow_code,
            )
        else:
            r = predict_to_file(
                args.project,
                inp,
                out,
                args.export,
                roi=args.roi,
                axes=args.axes,
                memory=_parse_memory(args.memory),
                workers=args.workers,
                progress=None if args.quiet else _progress(Path(inp.split(":")[0]).name),
                allow_code=args.allow_code,
            )
        print(
            f"{inp} -> {out}: {args.export} {tuple(r['shape'])}, {r['computed']} blocks computed, "
            f"{r['skipped']} resumed, {time.perf_counter() - t0:.1f} s"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """What a project holds, and the graph it builds (nodes, specs, cache settings)."""
    from ..workflows.headless import _build
    from ..workflows.project import load_project

    state = load_project(args.project, check_files=args.input is None)
    labels = state.labels
    print(f"project: {args.project}")
    print(f"  input: {state.input_spec} (axes {state.axes or 'from metadata'})")
    print(
        f"  features: {len(state.selection)} (in 2D: {state.in_2d}): "
        + ", ".join(f"{f} σ={s:g}" for f, s in state.selection)
    )
    if labels is not None:
        counts = labels.counts()
        names = labels.class_names
        print("  classes: " + ", ".join(f"{k}={n} ({counts.get(k, 0)} labelled)" for k, n in enumerate(names, 1)))
    if state.forest is not None:
        f = state.forest
        print(f"  forest: {f.n_trees} trees, {f.n_features} features, classes {[int(c) for c in f.classes]}")
    print(f"  enhancer channel: {state.channel}; enhancer: {state.enhancer}")
    if args.input:
        job = _build(state, args.input, args.axes, args.export, 1, allow_code=args.allow_code)
        g = job.wf.graph
        print("graph:")
        for op in g.nodes:
            spec = g.spec(op)
            cache = "cached " + "x".join(map(str, g.block_shape(op))) if g.is_cached(op) else "uncached"
            print(f"  {op.label:16s} {spec.axes:5s} {tuple(spec.shape)} {spec.dtype} {cache}")
        if args.dot:
            print(g.to_dot())
        job.wf.close()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List bundled enhancers and models in the download cache."""
    from operators.enhancer import load_enhancer_model

    from ..models import bundled_enhancers

    if args.add:
        m = load_enhancer_model(args.add, allow_code=args.allow_code)  # fails clearly for a broken package
        flag = " --allow-code" if args.allow_code and "torchscript" not in m.usable_formats else ""
        print(
            f"{args.add}: loads as {m.name!r} (weights: {', '.join(m.usable_formats)}); "
            f"use it with 'tda train --enhancer {args.add}{flag}'"
        )
        return 0
    bundled = bundled_enhancers()
    print("bundled enhancers:" if bundled else "bundled enhancers: none in this installation")
    for name, path in bundled.items():
        print(f"  {name:24s} {path}")
    cache = Path(os.environ.get("TDA_GRAPH_MODEL_CACHE", Path.home() / ".cache" / "tda-graph" / "models"))
    cached = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    print(f"cached downloads ({cache}): {', '.join(cached) if cached else 'none'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    known = ("features", "forest", "live")
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in only if x not in known]
    if bad or not only:
        raise SettingsError(f"--only {args.only!r}: choose from {', '.join(known)} (comma-separated)")
    if args.trees < 1:
        raise SettingsError(f"--trees must be >= 1, got {args.trees}")
    run_bench(quick=args.quick, trees=args.trees, only=only, json_path=args.json)
    return 0


_ALLOW_CODE_HELP = (
    "allow an enhancer package whose only weights run Python code shipped in the package (pytorch_state_dict); "
    "only for packages you trust (never stored in the project)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tda", description="tda-graph: trainable domain adaptation engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo on a generated EM-like image (offline)")
    d.add_argument("--out", default="tda-demo-out", help="output folder (default: %(default)s)")
    d.add_argument("--size", type=int, default=768, help="image side in pixels (default: %(default)s)")
    d.add_argument("--trees", type=int, default=100, help="forest size (default: %(default)s)")
    d.add_argument(
        "--pixels",
        type=int,
        default=60,
        help="labelled pixels per class: a few strokes, a rough forest for the enhancer (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None, help="worker threads (default: CPU count)")
    d.add_argument("--dot", action="store_true", help="also print the graph in Graphviz dot syntax")
    d.add_argument("--no-enhancer", action="store_true", help="skip the bundled enhancer")
    d.add_argument("--tta", action="store_true", help="average the enhancer over flips and quarter turns (8x its time)")
    d.add_argument(
        "--target",
        default="membranes",
        choices=("membranes", "mitochondria"),
        help="what to segment, with the bundled enhancer of that name (default: %(default)s)",
    )
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a forest from an image and a sparse label image; write a project")
    t.add_argument("--image", required=True, help="PATH[:DATASET], e.g. data.h5:/raw, vol.zarr, img.tif")
    t.add_argument("--labels", required=True, help="PATH[:DATASET] of labels (0 = unlabelled, 1..K = classes)")
    t.add_argument("--project", required=True, help="project file to write (HDF5)")
    t.add_argument("--features", default="default", choices=("default", "all"), help="feature set")
    t.add_argument("--channel", type=int, default=None, help="label value K whose probability feeds the enhancer")
    t.add_argument("--in-2d", action="store_true", help="compute features per z slice")
    t.add_argument("--axes", default=None, help="axes of the image, e.g. zyx (default: metadata or ndim)")
    t.add_argument("--trees", type=int, default=100, help="forest size (default: %(default)s)")
    t.add_argument(
        "--enhancer", default=None, help="bundled enhancer name ('tda models'), a model package folder or a .zip"
    )
    t.add_argument(
        "--tta",
        action="store_true",
        help="run the enhancer with test-time augmentation (8 orientations averaged; 8x slower); stored in the project",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--allow-code", action="store_true", help=_ALLOW_CODE_HELP)
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="predict with a project, blockwise and resumable")
    pr.add_argument("--project", required=True, help="project file written by 'tda train'")
    pr.add_argument("--input", required=True, nargs="+", help="PATH[:DATASET] of each input")
    pr.add_argument("--output", required=True, nargs="+", help="PATH[:DATASET] of each output (.h5, .zarr, .tif)")
    pr.add_argument(
        "--export",
        default="probabilities",
        choices=("probabilities", "segmentation", "uncertainty", "features", "enhanced"),
        help="what to write (default: %(default)s); probabilities: channel K-1 belongs to label K; "
        "enhanced: channel 0 is the enhanced foreground probability",
    )
    pr.add_argument("--roi", default=None, help="spatial subregion, e.g. 0:10,100:612,100:612")
    pr.add_argument("--axes", default=None, help="axes of the input (default: metadata or ndim)")
    pr.add_argument("--memory", default=None, help="memory budget for blocks and caches, e.g. 2G")
    pr.add_argument("--workers", type=int, default=None, help="worker threads (default: CPU count)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument(
        "--scheduler",
        default=None,
        help="run on dask.distributed: local:N (N worker processes) or tcp://host:port; outputs must be .zarr",
    )
    pr.add_argument("--allow-code", action="store_true", help=_ALLOW_CODE_HELP)
    pr.set_defaults(func=cmd_predict)

    i = sub.add_parser("info", help="show what a project holds and the graph it builds for an input")
    i.add_argument("--project", required=True)
    i.add_argument("--input", default=None, help="PATH[:DATASET]: also show the graph for this input")
    i.add_argument("--axes", default=None)
    i.add_argument("--export", default="probabilities", help="output to plan for (default: %(default)s)")
    i.add_argument("--dot", action="store_true", help="also print the graph in Graphviz dot syntax")
    i.add_argument("--allow-code", action="store_true", help=_ALLOW_CODE_HELP)
    i.set_defaults(func=cmd_info)

    from ..workflows.shallow2deep import add_train_enhancer_parser  # torch is imported only when it runs

    add_train_enhancer_parser(sub)

    m = sub.add_parser("models", help="list bundled and cached enhancer models; check a local package")
    m.add_argument("--add", default=None, help="a model package folder or .zip to check (it is used in place)")
    m.add_argument("--allow-code", action="store_true", help=_ALLOW_CODE_HELP)
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="measure feature, forest and live-update speed on this machine (generated data)")
    b.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    b.add_argument("--trees", type=int, default=100, help="forest size (default: %(default)s)")
    b.add_argument(
        "--only", default="features,forest,live", help="comma-separated subset of features,forest,live (default: all)"
    )
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.set_defaults(func=cmd_bench)
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
