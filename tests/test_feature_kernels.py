"""Tests of the CPU filter-feature kernels against a float64 scipy/numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from operators.kernels import feature_table as ft
from operators.kernels import features_cpu as fc
from operators.kernels.reference import ref_compute_features, ref_feature, ref_gaussian

RTOL = 1e-4
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the max abs of the reference (per call)."""
    scale = float(np.abs(ref).max())
    return float(np.abs(got.astype(np.float64) - ref).max()) / (scale if scale > 0 else 1.0)


def per_channel_rel_err(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ax = tuple(range(ref.ndim - 1))
    scale = np.abs(ref).max(axis=ax)
    scale[scale == 0] = 1.0
    return np.abs(got.astype(np.float64) - ref).max(axis=ax) / scale


@pytest.fixture(scope="module")
def img2d() -> np.ndarray:
    return np.random.default_rng(1).random((83, 77))


@pytest.fixture(scope="module")
def img3d() -> np.ndarray:
    return np.random.default_rng(2).random((38, 41, 37))


# ----------------------------------------------------------------------------- gaussian
@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.6, 3.5, 10.0])
@pytest.mark.parametrize("order", [0, 1, 2, (1, 0), (0, 2), (2, 1)])
def test_gaussian_2d_matches_scipy(img2d: np.ndarray, sigma: float, order) -> None:
    got = fc.gaussian(img2d, sigma, order=order)
    assert got.dtype == np.float32 and got.shape == img2d.shape
    assert rel_err(got, ref_gaussian(img2d, sigma, order)) < RTOL


@pytest.mark.parametrize("sigma", [0.7, 3.5])
@pytest.mark.parametrize("order", [0, (1, 0, 0), (0, 1, 1), (0, 0, 2), (1, 1, 1)])
def test_gaussian_3d_matches_scipy(img3d: np.ndarray, sigma: float, order) -> None:
    got = fc.gaussian(img3d, sigma, order=order)
    assert rel_err(got, ref_gaussian(img3d, sigma, order)) < RTOL


def test_gaussian_axes_out_and_dtype(img3d: np.ndarray) -> None:
    u8 = (img3d * 255).astype(np.uint8)
    out = np.empty(u8.shape, np.float32)
    res = fc.gaussian(u8, 1.6, order=(1, 2), axes=(0, 2), out=out)
    assert res is out
    ref = ref_gaussian(u8, 1.6, (1, 2), axes=(0, 2))
    assert rel_err(out, ref) < RTOL
    # 1-D and no-op input is not modified
    x = np.arange(20, dtype=np.float32)
    y = fc.gaussian(x, 1.0)
    assert not np.shares_memory(x, y)
    assert rel_err(y, ref_gaussian(x, 1.0)) < RTOL
    assert np.array_equal(x, np.arange(20, dtype=np.float32))


def test_gaussian_radius_is_ceil() -> None:
    # a unit impulse shows the support: radius ceil(3.5*1.6) = 6 (scipy default: 6),
    # ceil(3.5*0.7) = 3 (scipy default int(2.95) = 2)
    for sigma, r in [(1.6, 6), (0.7, 3), (10.0, 35)]:
        x = np.zeros(2 * r + 11, np.float32)
        x[r + 5] = 1
        nz = np.flatnonzero(fc.gaussian(x, sigma))
        assert nz.min() == 5 and nz.max() == 2 * r + 5
        assert ft.kernel_radius(sigma) == r


# ----------------------------------------------------------------------------- features
FEATURES = list(ft.FEATURE_IDS)
FUNCS = {
    "GaussianSmoothing": fc.gaussian_smoothing,
    "LaplacianOfGaussian": fc.laplacian_of_gaussian,
    "GaussianGradientMagnitude": fc.gaussian_gradient_magnitude,
    "DifferenceOfGaussians": fc.difference_of_gaussians,
    "StructureTensorEigenvalues": fc.structure_tensor_eigenvalues,
    "HessianOfGaussianEigenvalues": fc.hessian_of_gaussian_eigenvalues,
}


@pytest.mark.parametrize("fid", FEATURES)
@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.5, 10.0])
def test_feature_2d(img2d: np.ndarray, fid: str, sigma: float) -> None:
    got = FUNCS[fid](img2d, sigma)
    ref = ref_feature(img2d, fid, sigma)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel_err(got, ref) < RTOL


@pytest.mark.parametrize("fid", FEATURES)
@pytest.mark.parametrize("sigma", [0.7, 3.5, 10.0])
def test_feature_3d(img3d: np.ndarray, fid: str, sigma: float) -> None:
    got = FUNCS[fid](img3d, sigma)
    ref = ref_feature(img3d, fid, sigma)
    assert got.shape == ref.shape
    assert np.all(per_channel_rel_err(got, ref) < RTOL)


@pytest.mark.parametrize("fid", FEATURES)
@pytest.mark.parametrize("sigma", [1.6, 5.0])
def test_feature_3d_in_2d(fid: str, sigma: float) -> None:
    img = np.random.default_rng(3).random((4, 40, 45))
    got = FUNCS[fid](img, sigma, in_2d=True)
    ref = ref_feature(img, fid, sigma, in_2d=True)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < RTOL
    # slices are independent: equal to filtering each slice as a 2D image
    for z in range(img.shape[0]):
        assert np.array_equal(got[z], FUNCS[fid](img[z], sigma))


def test_gaussian_smoothing_sigma_03(img2d: np.ndarray) -> None:
    assert rel_err(fc.gaussian_smoothing(img2d, 0.3), ref_feature(img2d, "GaussianSmoothing", 0.3)) < RTOL


def test_full_selection_multichannel_2d() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 255, size=(72, 70, 2), dtype=np.uint8)
    sel = ft.all_features_selection()
    got = fc.compute_features(img, sel)
    ref = ref_compute_features(img, sel)
    assert got.shape == (72, 70, 2 * 49) and got.dtype == np.float32
    names = ft.channel_names(sel, 2, n_input_channels=2)
    assert len(names) == got.shape[-1]
    err = per_channel_rel_err(got, ref)
    assert np.all(err < RTOL), names[int(err.argmax())]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float64])
def test_multichannel_3d_dtypes(dtype) -> None:
    rng = np.random.default_rng(5)
    img = (rng.random((20, 22, 24, 3)) * 1000 - (0 if np.dtype(dtype).kind == "u" else 500)).astype(dtype)
    sel = [
        ("HessianOfGaussianEigenvalues", 1.0),
        ("GaussianSmoothing", 0.3),
        ("DifferenceOfGaussians", 1.6),
        ("StructureTensorEigenvalues", 0.7),
        ("GaussianGradientMagnitude", 1.0),
        ("LaplacianOfGaussian", 3.5),
    ]
    got = fc.compute_features(img, sel)
    ref = ref_compute_features(img, sel)
    assert got.shape == (20, 22, 24, 3 * (3 + 1 + 1 + 3 + 1 + 1))
    assert np.all(per_channel_rel_err(got, ref) < RTOL)


def test_output_order_and_out_param(img2d: np.ndarray) -> None:
    img = np.stack([img2d, 2 * img2d[::-1]], axis=-1).astype(np.float32)
    sel = [
        ("StructureTensorEigenvalues", 1.0),
        ("GaussianSmoothing", 1.0),
        ("GaussianSmoothing", 3.5),
        ("StructureTensorEigenvalues", 1.0),
    ]
    out = np.full(img.shape[:2] + (12,), np.nan, np.float32)
    res = fc.compute_features(img, sel, out=out)
    assert res is out
    for c in range(2):
        b = 6 * c
        st = fc.structure_tensor_eigenvalues(img[..., c], 1.0)
        assert np.array_equal(out[..., b : b + 2], st)
        assert np.array_equal(out[..., b + 2], fc.gaussian_smoothing(img[..., c], 1.0))
        assert np.array_equal(out[..., b + 3], fc.gaussian_smoothing(img[..., c], 3.5))
        assert np.array_equal(out[..., b + 4 : b + 6], st)
    # a non-contiguous out (channel slice of a bigger array) is written in place
    big = np.zeros(img.shape[:2] + (20,), np.float32)
    fc.compute_features(img, sel, out=big[..., 4:16])
    assert np.array_equal(big[..., 4:16], out)
    with pytest.raises(ValueError, match="out must be float32"):
        fc.compute_features(img, sel, out=np.empty(img.shape[:2] + (11,), np.float32))


def test_scratch_and_batching_do_not_change_results(monkeypatch) -> None:
    img = np.random.default_rng(12).random((40, 38, 36, 1)).astype(np.float32)
    sel = ft.all_features_selection()
    ref = fc.compute_features(img, sel)
    # one σ group per emit, nothing kept between calls
    monkeypatch.setattr(fc, "PLANES_BUDGET_BYTES", 0)
    monkeypatch.setattr(fc, "SCRATCH_KEEP_BYTES", 0)
    fc.clear_scratch()
    assert np.array_equal(fc.compute_features(img, sel), ref)
    assert np.array_equal(fc.compute_features(img, sel), ref)


@pytest.mark.parametrize("fid", ["StructureTensorEigenvalues", "HessianOfGaussianEigenvalues"])
@pytest.mark.parametrize("nd", [2, 3])
def test_eigenvalues_descending(fid: str, nd: int) -> None:
    img = np.random.default_rng(6).standard_normal((30,) * nd)
    ev = FUNCS[fid](img, 1.0)
    assert ev.shape[-1] == nd
    assert np.all(np.diff(ev, axis=-1) <= 0)


def test_eig3_closed_form_degenerate() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5000, 3, 3))
    a = a + a.transpose(0, 2, 1)
    q = np.linalg.qr(rng.standard_normal((1000, 3, 3)))[0]
    a[:1000] = q @ np.diag([3.0, 3.0, -1.0]) @ q.transpose(0, 2, 1)  # double eigenvalue
    a[1000:1100] = np.eye(3) * rng.random((100, 1, 1))  # multiple of identity
    a[1100:1200] = 0.0
    a[1200:1300] = np.diag([1.0, 2.0, 3.0]) * 1e-30  # tiny scale
    a = a.astype(np.float32).astype(np.float64)
    got = fc.eigvals_sym3(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2])
    ref = np.linalg.eigvalsh(a)[:, ::-1]
    scale = np.abs(ref).max(axis=1, keepdims=True)
    scale[scale == 0] = 1
    assert np.all(np.abs(got - ref) / scale < 1e-6)
    assert np.all(np.diff(got, axis=1) <= 0)
    got2 = fc.eigvals_sym2(a[:, 0, 0], a[:, 1, 1], a[:, 0, 1])
    ref2 = np.linalg.eigvalsh(a[:, :2, :2])[:, ::-1]
    assert np.all(np.abs(got2 - ref2) / (np.abs(ref2).max(axis=1, keepdims=True) + 1e-300) < 1e-6)


# ----------------------------------------------------------------------------- table / validation
def test_feature_table() -> None:
    assert ft.n_channels("GaussianSmoothing", 3) == 1
    assert ft.n_channels("HessianOfGaussianEigenvalues", 3) == 3
    assert ft.n_channels("StructureTensorEigenvalues", 2) == 2
    sel = ft.all_features_selection()
    assert len(sel) == 7 + 5 * 6
    assert ft.n_output_channels(sel, 3) == 61 and ft.n_output_channels(sel, 2) == 49
    names = ft.channel_names([("GaussianSmoothing", 1.0), ("HessianOfGaussianEigenvalues", 1.6)], 3)
    assert names == (
        "Gaussian Smoothing (σ=1.0)",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [0]",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [1]",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [2]",
    )
    names = ft.channel_names([("StructureTensorEigenvalues", 0.7)], 3, in_2d=True)
    assert names == ("Structure Tensor Eigenvalues (σ=0.7) in 2D [0]", "Structure Tensor Eigenvalues (σ=0.7) in 2D [1]")
    names = ft.channel_names([("DifferenceOfGaussians", 5)], 2, n_input_channels=2, input_channel_names=["r", "g"])
    assert names == ("r: Difference of Gaussians (σ=5.0)", "g: Difference of Gaussians (σ=5.0)")
    assert ft.halo([("GaussianSmoothing", 0.3)]) == 2
    assert ft.halo([("GaussianSmoothing", 10.0), ("StructureTensorEigenvalues", 5.0)]) == 35
    assert ft.halo([("StructureTensorEigenvalues", 10.0)]) == 35 + 18
    assert ft.halo([]) == 0


@pytest.mark.parametrize(
    "sel, shape, in_2d, match",
    [
        ([("Bogus", 1.0)], (50, 50), False, "unknown feature id"),
        ([("LaplacianOfGaussian", 0.3)], (50, 50), False, "σ=0.3"),
        ([("GaussianSmoothing", 0.5)], (50, 50), False, "σ=0.5"),
        ([("GaussianSmoothing", 10.0)], (50, 35), False, r"σ=10.0.*axis 'x'"),
        ([("HessianOfGaussianEigenvalues", 3.5)], (10, 50, 50), False, r"σ=3.5.*axis 'z'"),
        ([("GaussianSmoothing", 1.0)], (50,), False, "2 or 3 spatial axes"),
        ([("GaussianSmoothing", 1.0)], (50, 50), True, "in_2d"),
    ],
)
def test_validation_errors(sel, shape, in_2d, match) -> None:
    with pytest.raises(ValueError, match=match):
        ft.validate(sel, shape, in_2d)
    if len(shape) in (2, 3):
        with pytest.raises(ValueError, match=match):
            fc.compute_features(np.zeros(shape + (1,), np.float32), sel, in_2d=in_2d)


def test_validation_in_2d_ignores_z() -> None:
    ft.validate([("GaussianSmoothing", 10.0)], (2, 40, 40), in_2d=True)
    with pytest.raises(ValueError, match="axis 'y'"):
        ft.validate([("GaussianSmoothing", 10.0)], (40, 30, 40), in_2d=True)
    out = fc.compute_features(np.ones((2, 40, 40, 1)), [("GaussianSmoothing", 10.0)], in_2d=True)
    assert np.allclose(out, 1.0)


# ----------------------------------------------------------------------------- ROI exactness
def _window_matches_full(img: np.ndarray, sel, in_2d: bool, n_rois: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    full = fc.compute_features(img, sel, in_2d=in_2d)
    h = ft.halo(sel)
    spatial = img.shape[:-1]
    for _ in range(n_rois):
        roi, win = [], []
        for ax, n in enumerate(spatial):
            a, b = sorted(rng.integers(0, n + 1, size=2))
            if b == a:
                b = a + 1 if a < n else a
                a = b - 1
            # border-touching ROIs on purpose
            if rng.random() < 0.25:
                a = 0
            if rng.random() < 0.25:
                b = n
            hh = 0 if (in_2d and ax == 0) else h
            roi.append(slice(a, b))
            win.append(slice(max(0, a - hh), min(n, b + hh)))
        sub = fc.compute_features(img[tuple(win)], sel, in_2d=in_2d)
        local = tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(roi, win))
        assert np.array_equal(sub[local], full[tuple(roi)]), (roi, win)


@pytest.mark.parametrize(
    "sel",
    [
        ft.all_features_selection()[:12],  # up to σ=1.6 ...
        [
            ("StructureTensorEigenvalues", 3.5),
            ("DifferenceOfGaussians", 1.0),
            ("HessianOfGaussianEigenvalues", 1.6),
            ("GaussianSmoothing", 0.3),
        ],
        [("GaussianGradientMagnitude", 5.0), ("LaplacianOfGaussian", 0.7)],
    ],
)
def test_window_exactness_2d(sel) -> None:
    img = np.random.default_rng(8).random((120, 97, 2)).astype(np.float32)
    _window_matches_full(img, sel, False, 8, 9)


@pytest.mark.parametrize(
    "sel, in_2d",
    [
        (
            [
                ("StructureTensorEigenvalues", 1.0),
                ("HessianOfGaussianEigenvalues", 0.7),
                ("GaussianSmoothing", 0.3),
                ("DifferenceOfGaussians", 1.6),
            ],
            False,
        ),
        ([("HessianOfGaussianEigenvalues", 3.5), ("GaussianGradientMagnitude", 1.0)], False),
        ([("StructureTensorEigenvalues", 1.6), ("LaplacianOfGaussian", 3.5)], True),
    ],
)
def test_window_exactness_3d(sel, in_2d: bool) -> None:
    img = (np.random.default_rng(10).random((34, 45, 39, 1)) * 255).astype(np.uint8)
    _window_matches_full(img, sel, in_2d, 6, 11)


# ----------------------------------------------------------------------------- real data
def test_real_data_isbi_crop() -> None:
    path = DATA / "isbi2012_train.h5"
    if not path.exists():
        pytest.skip(f"{path} not available")
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        raw = f["raw"][0, :256, :256]
    sel = [
        ("GaussianSmoothing", 0.3),
        ("LaplacianOfGaussian", 1.0),
        ("GaussianGradientMagnitude", 1.6),
        ("DifferenceOfGaussians", 3.5),
        ("StructureTensorEigenvalues", 5.0),
        ("HessianOfGaussianEigenvalues", 10.0),
    ]
    got = fc.compute_features(raw[..., None], sel)
    ref = ref_compute_features(raw[..., None], sel)
    assert np.all(per_channel_rel_err(got, ref) < RTOL)


def test_read_only_float32_input_is_accepted():
    # cached engine blocks are read-only; a float32 single-channel image reached the kernels uncopied
    from operators.kernels import features_cpu as fc

    img = np.random.default_rng(0).random((40, 48, 1)).astype(np.float32)
    sel = [("GaussianSmoothing", 1.0), ("HessianOfGaussianEigenvalues", 1.6), ("StructureTensorEigenvalues", 0.7)]
    ref = fc.compute_features(img, sel)
    img.flags.writeable = False
    np.testing.assert_array_equal(fc.compute_features(img, sel), ref)
