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


def _line(p0: np.ndarray, p1: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The distinct pixels of the segment p0-p1 (both inside ``shape``), in lexicographic order."""
    n = int(np.abs(p1 - p0).max()) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    points = np.rint(p0 + (p1 - p0) * t).astype(np.int64)
    # one integer key per pixel: a 1D unique is many times faster than unique(axis=0), same order
    keys = np.unique(np.ravel_multi_index(tuple(points.T), shape))
    return np.stack(np.unravel_index(keys, shape), axis=1)


def _l1_ball(radius: int, ndim: int) -> np.ndarray:
    """Offsets within L1 distance ``radius``: what ``binary_dilation`` with the cross reaches in ``radius`` steps."""
    r = max(int(radius), 0)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * ndim, indexing="ij"), axis=-1).reshape(-1, ndim)
    return grid[np.abs(grid).sum(axis=1) <= r]


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
        bounds, brush = np.array(mask.shape), _l1_ball(width, mask.ndim)
        strokes: list[Stroke] = []
        free = mask.copy()  # the class pixels no stroke has painted yet
        n_painted = 0  # a count: the loop can run thousands of times
        tries = 0
        while n_painted < pixels_per_class and tries < 50 * max(1, pixels_per_class):
            tries += 1
            p0 = pts[rng.integers(len(pts))]
            direction = rng.normal(size=mask.ndim)
            if mask.ndim == 3:
                direction[0] *= 0.2  # strokes are drawn mostly in-plane
            direction /= np.linalg.norm(direction) + 1e-12
            p1 = np.clip(np.rint(p0 + direction * length), 0, bounds - 1)
            line = _line(p0.astype(float), p1.astype(float), mask.shape)
            keep = inner[tuple(line.T)]
            # stop the stroke where it first leaves the class region
            stop = int(np.argmin(keep)) if not keep.all() else len(line)
            line = line[:stop]
            if len(line) < 3:
                continue
            # Quick exact test of "this stroke paints nothing new" (the brush reaches the pixels within
            # L1 distance `width` of the line): a class that cannot reach pixels_per_class spends all
            # its tries here, and must draw the same random numbers as before.
            near = (line[:, None, :] + brush[None]).reshape(-1, mask.ndim)
            near = near[((near >= 0) & (near < bounds)).all(axis=1)]
            if not free[tuple(near.T)].any():
                continue
            lo = np.maximum(line.min(0) - width, 0)
            hi = np.minimum(line.max(0) + width + 1, mask.shape)
            roi = Roi(tuple(lo), tuple(hi))
            stroke_mask = np.zeros(roi.shape, bool)
            stroke_mask[tuple((line - lo).T)] = True
            if width > 0:
                stroke_mask = ndimage.binary_dilation(stroke_mask, iterations=width)
            stroke_mask &= free[roi.to_slices()]  # not empty: the quick test found a free pixel
            free[roi.to_slices()] &= ~stroke_mask
            n_painted += int(stroke_mask.sum())
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
