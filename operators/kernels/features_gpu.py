"""GPU (cupy) versions of the filter-feature kernels.

Same public functions and semantics as :mod:`operators.kernels.features_cpu`
(:func:`gaussian`, :func:`compute_features`), taking and returning cupy arrays.
cupy is imported lazily inside the functions so this module imports fine on
machines without cupy / CUDA.

Implementation: separable passes with ``cupyx.scipy.ndimage.correlate1d`` using
the very same float32 weights as the CPU kernels (radius ``ceil(3.5σ)``,
``mode='reflect'``); derivative planes are memoised per σ so shared prefixes
(e.g. the z-smoothed image) are filtered once; the per-voxel combinations and
the closed-form eigenvalues run as ``ElementwiseKernel``s in double precision.
Results agree with the CPU kernels to float32 rounding (not bitwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from . import feature_table as ft
from .features_cpu import gaussian_kernel1d

__all__ = ["gaussian", "compute_features", "available"]


def available() -> bool:
    """True when cupy imports and at least one CUDA device is visible."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any failure means "no GPU"
        return False


def _cupy() -> Any:
    import cupy

    return cupy


@cache
def _weights(sigma: float, order: int, radius: int) -> np.ndarray:
    # correlate1d computes sum_j w[j] x[i + j - r]; the convolution kernel k(t)
    # is therefore passed reversed.  float32 like the CPU kernels.
    return np.ascontiguousarray(gaussian_kernel1d(sigma, order, radius)[::-1], dtype=np.float32)


def _pass(x: Any, sigma: float, order: int, axis: int) -> Any:
    cp = _cupy()
    import cupyx.scipy.ndimage as cndi

    w = cp.asarray(_weights(float(sigma), int(order), ft.kernel_radius(sigma)))
    return cndi.correlate1d(x, w, axis=axis, mode="reflect", output=cp.float32)


def gaussian(
    image: Any,
    sigma: float,
    *,
    order: int | Sequence[int] = 0,
    axes: Sequence[int] | None = None,
    out: Any = None,
    truncate: float = ft.TRUNCATE,
) -> Any:
    """Separable Gaussian (derivative) filter on the GPU; see ``features_cpu.gaussian``."""
    cp = _cupy()
    import cupyx.scipy.ndimage as cndi

    x = cp.asarray(image)
    nd = x.ndim
    axes_t = tuple(range(nd)) if axes is None else tuple(int(a) % nd for a in axes)
    orders = (int(order),) * len(axes_t) if np.isscalar(order) else tuple(int(o) for o in order)
    if len(orders) != len(axes_t):
        raise ValueError("order must be an int or have one entry per filtered axis")
    if any(o < 0 or o > 2 for o in orders):
        raise ValueError("derivative orders must be 0, 1 or 2")
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    radius = ft.kernel_radius(sigma, truncate)
    cur = x.astype(cp.float32, copy=True)
    for ax, o in zip(axes_t, orders):
        w = cp.asarray(np.ascontiguousarray(gaussian_kernel1d(sigma, o, radius)[::-1], dtype=np.float32))
        cur = cndi.correlate1d(cur, w, axis=ax, mode="reflect", output=cp.float32)
    if out is not None:
        out[...] = cur
        return out
    return cur


@cache
def _kernels() -> dict[str, Any]:
    cp = _cupy()
    eig2 = cp.ElementwiseKernel(
        "float32 a00, float32 a11, float32 a01",
        "float32 e0, float32 e1",
        """
        double m = 0.5 * ((double)a00 + (double)a11);
        double h = 0.5 * ((double)a00 - (double)a11);
        double d = sqrt(h * h + (double)a01 * (double)a01);
        e0 = (float)(m + d);
        e1 = (float)(m - d);
        """,
        "tda_eig2",
    )
    eig3 = cp.ElementwiseKernel(
        "float32 f00, float32 f11, float32 f22, float32 f01, float32 f02, float32 f12",
        "float32 e0, float32 e1, float32 e2",
        """
        double a00 = f00, a11 = f11, a22 = f22, a01 = f01, a02 = f02, a12 = f12;
        double q = (a00 + a11 + a22) / 3.0;
        double b00 = a00 - q, b11 = a11 - q, b22 = a22 - q;
        double p1 = a01 * a01 + a02 * a02 + a12 * a12;
        double p2 = b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1;
        double p = sqrt(p2 / 6.0);
        double det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02)
                     + a02 * (a01 * a12 - b11 * a02);
        double den = 2.0 * p * p * p;
        double r = den > 0.0 ? det / den : 0.0;
        r = fmin(fmax(r, -1.0), 1.0);
        double phi = acos(r) / 3.0;
        double v1 = q + 2.0 * p * cos(phi);
        double v3 = q + 2.0 * p * cos(phi + 2.0943951023931957);
        double v2 = 3.0 * q - v1 - v3;
        v2 = fmin(fmax(v2, v3), v1);
        e0 = (float)v1; e1 = (float)v2; e2 = (float)v3;
        """,
        "tda_eig3",
    )
    return {"eig2": eig2, "eig3": eig3}


def compute_features(
    image: Any, selection: Sequence[tuple[str, float]], *, in_2d: bool = False, out: Any = None
) -> Any:
    """GPU version of :func:`operators.kernels.features_cpu.compute_features`.

    Parameters and channel order are identical; ``image`` may be a numpy or
    cupy array, the result is a cupy float32 array of shape ``(*spatial, n_out)``.
    """
    cp = _cupy()
    image = cp.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (*spatial, C) with 2 or 3 spatial axes, got shape {image.shape}")
    spatial = tuple(image.shape[:-1])
    nch = int(image.shape[-1])
    selection = [(str(f), float(s)) for f, s in selection]
    ft.validate(selection, spatial, in_2d)
    nd = 2 if (in_2d or len(spatial) == 2) else 3
    faxes = tuple(range(len(spatial)))[-nd:]
    per = sum(ft.n_channels(f, nd) for f, _ in selection)
    n_out = per * nch
    if out is None:
        out = cp.empty(spatial + (n_out,), cp.float32)
    elif tuple(out.shape) != spatial + (n_out,) or out.dtype != cp.float32:
        raise ValueError(f"out must be float32 of shape {spatial + (n_out,)}")
    k = _kernels()
    offsets = np.cumsum([0] + [ft.n_channels(f, nd) for f, _ in selection])[:-1]

    for c in range(nch):
        src = image[..., c].astype(cp.float32)
        memo: dict[tuple[float, tuple[int, ...]], Any] = {}

        def deriv(sigma: float, orders: tuple[int, ...], base: Any = src, memo: dict = memo) -> Any:
            # memoised on the order prefix: shared leading passes are done once
            key = (sigma, orders)
            if key in memo:
                return memo[key]
            if len(orders) == 0:
                return base
            prev = deriv(sigma, orders[:-1], base, memo)
            res = _pass(prev, sigma, orders[-1], faxes[len(orders) - 1])
            memo[key] = res
            return res

        def unit(*pairs: tuple[int, int]) -> tuple[int, ...]:
            o = [0] * nd
            for a, n in pairs:
                o[a] += n
            return tuple(o)

        zero = (0,) * nd
        for i, (fid, sigma) in enumerate(selection):
            off = c * per + int(offsets[i])
            if fid == "GaussianSmoothing":
                out[..., off] = deriv(sigma, zero)
            elif fid == "LaplacianOfGaussian":
                acc = deriv(sigma, unit((0, 2))).copy()
                for a in range(1, nd):
                    acc += deriv(sigma, unit((a, 2)))
                out[..., off] = acc
            elif fid == "GaussianGradientMagnitude":
                acc = deriv(sigma, unit((0, 1))) ** 2
                for a in range(1, nd):
                    acc += deriv(sigma, unit((a, 1))) ** 2
                out[..., off] = cp.sqrt(acc)
            elif fid == "DifferenceOfGaussians":
                s2 = ft.DOG_RATIO * sigma
                out[..., off] = deriv(sigma, zero) - _smooth(src, s2, faxes)
            else:
                # tensor entries in the order 00, 11(, 22), 01(, 02, 12)
                pairs = [(i_, i_) for i_ in range(nd)] + ([(0, 1), (0, 2), (1, 2)] if nd == 3 else [(0, 1)])
                if fid == "StructureTensorEigenvalues":
                    g = [deriv(sigma, unit((a, 1))) for a in range(nd)]
                    so = ft.ST_OUTER_RATIO * sigma
                    ten = [_smooth(g[i_] * g[j_], so, faxes) for i_, j_ in pairs]
                else:
                    ten = [deriv(sigma, unit((i_, 1), (j_, 1))) for i_, j_ in pairs]
                if nd == 2:
                    e = [cp.empty(spatial, cp.float32) for _ in range(2)]
                    k["eig2"](*ten, *e)
                else:
                    e = [cp.empty(spatial, cp.float32) for _ in range(3)]
                    k["eig3"](*ten, *e)
                for j in range(nd):
                    out[..., off + j] = e[j]
        memo.clear()
    return out


def _smooth(x: Any, sigma: float, faxes: Sequence[int]) -> Any:
    for ax in faxes:
        x = _pass(x, sigma, 0, ax)
    return x
