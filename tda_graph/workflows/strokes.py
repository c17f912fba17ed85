"""Simulated brush strokes drawn from ground truth (for demos, tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tda_graph import Roi

__all__ = ["Stroke", "simulate_strokes"]


@dataclass(frozen=True)
class Stroke:
    """One brush stroke: ``mask`` (shape ``roi.shape``) painted with ``label``."""

    roi: Roi
    mask: np.ndarray
    label: int

    @property
    def n_pixels(self) -> int:
        return int(self.mask.sum())


def _line(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    n = int(np.abs(p1 - p0).max()) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.unique(np.rint(p0 + (p1 - p0) * t).astype(int), axis=0)


def simulate_strokes(
    classes: dict[int, np.ndarray],
    *,
    pixels_per_class: int = 300,
    length: int = 25,
    width: int = 1,
    margin: int = 2,
    seed: int = 0,
) -> list[Stroke]:
    """Short straight strokes inside each class region, like a user's brush.

    Parameters
    ----------
    classes : dict
        ``{label: boolean mask}`` (2D or 3D, same shape); strokes for ``label``
        stay inside its mask eroded by ``margin``.
    pixels_per_class : int
        Stop adding strokes of a class once this many pixels are painted.
    length, width : int
        Stroke length and brush radius in pixels.
    seed : int
        Random seed (same seed, same strokes).

    Returns
    -------
    list of Stroke
        Interleaved by class, in drawing order.
    """
    rng = np.random.default_rng(seed)
    per_class: dict[int, list[Stroke]] = {}
    for label, mask in classes.items():
        mask = np.asarray(mask, bool)
        inner = ndimage.binary_erosion(mask, iterations=margin) if margin else mask
        if inner.sum() < 0.2 * mask.sum():  # thin structures (membranes): draw on the mask itself
            inner = mask
        pts = np.argwhere(inner)
        if len(pts) == 0:
            raise ValueError(f"class {label} has no pixels to draw strokes in")
        strokes: list[Stroke] = []
        painted = np.zeros(mask.shape, bool)
        tries = 0
        while painted.sum() < pixels_per_class and tries < 50 * max(1, pixels_per_class):
            tries += 1
            p0 = pts[rng.integers(len(pts))]
            direction = rng.normal(size=mask.ndim)
            if mask.ndim == 3:
                direction[0] *= 0.2  # strokes are drawn mostly in-plane
            direction /= np.linalg.norm(direction) + 1e-12
            p1 = np.clip(np.rint(p0 + direction * length), 0, np.array(mask.shape) - 1)
            line = _line(p0.astype(float), p1.astype(float))
            keep = inner[tuple(line.T)]
            # stop the stroke where it first leaves the class region
            stop = int(np.argmin(keep)) if not keep.all() else len(line)
            line = line[:stop]
            if len(line) < 3:
                continue
            lo = np.maximum(line.min(0) - width, 0)
            hi = np.minimum(line.max(0) + width + 1, mask.shape)
            roi = Roi(tuple(lo), tuple(hi))
            stroke_mask = np.zeros(roi.shape, bool)
            stroke_mask[tuple((line - lo).T)] = True
            if width > 0:
                stroke_mask = ndimage.binary_dilation(stroke_mask, iterations=width)
            stroke_mask &= mask[roi.to_slices()]
            stroke_mask &= ~painted[roi.to_slices()]
            if not stroke_mask.any():
                continue
            painted[roi.to_slices()] |= stroke_mask
            strokes.append(Stroke(roi, stroke_mask, int(label)))
        per_class[int(label)] = strokes
    out: list[Stroke] = []
    i = 0
    while any(i < len(v) for v in per_class.values()):
        for v in per_class.values():
            if i < len(v):
                out.append(v[i])
        i += 1
    return out
