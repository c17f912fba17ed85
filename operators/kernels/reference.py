"""Slow float64 reference for the filter features (scipy.ndimage + numpy.linalg).

Written from the textbook definitions, independent of the numba kernels; used
by the tests, the benchmark ("what a user without this library would do") and
the GPU check.  Same kernel radius (``ceil(3.5σ)``) and boundary
(``mode='reflect'``) as the kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from . import feature_table as ft

__all__ = ["ref_gaussian", "ref_feature", "ref_compute_features"]


def ref_gaussian(
    img: np.ndarray, sigma: float, order: Sequence[int] | int = 0, axes: Sequence[int] | None = None
) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` in float64 with radius ``ceil(3.5σ)``."""
    img = np.asarray(img, dtype=np.float64)
    axes = tuple(range(img.ndim)) if axes is None else tuple(axes)
    r = ft.kernel_radius(sigma)
    return ndi.gaussian_filter(img, sigma, order=order, mode="reflect", radius=r, axes=axes)


def ref_feature(img: np.ndarray, fid: str, sigma: float, in_2d: bool = False) -> np.ndarray:
    """One feature of a pure spatial array; eigenvalue features get a trailing axis."""
    img = np.asarray(img, dtype=np.float64)
    axes = tuple(range(img.ndim))[1:] if in_2d else tuple(range(img.ndim))
    nd = len(axes)

    def d(*orders_per_axis: int, s: float = sigma, src: np.ndarray = img) -> np.ndarray:
        return ref_gaussian(src, s, order=orders_per_axis, axes=axes)

    def unit(i: int, k: int = 1) -> tuple[int, ...]:
        o = [0] * nd
        o[i] += k
        return tuple(o)

    if fid == "GaussianSmoothing":
        return d(*([0] * nd))
    if fid == "LaplacianOfGaussian":
        return sum(d(*unit(i, 2)) for i in range(nd))
    if fid == "GaussianGradientMagnitude":
        return np.sqrt(sum(d(*unit(i)) ** 2 for i in range(nd)))
    if fid == "DifferenceOfGaussians":
        return d(*([0] * nd)) - d(*([0] * nd), s=ft.DOG_RATIO * sigma)
    if fid == "StructureTensorEigenvalues":
        g = [d(*unit(i)) for i in range(nd)]
        t = np.empty(img.shape + (nd, nd))
        for i, j in itertools.product(range(nd), repeat=2):
            if j >= i:
                t[..., i, j] = d(*([0] * nd), s=ft.ST_OUTER_RATIO * sigma, src=g[i] * g[j])
                t[..., j, i] = t[..., i, j]
        return np.linalg.eigvalsh(t)[..., ::-1]
    if fid == "HessianOfGaussianEigenvalues":
        h = np.empty(img.shape + (nd, nd))
        for i, j in itertools.product(range(nd), repeat=2):
            if j >= i:
                o = [0] * nd
                o[i] += 1
                o[j] += 1
                h[..., i, j] = d(*o)
                h[..., j, i] = h[..., i, j]
        return np.linalg.eigvalsh(h)[..., ::-1]
    raise ValueError(f"unknown feature {fid!r}")


def ref_compute_features(image: np.ndarray, selection: Sequence[tuple[str, float]], in_2d: bool = False) -> np.ndarray:
    """Reference for :func:`features_cpu.compute_features` (float64, same channel order)."""
    chans = []
    for c in range(image.shape[-1]):
        for fid, sigma in selection:
            r = ref_feature(image[..., c], fid, sigma, in_2d)
            chans.append(r if ft.is_eigen_feature(fid) else r[..., None])
    return np.concatenate(chans, axis=-1)
