"""CPU (numba) kernels for ilastik's pixel-classification filter features.

Design
------
* Every Gaussian (derivative) filter is separable: one 1-D pass per filtered
  axis.  Kernels have radius ``r = ceil(truncate * sigma)`` (see
  :func:`operators.kernels.feature_table.kernel_radius`) and use scipy's
  ``mode='reflect'`` boundary (``abcd|dcba``).  They are the *sampled* Gaussian
  (normalised to sum 1) times the Hermite polynomial of the derivative order,
  exactly like ``scipy.ndimage.gaussian_filter1d``.
* Gaussian kernels are (anti)symmetric, so a pass sums ``x[i-t] + x[i+t]``
  (or the difference) once and feeds it to up to three derivative orders at the
  same time ("fused" pass): the order-0, 1 and 2 results along one axis cost
  one read of the input and ``r+1`` instead of ``3(2r+1)`` multiplies.
* Work is shared inside one scale: the derivative planes needed by all selected
  features of that σ are computed with a tree of fused passes (z, then y, then
  x), 19 planes in 3D from 10 sweeps instead of 30.
* Storage and accumulation are float32 (error vs a float64 reference is
  ~1e-7..1e-6 of the output range, up to ~5e-5 for difference of Gaussians at
  σ=10 on images with a large mean, where G(σ) - G(0.66σ) cancels); eigenvalues
  are computed in float64 registers from the float32 tensor entries (closed
  form, vectorisable polynomial acos/cos/sin for 3x3).
* Exactness under ROI windowing: each output value is computed from the same
  input values with the same sequence of float32 operations regardless of the
  array size (fixed tap order, no FFT, no fastmath, so no size-dependent FMA
  contraction or reassociation; reflection only at array borders).  Hence
  computing on ``ROI + halo`` clipped to the image and cropping is bitwise equal
  to computing on the full image.
* Inner loops run over 1-D contiguous row views so LLVM vectorises them (AVX2).
* The channel-last output is written by ``_emit``; every emit touches every
  cache line of the output, so several σ groups are batched into one emit
  (bounded by :data:`PLANES_BUDGET_BYTES` of derivative planes).
* Scratch buffers are reused across scales and, up to
  :data:`SCRATCH_KEEP_BYTES`, across calls (fresh memory costs page faults);
  :func:`clear_scratch` releases them.  Concurrent calls from several threads
  are safe (each call takes its own scratch set).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from . import feature_table as ft

__all__ = [
    "gaussian",
    "gaussian_kernel1d",
    "gaussian_smoothing",
    "laplacian_of_gaussian",
    "gaussian_gradient_magnitude",
    "difference_of_gaussians",
    "structure_tensor_eigenvalues",
    "hessian_of_gaussian_eigenvalues",
    "compute_features",
    "eigvals_sym2",
    "eigvals_sym3",
    "clear_scratch",
    "PLANES_BUDGET_BYTES",
    "SCRATCH_KEEP_BYTES",
]

_JIT = dict(nogil=True, cache=True, fastmath=False)


# --------------------------------------------------------------------------- kernels
def gaussian_kernel1d(sigma: float, order: int, radius: int) -> np.ndarray:
    """Sampled 1-D Gaussian derivative kernel, float64, length ``2*radius+1``.

    Same formula as scipy's ``_gaussian_kernel1d``: ``phi`` is the sampled
    Gaussian normalised to sum 1, the derivative of order ``n`` is ``q_n(x)·phi``
    with ``q_n`` the polynomial obtained by differentiating ``exp(-x²/2σ²)``.
    Element ``j`` is the convolution weight ``k(t)`` at offset ``t = j - radius``,
    i.e. ``out[i] = sum_t k(t) * in[i - t]``.
    """
    if order < 0:
        raise ValueError("order must be non-negative")
    sigma = float(sigma)
    sigma2 = sigma * sigma
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / sigma2 * x.astype(np.float64) ** 2)
    phi = phi / phi.sum()
    if order == 0:
        return phi
    expo = np.arange(order + 1)
    q = np.zeros(order + 1)
    q[0] = 1.0
    qd = np.diag(expo[1:], 1) + np.diag(np.ones(order) / -sigma2, -1)
    for _ in range(order):
        q = qd.dot(q)
    q = (x[:, None].astype(np.float64) ** expo).dot(q)
    return q * phi


def _half_kernel(sigma: float, order: int, radius: int) -> np.ndarray:
    """float32 half kernel ``h[t] = k(t)``, ``t = 0..radius``.

    Even orders: ``out[i] = h[0] x[i] + sum_t h[t] (x[i-t] + x[i+t])``.
    Odd orders:  ``out[i] = sum_t h[t] (x[i-t] - x[i+t])`` (``k(-t) = -k(t)``).
    """
    if order > 2:
        raise ValueError("derivative orders above 2 are not supported")
    k = gaussian_kernel1d(sigma, order, radius)
    return np.ascontiguousarray(k[radius:], dtype=np.float32)


# --------------------------------------------------------------------------- numba core
@njit(inline="always", **_JIT)
def _refl(i, n):
    # scipy mode='reflect' ("abcd|dcba"), periodic with period 2n for any offset
    m = 2 * n
    i = i % m
    if i >= n:
        i = m - 1 - i
    return i


@njit(inline="always", **_JIT)
def _row_init(c, o0, o1, o2, w0, w2, mode):
    # order-0/2 start with the centre tap; odd orders have no centre tap
    n = c.shape[0]
    if mode & 1:
        for x in range(n):
            o0[x] = w0 * c[x]
    if mode & 2:
        for x in range(n):
            o1[x] = np.float32(0.0)
    if mode & 4:
        for x in range(n):
            o2[x] = w2 * c[x]


@njit(inline="always", **_JIT)
def _row_accum(a, b, o0, o1, o2, w0, w1, w2, mode):
    # a = x[i-t], b = x[i+t] rows; one loop per mode so each is a simple,
    # vectorisable stream over contiguous memory
    n = a.shape[0]
    if mode == 7:
        for x in range(n):
            s = a[x] + b[x]
            d = a[x] - b[x]
            o0[x] += w0 * s
            o1[x] += w1 * d
            o2[x] += w2 * s
    elif mode == 5:
        for x in range(n):
            s = a[x] + b[x]
            o0[x] += w0 * s
            o2[x] += w2 * s
    elif mode == 3:
        for x in range(n):
            s = a[x] + b[x]
            d = a[x] - b[x]
            o0[x] += w0 * s
            o1[x] += w1 * d
    elif mode == 6:
        for x in range(n):
            s = a[x] + b[x]
            d = a[x] - b[x]
            o1[x] += w1 * d
            o2[x] += w2 * s
    elif mode == 1:
        for x in range(n):
            o0[x] += w0 * (a[x] + b[x])
    elif mode == 4:
        for x in range(n):
            o2[x] += w2 * (a[x] + b[x])
    elif mode == 2:
        for x in range(n):
            o1[x] += w1 * (a[x] - b[x])


@njit(inline="always", **_JIT)
def _row_accum4(a1, b1, a2, b2, a3, b3, a4, b4, o, w1, w2, w3, w4):
    # four symmetric taps per sweep over o: 4x fewer loads/stores of the
    # accumulator; evaluated left to right, so the rounding sequence is exactly
    # that of four single-tap sweeps
    for x in range(o.shape[0]):
        o[x] = o[x] + w1 * (a1[x] + b1[x]) + w2 * (a2[x] + b2[x]) + w3 * (a3[x] + b3[x]) + w4 * (a4[x] + b4[x])


@njit(parallel=True, **_JIT)
def _pass(src, dst0, dst1, dst2, h0, h1, h2, axis, mode):
    """Fused 1-D Gaussian pass along ``axis`` of a C-contiguous 3-D float32 array.

    Writes the order-0/1/2 results selected by the bits of ``mode`` into
    ``dst0/dst1/dst2`` (same shape as ``src``; unused ones may be any array).
    """
    nz, ny, nx = src.shape
    r = h0.shape[0] - 1
    nlines = nz * ny
    if axis == 2:
        # contiguous axis: copy each line into a reflect-padded buffer, then
        # accumulate shifted views of it (inner loop over contiguous x)
        nchunks = min(nlines, 512)
        for ch in prange(nchunks):
            l0 = ch * nlines // nchunks
            l1 = (ch + 1) * nlines // nchunks
            buf = np.empty(nx + 2 * r, np.float32)
            for line in range(l0, l1):
                z = line // ny
                y = line - z * ny
                row = src[z, y]
                for i in range(nx):
                    buf[r + i] = row[i]
                for i in range(1, r + 1):
                    buf[r - i] = row[_refl(-i, nx)]
                    buf[r + nx - 1 + i] = row[_refl(nx - 1 + i, nx)]
                c = buf[r : r + nx]
                o0 = dst0[z, y] if mode & 1 else c
                o1 = dst1[z, y] if mode & 2 else c
                o2 = dst2[z, y] if mode & 4 else c
                _row_init(c, o0, o1, o2, h0[0], h2[0], mode)
                k = 1
                if mode == 1:
                    while k + 3 <= r:
                        _row_accum4(
                            buf[r - k : r - k + nx],
                            buf[r + k : r + k + nx],
                            buf[r - k - 1 : r - k - 1 + nx],
                            buf[r + k + 1 : r + k + 1 + nx],
                            buf[r - k - 2 : r - k - 2 + nx],
                            buf[r + k + 2 : r + k + 2 + nx],
                            buf[r - k - 3 : r - k - 3 + nx],
                            buf[r + k + 3 : r + k + 3 + nx],
                            o0,
                            h0[k],
                            h0[k + 1],
                            h0[k + 2],
                            h0[k + 3],
                        )
                        k += 4
                while k <= r:
                    _row_accum(buf[r - k : r - k + nx], buf[r + k : r + k + nx], o0, o1, o2, h0[k], h1[k], h2[k], mode)
                    k += 1
    else:
        # strided axis: accumulate whole contiguous rows, taps in the outer loop
        for line in prange(nlines):
            if axis == 1:
                z = line // ny
                y = line - z * ny
            else:
                # z fastest: consecutive lines reuse the same 2r+1 input rows
                y = line // nz
                z = line - y * nz
            c = src[z, y]
            o0 = dst0[z, y] if mode & 1 else c
            o1 = dst1[z, y] if mode & 2 else c
            o2 = dst2[z, y] if mode & 4 else c
            _row_init(c, o0, o1, o2, h0[0], h2[0], mode)
            k = 1
            if mode == 1:
                while k + 3 <= r:
                    if axis == 1:
                        _row_accum4(
                            src[z, _refl(y - k, ny)],
                            src[z, _refl(y + k, ny)],
                            src[z, _refl(y - k - 1, ny)],
                            src[z, _refl(y + k + 1, ny)],
                            src[z, _refl(y - k - 2, ny)],
                            src[z, _refl(y + k + 2, ny)],
                            src[z, _refl(y - k - 3, ny)],
                            src[z, _refl(y + k + 3, ny)],
                            o0,
                            h0[k],
                            h0[k + 1],
                            h0[k + 2],
                            h0[k + 3],
                        )
                    else:
                        _row_accum4(
                            src[_refl(z - k, nz), y],
                            src[_refl(z + k, nz), y],
                            src[_refl(z - k - 1, nz), y],
                            src[_refl(z + k + 1, nz), y],
                            src[_refl(z - k - 2, nz), y],
                            src[_refl(z + k + 2, nz), y],
                            src[_refl(z - k - 3, nz), y],
                            src[_refl(z + k + 3, nz), y],
                            o0,
                            h0[k],
                            h0[k + 1],
                            h0[k + 2],
                            h0[k + 3],
                        )
                    k += 4
            while k <= r:
                if axis == 1:
                    a = src[z, _refl(y - k, ny)]
                    b = src[z, _refl(y + k, ny)]
                else:
                    a = src[_refl(z - k, nz), y]
                    b = src[_refl(z + k, nz), y]
                _row_accum(a, b, o0, o1, o2, h0[k], h1[k], h2[k], mode)
                k += 1


@njit(parallel=True, **_JIT)
def _products(planes, gi, si):
    """Structure-tensor products ``planes[si[k]] = planes[gi[i]] * planes[gi[j]]``.

    ``si`` lists the upper-triangle entries: diagonal first (00, 11[, 22]) then
    off-diagonal (01[, 02, 12]).
    """
    nd = gi.shape[0]
    _, nz, ny, nx = planes.shape
    nlines = nz * ny
    for line in prange(nlines):
        z = line // ny
        y = line - z * ny
        for i in range(nd):
            g = planes[gi[i], z, y]
            o = planes[si[i], z, y]
            for x in range(nx):
                o[x] = g[x] * g[x]
        k = nd
        for i in range(nd):
            for j in range(i + 1, nd):
                g = planes[gi[i], z, y]
                h = planes[gi[j], z, y]
                o = planes[si[k], z, y]
                for x in range(nx):
                    o[x] = g[x] * h[x]
                k += 1


@njit(inline="always", **_JIT)
def _eig2(a00, a11, a01):
    # closed form for [[a00, a01], [a01, a11]]; descending
    m = 0.5 * (a00 + a11)
    h = 0.5 * (a00 - a11)
    d = math.sqrt(h * h + a01 * a01)
    return m + d, m - d


@njit(inline="always", **_JIT)
def _acos(x):
    # Abramowitz & Stegun 4.4.46 (|error| <= 2.2e-8 rad), branch free so that
    # LLVM can vectorise the caller (there is no SIMD libm without SVML)
    ax = abs(x)
    p = -0.0012624911
    p = p * ax + 0.0066700901
    p = p * ax - 0.0170881256
    p = p * ax + 0.0308918810
    p = p * ax - 0.0501743046
    p = p * ax + 0.0889789874
    p = p * ax - 0.2145988016
    p = p * ax + 1.5707963050
    a = math.sqrt(1.0 - ax) * p
    return math.pi - a if x < 0.0 else a


@njit(inline="always", **_JIT)
def _cos_sin_small(t):
    # Taylor series on [0, pi/3] (truncation error < 1e-13)
    t2 = t * t
    c = 1.0 + t2 * (
        -1.0 / 2
        + t2
        * (
            1.0 / 24
            + t2
            * (
                -1.0 / 720
                + t2 * (1.0 / 40320 + t2 * (-1.0 / 3628800 + t2 * (1.0 / 479001600 + t2 * (-1.0 / 87178291200))))
            )
        )
    )
    s = t * (
        1.0
        + t2
        * (
            -1.0 / 6
            + t2
            * (
                1.0 / 120
                + t2
                * (
                    -1.0 / 5040
                    + t2
                    * (1.0 / 362880 + t2 * (-1.0 / 39916800 + t2 * (1.0 / 6227020800 + t2 * (-1.0 / 1307674368000))))
                )
            )
        )
    )
    return c, s


@njit(inline="always", **_JIT)
def _eig3(a00, a11, a22, a01, a02, a12):
    # trigonometric method (Smith 1961) on B = (A - qI)/p with det(B)/2 = cos(3φ).
    # Robust: a multiple of I (p == 0) gives r = 0 -> all eigenvalues q, and
    # cos(3φ) is clamped to [-1, 1].  Accuracy ~1e-8·p (polynomial acos).
    q = (a00 + a11 + a22) / 3.0
    b00 = a00 - q
    b11 = a11 - q
    b22 = a22 - q
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    p2 = b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1
    p = math.sqrt(p2 / 6.0)
    det = b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    den = 2.0 * p * p * p
    r = det / den if den > 0.0 else 0.0
    r = min(max(r, -1.0), 1.0)
    c, s = _cos_sin_small(_acos(r) / 3.0)
    # cos(phi + 2π/3) = -c/2 - (√3/2) s
    e1 = q + 2.0 * p * c
    e3 = q + 2.0 * p * (-0.5 * c - 0.8660254037844386 * s)
    e2 = 3.0 * q - e1 - e3
    # keep the order under rounding
    e2 = min(max(e2, e3), e1)
    return e1, e2, e3


@njit(parallel=True, **_JIT)
def _emit(planes, out, idxs, offss, nd):
    """Write the features of a batch of scales into ``out[z, y, x, channel]``.

    Row ``g`` of ``idxs``: plane indices of group g [S, D, g0, g1, g2, h00, h11,
    h22, h01, h02, h12, s00, s11, s22, s01, s02, s12] (-1 = absent).  Row g of
    ``offss``: channel offsets of [smoothing, LoG, GGM, DoG, ST eigenvalues,
    Hessian eigenvalues] (-1 = not selected).  ``nd``: filtered axes (2 or 3).
    All groups are written while an output row is hot in cache.
    """
    _, nz, ny, nx = planes.shape
    nlines = nz * ny
    nchunks = min(nlines, 512)
    for chunk in prange(nchunks):
        l0 = chunk * nlines // nchunks
        l1 = (chunk + 1) * nlines // nchunks
        # contiguous line buffers: the math runs vectorised on them, then one
        # scalar loop interleaves them into the channel-last output row
        lb = np.empty((3, nx), np.float32)
        e0 = lb[0]
        e1b = lb[1]
        e2b = lb[2]
        for line in range(l0, l1):
            z = line // ny
            y = line - z * ny
            o = out[z, y]
            for grp in range(idxs.shape[0]):
                _emit_group(planes, o, idxs[grp], offss[grp], nd, z, y, e0, e1b, e2b)


@njit(inline="always", **_JIT)
def _emit_group(planes, o, idx, offs, nd, z, y, e0, e1b, e2b):
    # one σ group for output row o = out[z, y] (shape (nx, C))
    nx = o.shape[0]
    if offs[0] >= 0:
        c = offs[0]
        s = planes[idx[0], z, y]
        for x in range(nx):
            o[x, c] = s[x]
    if offs[1] >= 0:
        c = offs[1]
        h0 = planes[idx[5], z, y]
        h1 = planes[idx[6], z, y]
        if nd == 3:
            h2 = planes[idx[7], z, y]
            for x in range(nx):
                o[x, c] = h0[x] + h1[x] + h2[x]
        else:
            for x in range(nx):
                o[x, c] = h0[x] + h1[x]
    if offs[2] >= 0:
        c = offs[2]
        g0 = planes[idx[2], z, y]
        g1 = planes[idx[3], z, y]
        if nd == 3:
            g2 = planes[idx[4], z, y]
            for x in range(nx):
                e0[x] = np.sqrt(g0[x] * g0[x] + g1[x] * g1[x] + g2[x] * g2[x])
        else:
            for x in range(nx):
                e0[x] = np.sqrt(g0[x] * g0[x] + g1[x] * g1[x])
        for x in range(nx):
            o[x, c] = e0[x]
    if offs[3] >= 0:
        c = offs[3]
        s = planes[idx[0], z, y]
        d = planes[idx[1], z, y]
        for x in range(nx):
            o[x, c] = s[x] - d[x]
    for f in range(2):
        c = offs[4 + f]
        if c < 0:
            continue
        base = 11 if f == 0 else 5
        t00 = planes[idx[base], z, y]
        t11 = planes[idx[base + 1], z, y]
        t01 = planes[idx[base + 3], z, y]
        if nd == 3:
            t22 = planes[idx[base + 2], z, y]
            t02 = planes[idx[base + 4], z, y]
            t12 = planes[idx[base + 5], z, y]
            for x in range(nx):
                v1, v2, v3 = _eig3(
                    np.float64(t00[x]),
                    np.float64(t11[x]),
                    np.float64(t22[x]),
                    np.float64(t01[x]),
                    np.float64(t02[x]),
                    np.float64(t12[x]),
                )
                e0[x] = v1
                e1b[x] = v2
                e2b[x] = v3
            for x in range(nx):
                o[x, c] = e0[x]
                o[x, c + 1] = e1b[x]
                o[x, c + 2] = e2b[x]
        else:
            for x in range(nx):
                v1, v2 = _eig2(np.float64(t00[x]), np.float64(t11[x]), np.float64(t01[x]))
                e0[x] = v1
                e1b[x] = v2
            for x in range(nx):
                o[x, c] = e0[x]
                o[x, c + 1] = e1b[x]


@njit(parallel=True, **_JIT)
def _eigvals_sym2(a00, a11, a01, out):
    n = a00.shape[0]
    for i in prange(n):
        e1, e2 = _eig2(np.float64(a00[i]), np.float64(a11[i]), np.float64(a01[i]))
        out[i, 0] = e1
        out[i, 1] = e2


@njit(parallel=True, **_JIT)
def _eigvals_sym3(a00, a11, a22, a01, a02, a12, out):
    n = a00.shape[0]
    for i in prange(n):
        e1, e2, e3 = _eig3(
            np.float64(a00[i]),
            np.float64(a11[i]),
            np.float64(a22[i]),
            np.float64(a01[i]),
            np.float64(a02[i]),
            np.float64(a12[i]),
        )
        out[i, 0] = e1
        out[i, 1] = e2
        out[i, 2] = e3


def eigvals_sym2(a00: np.ndarray, a11: np.ndarray, a01: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of symmetric 2x2 matrices given elementwise.

    Returns float32 array of shape ``a00.shape + (2,)``.
    """
    a = [np.ascontiguousarray(v, dtype=np.float32).ravel() for v in (a00, a11, a01)]
    out = np.empty((a[0].size, 2), np.float32)
    _eigvals_sym2(*a, out)
    return out.reshape(np.shape(a00) + (2,))


def eigvals_sym3(
    a00: np.ndarray, a11: np.ndarray, a22: np.ndarray, a01: np.ndarray, a02: np.ndarray, a12: np.ndarray
) -> np.ndarray:
    """Eigenvalues (descending) of symmetric 3x3 matrices given elementwise.

    Closed-form trigonometric method in float64; returns float32 of shape
    ``a00.shape + (3,)``.
    """
    a = [np.ascontiguousarray(v, dtype=np.float32).ravel() for v in (a00, a11, a22, a01, a02, a12)]
    out = np.empty((a[0].size, 3), np.float32)
    _eigvals_sym3(*a, out)
    return out.reshape(np.shape(a00) + (3,))


# --------------------------------------------------------------------------- python driver
class _Pool:
    """Free-list of float32 scratch arrays of one shape (avoids page faults)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.free: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        return self.free.pop() if self.free else np.empty(self.shape, np.float32)

    def put(self, a: np.ndarray) -> None:
        self.free.append(a)


_DUMMY = np.zeros((1, 1, 1), np.float32)


def _half_kernels(sigma: float, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(_half_kernel(sigma, o, radius) for o in range(3))  # type: ignore[return-value]


def _zrows(a: np.ndarray, target: int = 4096) -> np.ndarray:
    """View (nz, ny, nx) as (nz, ny/B, B*nx) with B*nx <= target (B divides ny)."""
    nz, ny, nx = a.shape
    b = 1
    for cand in range(max(1, min(ny, target // max(nx, 1))), 0, -1):
        if ny % cand == 0:
            b = cand
            break
    return a.reshape(nz, ny // b, nx * b)


def _derivative_tree(
    src: np.ndarray,
    faxes: Sequence[int],
    sigma: float,
    radius: int,
    needed: dict[tuple[int, ...], np.ndarray],
    pool: _Pool,
) -> None:
    """Compute every derivative plane in ``needed`` (orders per filtered axis -> dst).

    Fused passes along ``faxes`` in order; intermediate planes are shared by all
    leaves with the same leading orders.
    """
    h = _half_kernels(sigma, radius)

    def rec(arr: np.ndarray, level: int, prefix: tuple[int, ...]) -> None:
        orders = sorted({m[level] for m in needed if m[:level] == prefix})
        last = level == len(faxes) - 1
        dsts: list[np.ndarray] = [_DUMMY, _DUMMY, _DUMMY]
        mode = 0
        for o in orders:
            dsts[o] = needed[prefix + (o,)] if last else pool.get()
            mode |= 1 << o
        ax = faxes[level]
        if ax == 0:
            # z pass: the result is elementwise in (y, x), so merge several
            # contiguous y rows into one long "row" (better streaming/prefetch)
            v = [_zrows(a) if a is not _DUMMY else a for a in (arr, *dsts)]
            _pass(v[0], v[1], v[2], v[3], h[0], h[1], h[2], 0, mode)
        else:
            _pass(arr, dsts[0], dsts[1], dsts[2], h[0], h[1], h[2], ax, mode)
        if not last:
            for o in orders:
                rec(dsts[o], level + 1, prefix + (o,))
                pool.put(dsts[o])

    rec(src, 0, ())


def _orders(nd: int, *axes_orders: tuple[int, int]) -> tuple[int, ...]:
    m = [0] * nd
    for ax, o in axes_orders:
        m[ax] += o
    return tuple(m)


def _group_by_sigma(selection: Sequence[tuple[str, float]]) -> list[tuple[float, list[int]]]:
    groups: list[tuple[float, list[int]]] = []
    for i, (_, s) in enumerate(selection):
        for gs, members in groups:
            if math.isclose(gs, float(s)):
                members.append(i)
                break
        else:
            groups.append((float(s), [i]))
    return groups


def compute_features(
    image: np.ndarray, selection: Sequence[tuple[str, float]], *, in_2d: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Compute a selection of ilastik filter features.

    Parameters
    ----------
    image : ndarray, shape ``(*spatial, C)``
        2-D (yx) or 3-D (zyx) spatial axes plus a trailing channel axis (always
        present, C >= 1).  Any integer or float dtype.
    selection : sequence of (feature_id, sigma)
        Features in output order; ids and scales as in
        :mod:`operators.kernels.feature_table`.
    in_2d : bool
        For 3-D input: filter each z-slice independently (no smoothing along z);
        eigenvalue features then have 2 channels.
    out : ndarray, optional
        float32 array of shape ``(*spatial, n_out)`` to write into.

    Returns
    -------
    ndarray, float32, shape ``(*spatial, n_out)``
        For each input channel, for each selection entry in order, that
        feature's channels (eigenvalues descending).

    Raises
    ------
    ValueError
        Unknown feature, invalid σ, wrong dimensionality, or an axis too short
        for a kernel (see :func:`feature_table.validate`).
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (*spatial, C) with 2 or 3 spatial axes, got shape {image.shape}")
    spatial = image.shape[:-1]
    nch = image.shape[-1]
    selection = [(str(f), float(s)) for f, s in selection]
    ft.validate(selection, spatial, in_2d)
    nd_sp = len(spatial)
    nd = 2 if (in_2d or nd_sp == 2) else 3
    per = sum(ft.n_channels(f, nd) for f, _ in selection)
    n_out = per * nch
    if out is None:
        out = np.empty(spatial + (n_out,), np.float32)
    else:
        if out.shape != spatial + (n_out,) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {spatial + (n_out,)}, got {out.dtype} {out.shape}")
    if n_out == 0:
        return out
    shape3 = (1,) + spatial if nd_sp == 2 else spatial
    # a view (never a copy, even for a non-contiguous ``out``)
    out4 = out[np.newaxis] if nd_sp == 2 else out
    faxes = (1, 2) if nd == 2 else (0, 1, 2)
    offsets = np.cumsum([0] + [ft.n_channels(f, nd) for f, _ in selection])[:-1]
    plans = [
        _plan_group(sigma, [(selection[i][0], int(offsets[i])) for i in members], nd)
        for sigma, members in _group_by_sigma(selection)
    ]
    # Batch σ groups so one _emit writes several groups: every emit reads and
    # writes every cache line of the channel-last output, so fewer emits = less
    # memory traffic.  Batches are limited by the scratch-plane budget.
    plane_bytes = 4 * int(np.prod(shape3))
    cap = max(max(p.nplanes for p in plans), PLANES_BUDGET_BYTES // max(plane_bytes, 1))
    batches: list[list[_GroupPlan]] = [[]]
    for p in plans:
        if batches[-1] and sum(q.nplanes for q in batches[-1]) + p.nplanes > cap:
            batches.append([])
        batches[-1].append(p)
    n_planes = max(sum(q.nplanes for q in b) for b in batches)

    planes, pool = _take_scratch(shape3, n_planes)
    try:
        for c in range(nch):
            src = np.ascontiguousarray(image[..., c], dtype=np.float32).reshape(shape3)
            if not src.flags.writeable:
                # a read-only view (e.g. a cached engine block of a float32 image): the kernels'
                # compiled signatures take writable arrays, and numba rejects read-only ones
                src = src.copy()
            for batch in batches:
                idx = np.full((len(batch), 17), -1, np.int64)
                offs = np.full((len(batch), 6), -1, np.int64)
                base = 0
                for g, plan in enumerate(batch):
                    idx[g] = np.where(plan.idx >= 0, plan.idx + base, -1)
                    offs[g] = np.where(plan.offs >= 0, plan.offs + c * per, -1)
                    _compute_group(src, plan, planes, idx[g], faxes, nd, pool)
                    base += plan.nplanes
                _emit(planes, out4, idx, offs, nd)
                for plan in batch:
                    for fid, src_off, dst_off in plan.dups:
                        # the same (feature, σ) selected twice: copy the channels
                        n = ft.n_channels(fid, nd)
                        out[..., c * per + dst_off : c * per + dst_off + n] = out[
                            ..., c * per + src_off : c * per + src_off + n
                        ]
    finally:
        _give_scratch(shape3, planes, pool)
    return out


#: Max bytes of derivative planes kept alive to batch σ groups into one emit
#: (at least one group is always processed).
PLANES_BUDGET_BYTES: int = 1536 * 2**20
#: Scratch (planes + temporaries) kept between calls to avoid page faults on
#: re-allocation; set to 0 to release everything after each call.
SCRATCH_KEEP_BYTES: int = 1536 * 2**20

_SCRATCH_LOCK = threading.Lock()
_SCRATCH: list[tuple[tuple[int, ...], np.ndarray, _Pool]] = []


def _take_scratch(shape3: tuple[int, ...], n_planes: int) -> tuple[np.ndarray, _Pool]:
    """Planes array and temporaries pool for ``shape3`` (reused when cached)."""
    with _SCRATCH_LOCK:
        for i, (shp, planes, pool) in enumerate(_SCRATCH):
            if shp == shape3 and planes.shape[0] >= n_planes:
                del _SCRATCH[i]
                return planes[:n_planes], pool
    return np.empty((n_planes,) + shape3, np.float32), _Pool(shape3)


def _give_scratch(shape3: tuple[int, ...], planes: np.ndarray, pool: _Pool) -> None:
    base = planes if planes.base is None else planes.base
    nbytes = base.nbytes + sum(a.nbytes for a in pool.free)
    with _SCRATCH_LOCK:
        if nbytes > SCRATCH_KEEP_BYTES:
            return
        # most recent first; drop older entries beyond the budget
        _SCRATCH.insert(0, (shape3, base, pool))
        total = 0
        for i, (_, pl, po) in enumerate(_SCRATCH):
            total += pl.nbytes + sum(a.nbytes for a in po.free)
            if total > SCRATCH_KEEP_BYTES:
                del _SCRATCH[i:]
                break


def clear_scratch() -> None:
    """Release the scratch buffers cached between :func:`compute_features` calls."""
    with _SCRATCH_LOCK:
        _SCRATCH.clear()


class _GroupPlan:
    """What one σ group computes: plane slots, channel offsets, duplicates."""

    def __init__(self, sigma: float, feats: dict[str, int], dups: list[tuple[str, int, int]], nd: int):
        self.sigma = sigma
        self.feats = feats
        self.dups = dups
        self.need_s = "GaussianSmoothing" in feats or "DifferenceOfGaussians" in feats
        self.need_d = "DifferenceOfGaussians" in feats
        self.need_g = "GaussianGradientMagnitude" in feats or "StructureTensorEigenvalues" in feats
        self.need_hd = "LaplacianOfGaussian" in feats or "HessianOfGaussianEigenvalues" in feats
        self.need_ho = "HessianOfGaussianEigenvalues" in feats
        self.need_st = "StructureTensorEigenvalues" in feats
        # plane layout (see _emit): diagonal tensor entries at base+axis,
        # off-diagonal (01, 02, 12) at base+3+k
        self.pairs = [(0, 1), (0, 2), (1, 2)] if nd == 3 else [(0, 1)]
        slots: list[int] = []
        if self.need_s:
            slots.append(0)
        if self.need_d:
            slots.append(1)
        for a in range(nd):
            if self.need_g:
                slots.append(2 + a)
            if self.need_hd:
                slots.append(5 + a)
        if self.need_ho:
            slots.extend(8 + k for k in range(len(self.pairs)))
        if self.need_st:
            slots.extend(11 + a for a in range(nd))
            slots.extend(14 + k for k in range(len(self.pairs)))
        self.idx = np.full(17, -1, np.int64)
        self.idx[slots] = np.arange(len(slots))
        self.nplanes = len(slots)
        self.offs = np.array([feats.get(fid, -1) for fid in ft.FEATURE_IDS], np.int64)


def _plan_group(sigma: float, members: list[tuple[str, int]], nd: int) -> _GroupPlan:
    feats: dict[str, int] = {}
    dups: list[tuple[str, int, int]] = []
    for fid, off in members:
        if fid in feats:
            dups.append((fid, feats[fid], off))
        else:
            feats[fid] = off
    return _GroupPlan(sigma, feats, dups, nd)


def _compute_group(
    src: np.ndarray, plan: _GroupPlan, planes: np.ndarray, idx: np.ndarray, faxes: tuple[int, ...], nd: int, pool: _Pool
) -> None:
    """Fill the planes of one σ group (absolute plane indices ``idx``)."""
    sigma = plan.sigma
    needed: dict[tuple[int, ...], np.ndarray] = {}
    if plan.need_s:
        needed[(0,) * nd] = planes[idx[0]]
    for a in range(nd):
        if plan.need_g:
            needed[_orders(nd, (a, 1))] = planes[idx[2 + a]]
        if plan.need_hd:
            needed[_orders(nd, (a, 2))] = planes[idx[5 + a]]
    if plan.need_ho:
        for k, (i, j) in enumerate(plan.pairs):
            needed[_orders(nd, (i, 1), (j, 1))] = planes[idx[8 + k]]
    if needed:
        _derivative_tree(src, faxes, sigma, ft.kernel_radius(sigma), needed, pool)
    if plan.need_d:
        s2 = ft.DOG_RATIO * sigma
        _derivative_tree(src, faxes, s2, ft.kernel_radius(s2), {(0,) * nd: planes[idx[1]]}, pool)
    if plan.need_st:
        gi = np.array([idx[2 + a] for a in range(nd)], np.int64)
        si = np.array([idx[11 + a] for a in range(nd)] + [idx[14 + k] for k in range(len(plan.pairs))], np.int64)
        _products(planes, gi, si)
        so = ft.ST_OUTER_RATIO * sigma
        ro = ft.kernel_radius(so)
        for p in si:
            # in place: the first pass reads the plane, the last one writes it
            _derivative_tree(planes[p], faxes, so, ro, {(0,) * nd: planes[p]}, pool)


# --------------------------------------------------------------------------- public filters
def gaussian(
    image: np.ndarray,
    sigma: float,
    *,
    order: int | Sequence[int] = 0,
    axes: Sequence[int] | None = None,
    out: np.ndarray | None = None,
    truncate: float = ft.TRUNCATE,
) -> np.ndarray:
    """Separable Gaussian (derivative) filter, float32, scipy ``mode='reflect'``.

    Parameters
    ----------
    image : ndarray
        Any dimensionality and real dtype.
    sigma : float
        Scale (same for all filtered axes), > 0.
    order : int or sequence of int
        Derivative order (0, 1 or 2), one for all filtered axes or one per
        filtered axis.
    axes : sequence of int, optional
        Axes to filter; default all.
    out : ndarray, optional
        float32 output of the image's shape.
    truncate : float
        Kernel radius is ``ceil(truncate * sigma)`` (scipy would use
        ``int(truncate * sigma + 0.5)``).

    Returns
    -------
    ndarray, float32
        Same as ``scipy.ndimage.gaussian_filter(image, sigma, order, mode='reflect',
        radius=ceil(truncate*sigma), axes=axes)`` up to float32 rounding.
    """
    img = np.asarray(image)
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    nd = img.ndim
    axes_t = tuple(range(nd)) if axes is None else tuple(int(a) % nd for a in axes)
    orders = (int(order),) * len(axes_t) if np.isscalar(order) else tuple(int(o) for o in order)
    if len(orders) != len(axes_t):
        raise ValueError("order must be an int or have one entry per filtered axis")
    if any(o < 0 or o > 2 for o in orders):
        raise ValueError("derivative orders must be 0, 1 or 2")
    if out is not None and (out.shape != img.shape or out.dtype != np.float32):
        raise ValueError("out must be float32 with the image's shape")
    radius = ft.kernel_radius(sigma, truncate)
    h = _half_kernels(sigma, radius)
    # may alias the input: it is only ever read, passes ping-pong between two scratch arrays
    cur = np.ascontiguousarray(img, dtype=np.float32)
    scratch: list[np.ndarray | None] = [None, None]
    for step, (ax, o) in enumerate(zip(axes_t, orders)):
        pre = int(np.prod(img.shape[:ax], dtype=np.int64))
        post = int(np.prod(img.shape[ax + 1 :], dtype=np.int64))
        n = img.shape[ax]
        # view as 3-D so the pass runs along axis 1 (strided) or 2 (contiguous)
        shp3, a3 = ((1, pre, n), 2) if post == 1 else ((pre, n, post), 1)
        if scratch[step % 2] is None:
            scratch[step % 2] = np.empty(img.shape, np.float32)
        dst = scratch[step % 2]
        dsts = [_DUMMY, _DUMMY, _DUMMY]
        dsts[o] = dst.reshape(shp3)
        _pass(cur.reshape(shp3), dsts[0], dsts[1], dsts[2], h[0], h[1], h[2], a3, 1 << o)
        cur = dst
    if out is not None:
        out[...] = cur
        return out
    return cur.copy() if scratch[0] is None else cur


def _single(img: np.ndarray, fid: str, sigma: float, in_2d: bool) -> np.ndarray:
    img = np.asarray(img)
    res = compute_features(img[..., None], [(fid, sigma)], in_2d=in_2d)
    return res[..., 0] if res.shape[-1] == 1 and not ft.is_eigen_feature(fid) else res


def gaussian_smoothing(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """Gaussian smoothing of a 2-D/3-D spatial array (float32, same shape)."""
    return _single(img, "GaussianSmoothing", sigma, in_2d)


def laplacian_of_gaussian(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """Sum of the second Gaussian derivatives along the filtered axes."""
    return _single(img, "LaplacianOfGaussian", sigma, in_2d)


def gaussian_gradient_magnitude(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """Euclidean norm of the Gaussian gradient."""
    return _single(img, "GaussianGradientMagnitude", sigma, in_2d)


def difference_of_gaussians(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """``G(sigma) - G(0.66 sigma)``."""
    return _single(img, "DifferenceOfGaussians", sigma, in_2d)


def structure_tensor_eigenvalues(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """Eigenvalues (descending, trailing axis of size ndim) of the structure tensor.

    Gradient at scale ``sigma`` (inner), tensor products smoothed at ``0.5*sigma``.
    """
    return _single(img, "StructureTensorEigenvalues", sigma, in_2d)


def hessian_of_gaussian_eigenvalues(img: np.ndarray, sigma: float, *, in_2d: bool = False) -> np.ndarray:
    """Eigenvalues (descending, trailing axis of size ndim) of the Gaussian Hessian."""
    return _single(img, "HessianOfGaussianEigenvalues", sigma, in_2d)
