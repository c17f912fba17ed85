"""Evaluate the bundled shallow2deep enhancers on data they were not trained on.

For every evaluation slice: simulate seeded sparse brush strokes from the
ground truth (about 0.1% of the pixels, half per class), train a random forest
on ilastik features of that slice, and compare

(a) the forest alone: foreground probability > 0.5, and
(b) forest + enhancer: the enhancer's output on that probability > 0.5

with the ground truth (foreground IoU and Dice, pooled over the slices of a
dataset). The enhancer runs on the whole slice, reflect-padded by its halo and
to a valid input size, through the package's TorchScript weights; with ``--tta``
averaged over its 8 flips and quarter turns (:mod:`operators.kernels.tta`).

Usage::

    python benchmarks/eval_enhancer.py [--data ../shared/data] [--out results.json] [--quick]
        [--fraction 0.001] [--seed 0 | --seeds 0-5] [--only mitochondria_em2d|membranes_em2d] [--models FOLDER]
        [--tta]

``--seeds`` repeats the evaluation for several stroke seeds and ends with a summary per
dataset: each seed's forest -> enhancer IoU and ratio, on how many seeds the enhancer at
least doubled the forest (the paper-style target on a domain it never saw), the smallest
ratio, and the IoU pooled over every seed's slices.

Datasets (skipped when a file is missing)
-----------------------------------------
mitochondria_em2d
    EPFL mitochondria, slices 20-26; synthetic ``em_like`` mitochondria.
membranes_em2d
    ISBI membranes, slices 20-29; EPFL membranes slices 20-26 (FIB-SEM mouse);
    synthetic ``em_like`` membranes; FlyEM medulla boundaries, z = 25, 75, ..., 225
    (isotropic FIB-SEM fly); gala FIB-SEM fly boundaries, z = 5, 10, ..., 45 of its train and
    test crops (100x200 slices, so the 50-pixel minimum per class labels about 0.6%).

The enhancers are trained on slices 0-19 only. A row's domain is "same" when the
package records its data file among its training data
(``config.tda_graph.training.images``), else "other" (a domain it never saw).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from operators.kernels.tta import predict_augmented  # noqa: E402
from tda_graph.errors import SettingsError  # noqa: E402
from tda_graph.models import bundled_enhancer  # noqa: E402
from tda_graph.workflows.shallow2deep import forest_probability, parse_index_list  # noqa: E402
from tda_graph.workflows.strokes import simulate_strokes  # noqa: E402

#: Forest features of the evaluation (a common ilastik selection: all features, σ 0.7-5.0).
EVAL_FEATURES: list[tuple[str, float]] = [
    (f, s)
    for s in (0.7, 1.0, 1.6, 3.5, 5.0)
    for f in (
        "GaussianSmoothing",
        "LaplacianOfGaussian",
        "GaussianGradientMagnitude",
        "DifferenceOfGaussians",
        "StructureTensorEigenvalues",
        "HessianOfGaussianEigenvalues",
    )
]


class TorchscriptEnhancer:
    """Whole-image (2D) or whole-volume (3D model) inference with a package's TorchScript weights.

    ``tta``: averaged over flips and quarter turns.
    """

    def __init__(self, package: Path, tta: bool = False) -> None:
        self.tta = tta
        import torch
        import yaml

        rdf = yaml.safe_load((package / "bioimageio.yaml").read_text())
        self.model = torch.jit.load(str(package / rdf["weights"]["torchscript"]["source"]), map_location="cpu").eval()
        self.ndim = len(rdf["inputs"][0]["axes"]) - 2  # b, c, then (z,) y, x
        size = rdf["inputs"][0]["axes"][2]["size"]
        self.min, self.step = int(size["min"]), int(size["step"])
        self.halo = int(rdf["outputs"][0]["axes"][2].get("halo", 0))
        training = (rdf.get("config") or {}).get("tda_graph", {}).get("training", {})
        images = training.get("images", [])
        if isinstance(images, str):
            images = [images]
        # data files the package says it was trained on (PATH:DATASET each)
        self.trained_on = {Path(str(i).rsplit(":", 1)[0]).name for i in images}

    def _valid(self, n: int) -> int:
        return self.min + max(0, -(-(n - self.min) // self.step)) * self.step

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        if self.tta:
            return predict_augmented(self._once, prob, n_spatial=self.ndim)
        return self._once(prob)

    def _once(self, prob: np.ndarray) -> np.ndarray:
        import torch

        if prob.ndim != self.ndim:
            raise ValueError(f"a {self.ndim}D model got an array of shape {prob.shape}")
        pad = [(self.halo, self._valid(n + 2 * self.halo) - n - self.halo) for n in prob.shape]
        padded = np.pad(prob, pad, mode="reflect")
        with torch.no_grad():
            out = self.model(torch.from_numpy(padded[None, None].astype(np.float32).copy())).numpy()[0, 0]
        return out[tuple(slice(b, b + n) for (b, _), n in zip(pad, prob.shape))]


def _read(path: Path, key: str, index: list[int]) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f[key][index]


def datasets(data: Path, quick: bool) -> Iterator[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """Yield ``(enhancer, dataset name, source file name, raw stack, mask stack)``.

    Real data is read only from slices no bundled enhancer was trained on (z >= 20);
    the domain ("same" / "other") follows from the training files the package records.
    """
    from operators.kernels.synthetic import em_like

    epfl, isbi, flyem = data / "epfl_train.h5", data / "isbi2012_train.h5", data / "flyem_medulla.h5"
    gala = data / "gala_fibsem_small.h5"
    epfl_z = [20, 21, 22] if quick else list(range(20, 27))
    if epfl.exists():
        yield (
            "mitochondria_em2d",
            "EPFL mitochondria z20-26",
            epfl.name,
            _read(epfl, "raw", epfl_z),
            _read(epfl, "mitochondria", epfl_z),
        )
    syn = [em_like((512, 512), seed=100 + s) for s in range(2 if quick else 4)]
    yield (
        "mitochondria_em2d",
        "synthetic em_like mitochondria",
        "synthetic",
        np.stack([s.raw for s in syn]),
        np.stack([s.mitochondria for s in syn]),
    )
    if isbi.exists():
        z = [20, 25, 29] if quick else list(range(20, 30))
        yield "membranes_em2d", "ISBI membranes z20-29", isbi.name, _read(isbi, "raw", z), _read(isbi, "membranes", z)
    if epfl.exists():
        yield (
            "membranes_em2d",
            "EPFL membranes z20-26",
            epfl.name,
            _read(epfl, "raw", epfl_z),
            _read(epfl, "membranes", epfl_z),
        )
    yield (
        "membranes_em2d",
        "synthetic em_like membranes",
        "synthetic",
        np.stack([s.raw for s in syn]),
        np.stack([s.membranes for s in syn]),
    )
    if flyem.exists():
        z = [25, 125, 225] if quick else list(range(25, 250, 50))
        yield (
            "membranes_em2d",
            "FlyEM medulla boundaries",
            flyem.name,
            _read(flyem, "raw", z),
            _read(flyem, "boundaries", z),
        )
    if gala.exists():
        # tiny isotropic FIB-SEM fly crops (100x200 slices): every 5th slice of both halves
        z = [5, 25, 45] if quick else list(range(5, 50, 5))
        yield (
            "membranes_em2d",
            "gala FIB-SEM boundaries",
            gala.name,
            np.concatenate([_read(gala, "train_raw", z), _read(gala, "test_raw", z)]),
            np.concatenate([_read(gala, "train_boundaries", z), _read(gala, "test_boundaries", z)]),
        )


def iou_dice(inter: float, predicted: float, truth: float) -> tuple[float, float]:
    """Foreground IoU and Dice from the intersection and the two foreground sizes."""
    inter, predicted, truth = float(inter), float(predicted), float(truth)
    return inter / max(1.0, predicted + truth - inter), 2 * inter / max(1.0, predicted + truth)


def stroke_labels(mask: np.ndarray, seed: int, fraction: float = 0.001) -> np.ndarray:
    """Seeded strokes (2D or 3D) inside the two classes: 0 unlabelled, 1 background, 2 foreground."""
    per_class = max(50, int(fraction * mask.size / 2))
    gt = mask > 0
    labels = np.zeros(mask.shape, np.uint8)
    for s in simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=per_class, width=1, seed=seed):
        labels[s.roi.to_slices()][s.mask] = s.label
    return labels


def evaluate(
    data: Path,
    quick: bool = False,
    n_trees: int = 50,
    models: Path | None = None,
    fraction: float = 0.001,
    seed: int = 0,
    only: str | None = None,
    tta: bool = False,
) -> list[dict[str, object]]:
    """Run every available dataset; return one result row per dataset.

    ``models``: a folder with ``mitochondria_em2d/`` and ``membranes_em2d/`` packages to
    evaluate instead of the bundled ones (e.g. a retrained candidate). ``seed``: slice
    ``i`` gets strokes and forest seed ``1000 * seed + i`` (0: the published table).
    ``only``: evaluate one enhancer's rows. ``tta``: average the enhancer over flips and
    quarter turns (:mod:`operators.kernels.tta`).
    """
    import torch

    torch.set_num_threads(1)
    enhancers: dict[str, TorchscriptEnhancer] = {}
    rows: list[dict[str, object]] = []
    for name, dname, source, raws, masks in datasets(data, quick):
        if only is not None and name != only:
            continue
        if name not in enhancers:
            package = models / name if models is not None else bundled_enhancer(name)
            enhancers[name] = TorchscriptEnhancer(package, tta=tta)
        enh = enhancers[name]
        domain = "same" if source in enh.trained_on else "other"
        counts = {"forest": np.zeros(3), "enhanced": np.zeros(3)}  # intersection, |pred|, |gt|
        n_labels = 0
        t0 = time.perf_counter()
        for i, (raw, mask) in enumerate(zip(raws, masks)):
            gt = mask > 0
            labels = stroke_labels(mask, seed=1000 * seed + i, fraction=fraction)
            n_labels += int((labels > 0).sum())
            prob = forest_probability(raw, labels, n_trees=n_trees, seed=1000 * seed + i, features=EVAL_FEATURES)
            for key, pred in (("forest", prob > 0.5), ("enhanced", enh(prob) > 0.5)):
                counts[key] += ((pred & gt).sum(), pred.sum(), gt.sum())
        row: dict[str, object] = {
            "enhancer": name,
            "dataset": dname,
            "domain": domain,
            "slices": len(raws),
            "shape": list(raws.shape[1:]),
            "labelled_fraction": n_labels / raws.size,
            "seconds": round(time.perf_counter() - t0, 1),
            "seed": seed,
            "tta": tta,
        }
        for key, (inter, p, g) in counts.items():
            row[f"{key}_iou"], row[f"{key}_dice"] = iou_dice(inter, p, g)
            row[f"{key}_counts"] = [int(inter), int(p), int(g)]  # lets a summary pool over seeds
        rows.append(row)
        print(
            f"{name:18s} {dname:34s} forest IoU {row['forest_iou']:.3f} Dice {row['forest_dice']:.3f} | "
            f"+enhancer IoU {row['enhanced_iou']:.3f} Dice {row['enhanced_dice']:.3f}  ({row['seconds']} s)",
            flush=True,
        )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """Results as a markdown table."""
    lines = [
        "| enhancer | dataset | domain | slices | labelled | forest IoU | forest Dice "
        "| + enhancer IoU | + enhancer Dice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['enhancer']} | {r['dataset']} | {r['domain']} | {r['slices']} | "
            f"{100 * float(r['labelled_fraction']):.2f}% | {r['forest_iou']:.3f} | {r['forest_dice']:.3f} | "
            f"{r['enhanced_iou']:.3f} | {r['enhanced_dice']:.3f} |"
        )
    return "\n".join(lines)


def seed_summary(rows: list[dict[str, object]]) -> str:
    """Per dataset: each seed's forest -> enhancer IoU (ratio), on how many seeds the enhancer
    doubled the forest, the smallest ratio, and the IoU pooled over every seed's slices."""
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((str(r["enhancer"]), str(r["dataset"])), []).append(r)
    lines = [
        "| enhancer | dataset | domain | per seed: forest -> + enhancer IoU (ratio) | doubled | min ratio "
        "| pooled over seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, dname), group in groups.items():
        group = sorted(group, key=lambda r: int(str(r["seed"])))
        ratios = [float(r["enhanced_iou"]) / max(1e-9, float(r["forest_iou"])) for r in group]
        cells = ", ".join(
            f"{r['seed']}: {float(r['forest_iou']):.3f} -> {float(r['enhanced_iou']):.3f} (x{q:.2f})"
            for r, q in zip(group, ratios)
        )
        pooled = [iou_dice(*np.sum([r[f"{key}_counts"] for r in group], axis=0))[0] for key in ("forest", "enhanced")]
        lines.append(
            f"| {name} | {dname} | {group[0]['domain']} | {cells} | {sum(q >= 2.0 for q in ratios)} of {len(group)} "
            f"| x{min(ratios):.2f} | {pooled[0]:.3f} -> {pooled[1]:.3f} (x{pooled[1] / max(1e-9, pooled[0]):.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="fewer slices")
    p.add_argument("--trees", type=int, default=50)
    p.add_argument("--models", type=Path, default=None, help="folder of candidate packages (default: bundled)")
    p.add_argument(
        "--fraction", type=float, default=0.001, help="share of pixels labelled by the simulated strokes (min 50/class)"
    )
    p.add_argument("--seed", type=int, default=0, help="stroke and forest seed offset (default 0: the docs' table)")
    p.add_argument(
        "--seeds", default=None, help="several stroke seeds, e.g. 0-5 (overrides --seed; ends with a per-seed summary)"
    )
    p.add_argument("--only", choices=["mitochondria_em2d", "membranes_em2d"], default=None, help="one enhancer's rows")
    p.add_argument("--tta", action="store_true", help="average the enhancer over flips and quarter turns (8x slower)")
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error(f"--fraction must be between 0 and 1, got {args.fraction}")
    if args.models is not None:
        wanted = [args.only] if args.only else ["mitochondria_em2d", "membranes_em2d"]
        missing = [n for n in wanted if not (args.models / n / "bioimageio.yaml").is_file()]
        if missing:
            p.error(f"--models {args.models}: no package {', '.join(missing)} in it (each: NAME/bioimageio.yaml)")
    try:
        seeds = parse_index_list(args.seeds, "--seeds") if args.seeds is not None else [args.seed]
    except SettingsError as exc:
        p.error(str(exc))
    rows = []
    for seed in seeds:
        rows += evaluate(
            args.data,
            quick=args.quick,
            n_trees=args.trees,
            models=args.models,
            fraction=args.fraction,
            seed=seed,
            only=args.only,
            tta=args.tta,
        )
    print()
    print(markdown(rows))
    if len(seeds) > 1:
        print()
        print(seed_summary(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
