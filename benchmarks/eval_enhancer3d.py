"""Evaluate the 3D boundary enhancer against the forest and the 2D enhancer run per slice.

For every evaluation volume: simulate seeded sparse 3D brush strokes from the ground
truth (about 0.1% of the voxels, half per class, at least 50 per class), train a random
forest on 3D ilastik features of the volume, and compare with the ground truth

(a) the forest alone: boundary probability > 0.5,
(b) the 2D enhancer ``membranes_em2d`` run on every z slice of that probability, > 0.5,
(c) the 3D enhancer ``boundaries_em3d`` run on the whole volume, > 0.5

(foreground IoU and Dice over the volume). The enhancers run through their packages'
TorchScript weights, reflect-padded by their halo to a valid input size
(``eval_enhancer.TorchscriptEnhancer``).

Usage::

    python benchmarks/eval_enhancer3d.py [--data ../shared/data] [--seeds 0,1,2] [--fraction 0.001]
        [--models FOLDER] [--out results.json]

Volumes (skipped when a file is missing)
----------------------------------------
FlyEM medulla, z 170-249 (80 x 250 x 250)
    the 3D enhancer was trained on z 0-159 of this volume ("same" domain for it; the 2D
    enhancer never saw FlyEM).
gala FIB-SEM, the ``train`` and ``test`` crops (50 x 100 x 200 each)
    isotropic FIB-SEM of the fly from another project: a domain neither enhancer saw.
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
for entry in (ROOT, ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from eval_enhancer import EVAL_FEATURES, TorchscriptEnhancer, iou_dice, stroke_labels  # noqa: E402

from tda_graph.models import bundled_enhancer  # noqa: E402
from tda_graph.workflows.shallow2deep import forest_probability  # noqa: E402


def volumes(data: Path) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Yield ``(name, source file name, raw volume, boundary volume)``."""
    import h5py

    flyem, gala = data / "flyem_medulla.h5", data / "gala_fibsem_small.h5"
    if flyem.exists():
        with h5py.File(flyem, "r") as f:
            yield "FlyEM medulla z170-249", flyem.name, f["raw"][170:250], f["boundaries"][170:250]
    if gala.exists():
        with h5py.File(gala, "r") as f:
            for part in ("train", "test"):
                yield f"gala FIB-SEM {part}", gala.name, f[f"{part}_raw"][...], f[f"{part}_boundaries"][...]


def evaluate(
    data: Path, seeds: list[int], fraction: float = 0.001, n_trees: int = 50, models: Path | None = None
) -> list[dict[str, object]]:
    """One row per volume and seed: IoU/Dice of the forest, the 2D enhancer per slice and the 3D enhancer."""
    import torch

    torch.set_num_threads(2)

    def package(name: str) -> Path:
        return models / name if models is not None else bundled_enhancer(name)

    flat, solid = TorchscriptEnhancer(package("membranes_em2d")), TorchscriptEnhancer(package("boundaries_em3d"))
    rows: list[dict[str, object]] = []
    for vname, source, raw, mask in volumes(data):
        gt = mask > 0
        for seed in seeds:
            t0 = time.perf_counter()
            labels = stroke_labels(mask, seed, fraction)
            prob = forest_probability(raw, labels, n_trees=n_trees, seed=seed, features=EVAL_FEATURES)
            t_forest = time.perf_counter() - t0
            per_slice = np.stack([flat(p) for p in prob])
            t_2d = time.perf_counter() - t0 - t_forest
            whole = solid(prob)
            t_3d = time.perf_counter() - t0 - t_forest - t_2d
            row: dict[str, object] = {
                "volume": vname,
                "shape": list(raw.shape),
                "seed": seed,
                "labelled_fraction": float((labels > 0).mean()),
                "domain_3d": "same" if source in solid.trained_on else "other",
                "domain_2d": "same" if source in flat.trained_on else "other",
                "seconds": {"forest": round(t_forest, 1), "enhancer_2d": round(t_2d, 1), "enhancer_3d": round(t_3d, 1)},
            }
            for key, pred in (("forest", prob > 0.5), ("enhancer_2d", per_slice > 0.5), ("enhancer_3d", whole > 0.5)):
                row[f"{key}_iou"], row[f"{key}_dice"] = iou_dice((pred & gt).sum(), pred.sum(), gt.sum())
            rows.append(row)
            print(
                f"{vname:24s} seed {seed}: forest {row['forest_iou']:.3f} | 2D per slice {row['enhancer_2d_iou']:.3f}"
                f" | 3D {row['enhancer_3d_iou']:.3f}  (IoU; {row['seconds']})",
                flush=True,
            )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """Results as a markdown table (IoU, Dice in brackets)."""
    lines = [
        "| volume | seed | labelled | forest | membranes_em2d per slice | boundaries_em3d |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[f'{k}_iou']:.3f} ({r[f'{k}_dice']:.3f})" for k in ("forest", "enhancer_2d", "enhancer_3d")]
        lines.append(
            f"| {r['volume']} | {r['seed']} | {100 * float(r['labelled_fraction']):.2f}% | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--seeds", default="0,1,2", help="stroke and forest seeds, e.g. 0,1,2")
    p.add_argument("--fraction", type=float, default=0.001, help="share of voxels labelled (min 50 per class)")
    p.add_argument("--trees", type=int, default=50)
    p.add_argument("--models", type=Path, default=None, help="folder of candidate packages (default: bundled)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error(f"--fraction must be between 0 and 1, got {args.fraction}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    rows = evaluate(args.data, seeds, fraction=args.fraction, n_trees=args.trees, models=args.models)
    print()
    print(markdown(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
