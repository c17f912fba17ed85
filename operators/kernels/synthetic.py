"""Synthetic EM-like images with ground truth (for the demo, tests and benchmarks).

Cells are Voronoi regions of random seeds; their borders are dark membranes;
some cells hold dark, elongated mitochondria with a lighter interior texture.
A smooth background, blur and Poisson-like noise make it look like ssTEM.
No engine import; plain numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["EMImage", "em_like"]


@dataclass(frozen=True)
class EMImage:
    """A synthetic image and its masks (all the same shape)."""

    raw: np.ndarray  # uint8
    membranes: np.ndarray  # uint8, 1 = membrane
    mitochondria: np.ndarray  # uint8, 1 = mitochondrion


def em_like(shape: tuple[int, ...] = (512, 512), *, seed: int = 0, cell_size: float = 48.0) -> EMImage:
    """Generate an EM-like 2D or 3D image.

    Parameters
    ----------
    shape : tuple of int
        ``(y, x)`` or ``(z, y, x)``.
    seed : int
        Random seed; the same seed gives the same image.
    cell_size : float
        Typical cell diameter in pixels.
    """
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be 2D or 3D with positive sizes, got {shape}")
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    n_cells = max(2, int(size / cell_size ** len(shape) * 1.3))
    seeds = np.zeros(shape, np.int32)
    idx = tuple(rng.integers(0, n, n_cells) for n in shape)
    seeds[idx] = np.arange(1, n_cells + 1)
    # nearest-seed labelling = Voronoi cells
    _, inds = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[tuple(inds)]
    border = np.zeros(shape, bool)
    for ax in range(len(shape)):
        d = np.diff(cells, axis=ax) != 0
        sl_a = [slice(None)] * len(shape)
        sl_b = [slice(None)] * len(shape)
        sl_a[ax] = slice(1, None)
        sl_b[ax] = slice(None, -1)
        border[tuple(sl_a)] |= d
        border[tuple(sl_b)] |= d
    membranes = ndimage.binary_dilation(border, iterations=1)
    # mitochondria: anisotropic blobs inside ~40% of the cells, away from membranes
    mito = np.zeros(shape, bool)
    dist = ndimage.distance_transform_edt(~membranes)
    n_mito = max(1, int(n_cells * 0.4))
    grid = np.indices(shape, dtype=np.float32)
    for _ in range(n_mito):
        c = [rng.uniform(0, n) for n in shape]
        radii = [rng.uniform(0.12, 0.3) * cell_size for _ in shape]
        radii[rng.integers(len(shape))] *= rng.uniform(1.5, 2.5)
        lo = [max(0, int(ci - 3 * r)) for ci, r in zip(c, radii)]
        hi = [min(n, int(ci + 3 * r) + 1) for ci, r, n in zip(c, radii, shape)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        q = sum(((grid[d][sl] - c[d]) / radii[d]) ** 2 for d in range(len(shape)))
        # a mitochondrion stays inside the cell that holds its centre
        home = cells[tuple(min(int(ci), n - 1) for ci, n in zip(c, shape))]
        mito[sl] |= (q <= 1.0) & (cells[sl] == home)
    mito &= dist > 3
    # intensities
    img = np.full(shape, 170.0, np.float32)
    img += ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), cell_size / 2) * 200
    img[membranes] = 60
    img[mito] = 80
    inner = mito & (ndimage.distance_transform_edt(mito) > 2)
    img[inner] += 25 * (rng.random(int(inner.sum())) > 0.5)
    img = ndimage.gaussian_filter(img, 1.0)
    img += rng.normal(0, 12, shape).astype(np.float32)
    raw = np.clip(img, 0, 255).astype(np.uint8)
    return EMImage(raw, membranes.astype(np.uint8), mito.astype(np.uint8))
