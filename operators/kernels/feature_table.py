"""Pure-python description of ilastik's pixel-classification filter features.

This module knows *what* the features are (ids, valid scales, number and names
of output channels, halo, validation); it does no numerics and imports neither
numba nor cupy, so the operator layer can plan ROIs and output specs cheaply.

Kernel radius convention
------------------------
Every Gaussian (derivative) kernel of scale ``sigma`` has radius
``r = ceil(TRUNCATE * sigma)`` with ``TRUNCATE = 3.5`` (ilastik's window size).
scipy's default would be ``int(truncate * sigma + 0.5)``; the kernels and the
test references both pass the radius explicitly so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "FEATURE_IDS",
    "SCALES",
    "TRUNCATE",
    "DOG_RATIO",
    "ST_OUTER_RATIO",
    "FEATURE_NAMES",
    "kernel_radius",
    "valid_sigmas",
    "is_eigen_feature",
    "n_channels",
    "n_output_channels",
    "channel_names",
    "halo",
    "validate",
    "all_features_selection",
]

#: Feature ids, exactly as ilastik spells them, in ilastik's display order.
FEATURE_IDS: tuple[str, ...] = (
    "GaussianSmoothing",
    "LaplacianOfGaussian",
    "GaussianGradientMagnitude",
    "DifferenceOfGaussians",
    "StructureTensorEigenvalues",
    "HessianOfGaussianEigenvalues",
)

#: Human readable names used to build channel names.
FEATURE_NAMES: dict[str, str] = {
    "GaussianSmoothing": "Gaussian Smoothing",
    "LaplacianOfGaussian": "Laplacian of Gaussian",
    "GaussianGradientMagnitude": "Gaussian Gradient Magnitude",
    "DifferenceOfGaussians": "Difference of Gaussians",
    "StructureTensorEigenvalues": "Structure Tensor Eigenvalues",
    "HessianOfGaussianEigenvalues": "Hessian of Gaussian Eigenvalues",
}

#: The scales ilastik offers.
SCALES: tuple[float, ...] = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)

#: Kernel half-width in units of sigma.
TRUNCATE: float = 3.5
#: Difference of Gaussians is ``G(sigma) - G(DOG_RATIO * sigma)``.
DOG_RATIO: float = 0.66
#: Structure tensor products are smoothed with ``ST_OUTER_RATIO * sigma``.
ST_OUTER_RATIO: float = 0.5

_EIGEN = ("StructureTensorEigenvalues", "HessianOfGaussianEigenvalues")


def kernel_radius(sigma: float, truncate: float = TRUNCATE) -> int:
    """Radius ``ceil(truncate * sigma)`` of the Gaussian kernel of scale ``sigma``.

    A tiny tolerance keeps e.g. ``3.5 * 2.0 = 7.000000000000001`` at 7.
    """
    return int(math.ceil(truncate * float(sigma) - 1e-9))


def valid_sigmas(feature_id: str) -> tuple[float, ...]:
    """Scales allowed for ``feature_id`` (σ=0.3 only for smoothing, like ilastik)."""
    _check_id(feature_id)
    if feature_id == "GaussianSmoothing":
        return SCALES
    return SCALES[1:]


def is_eigen_feature(feature_id: str) -> bool:
    """True for the eigenvalue features (one channel per spatial axis)."""
    _check_id(feature_id)
    return feature_id in _EIGEN


def n_channels(feature_id: str, ndim_spatial: int) -> int:
    """Number of output channels of one feature at one scale.

    Parameters
    ----------
    feature_id : str
        One of :data:`FEATURE_IDS`.
    ndim_spatial : int
        Number of *filtered* spatial axes (2 for 2D and for 3D computed ``in_2d``).
    """
    _check_id(feature_id)
    if ndim_spatial not in (2, 3):
        raise ValueError(f"ndim_spatial must be 2 or 3, got {ndim_spatial}")
    return ndim_spatial if feature_id in _EIGEN else 1


def n_output_channels(selection: Sequence[tuple[str, float]], ndim_spatial: int, n_input_channels: int = 1) -> int:
    """Total channels produced by :func:`compute_features` for ``selection``."""
    per = sum(n_channels(fid, ndim_spatial) for fid, _ in selection)
    return per * int(n_input_channels)


def _fmt_sigma(sigma: float) -> str:
    # ilastik shows the scale as a float: 1 -> "1.0", 0.7 -> "0.7".
    return repr(float(sigma))


def channel_names(
    selection: Sequence[tuple[str, float]],
    ndim_spatial: int,
    in_2d: bool = False,
    n_input_channels: int = 1,
    input_channel_names: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """ilastik-style channel names, in the order :func:`compute_features` writes them.

    Parameters
    ----------
    selection : sequence of (feature_id, sigma)
        Features in output order.
    ndim_spatial : int
        Spatial dimensionality of the *input* (2 or 3).
    in_2d : bool
        3D input filtered slice by slice; names get the suffix ``" in 2D"`` and
        eigenvalue features have two channels.
    n_input_channels : int
        Channels of the input; output is ordered input channel major.
    input_channel_names : sequence of str, optional
        When given and there is more than one input channel, names are
        prefixed with ``"<input name>: "`` so they stay unique.

    Returns
    -------
    tuple of str
    """
    nd = 2 if (in_2d or ndim_spatial == 2) else 3
    suffix = " in 2D" if (in_2d and ndim_spatial == 3) else ""
    base: list[str] = []
    for fid, sigma in selection:
        name = f"{FEATURE_NAMES[_check_id(fid)]} (σ={_fmt_sigma(sigma)})"
        if fid in _EIGEN:
            base.extend(f"{name}{suffix} [{i}]" for i in range(nd))
        else:
            base.append(f"{name}{suffix}")
    if input_channel_names is not None and len(input_channel_names) != n_input_channels:
        raise ValueError("input_channel_names must have n_input_channels entries")
    if n_input_channels == 1:
        return tuple(base)
    out: list[str] = []
    for c in range(n_input_channels):
        prefix = input_channel_names[c] if input_channel_names is not None else f"channel {c}"
        out.extend(f"{prefix}: {b}" for b in base)
    return tuple(out)


def halo(selection: Sequence[tuple[str, float]]) -> int:
    """Margin (pixels per side) that makes ROI computation exact.

    An output pixel depends only on input pixels within ``halo`` of it: the
    Gaussian radius ``ceil(3.5σ)`` plus, for the structure tensor, the radius
    ``ceil(3.5·0.5σ)`` of the outer smoothing (the two passes chain).  Difference
    of Gaussians uses ``0.66σ`` < σ, so the σ radius covers it.
    """
    h = 0
    for fid, sigma in selection:
        _check_id(fid)
        r = kernel_radius(sigma)
        if fid == "StructureTensorEigenvalues":
            r += kernel_radius(ST_OUTER_RATIO * sigma)
        h = max(h, r)
    return h


def validate(selection: Sequence[tuple[str, float]], spatial_shape: Sequence[int], in_2d: bool = False) -> None:
    """Raise ``ValueError`` if ``selection`` cannot be computed on ``spatial_shape``.

    Checks: known feature ids, σ allowed for the feature, 2 or 3 spatial axes,
    ``in_2d`` only for 3D, and every filtered axis long enough for the kernel
    (``ceil(3.5σ) + 1 <= length``; z is not filtered when ``in_2d``).
    """
    spatial_shape = tuple(int(n) for n in spatial_shape)
    nd = len(spatial_shape)
    if nd not in (2, 3):
        raise ValueError(f"expected 2 or 3 spatial axes, got shape {spatial_shape}")
    if in_2d and nd != 3:
        raise ValueError("in_2d=True requires a 3D (zyx) input")
    axis_names = "yx" if nd == 2 else "zyx"
    filtered = range(1, 3) if in_2d else range(nd)
    for item in selection:
        try:
            fid, sigma = item
        except (TypeError, ValueError):
            raise ValueError(f"selection entries must be (feature_id, sigma), got {item!r}") from None
        _check_id(fid)
        if not any(math.isclose(float(sigma), s) for s in valid_sigmas(fid)):
            raise ValueError(
                f"scale σ={sigma} is not allowed for {fid}; valid scales: {', '.join(map(str, valid_sigmas(fid)))}"
            )
        need = kernel_radius(sigma) + 1
        for ax in filtered:
            if need > spatial_shape[ax]:
                raise ValueError(
                    f"scale σ={sigma} of {fid} needs at least {need} pixels along axis "
                    f"'{axis_names[ax]}' (axis {ax}), but it has {spatial_shape[ax]}"
                )


def all_features_selection() -> list[tuple[str, float]]:
    """ilastik's "select all" feature matrix: every feature at every valid scale."""
    return [(fid, s) for fid in FEATURE_IDS for s in valid_sigmas(fid)]


def _check_id(feature_id: str) -> str:
    if feature_id not in FEATURE_NAMES:
        raise ValueError(f"unknown feature id {feature_id!r}; known: {', '.join(FEATURE_IDS)}")
    return feature_id
