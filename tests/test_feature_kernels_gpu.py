"""GPU (cupy) feature kernels vs CPU kernels vs the float64 reference.

Skipped cleanly when cupy is not installed or no CUDA device is visible.
"""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

from operators.kernels import feature_table as ft  # noqa: E402
from operators.kernels import features_cpu as fc  # noqa: E402
from operators.kernels import features_gpu as fg  # noqa: E402
from operators.kernels.reference import ref_compute_features, ref_gaussian  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fg.available(), reason="no CUDA device"),
]

RTOL = 1e-4


def per_channel_rel_err(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    ax = tuple(range(ref.ndim - 1))
    scale = np.abs(ref).max(axis=ax)
    scale[scale == 0] = 1.0
    return np.abs(np.asarray(got, np.float64) - ref).max(axis=ax) / scale


@pytest.mark.parametrize("order", [0, 1, 2, (1, 0), (0, 2)])
@pytest.mark.parametrize("sigma", [0.7, 3.5])
def test_gpu_gaussian(order, sigma: float) -> None:
    img = np.random.default_rng(0).random((70, 66))
    got = cp.asnumpy(fg.gaussian(cp.asarray(img), sigma, order=order))
    ref = ref_gaussian(img, sigma, order)
    assert np.abs(got - ref).max() / np.abs(ref).max() < RTOL


@pytest.mark.parametrize("shape, in_2d", [((80, 75, 2), False), ((40, 42, 38, 1), False), ((6, 40, 45, 1), True)])
def test_gpu_full_selection(shape, in_2d: bool) -> None:
    img = (np.random.default_rng(1).random(shape) * 255).astype(np.uint8)
    sel = ft.all_features_selection()
    gpu = cp.asnumpy(fg.compute_features(cp.asarray(img), sel, in_2d=in_2d))
    cpu = fc.compute_features(img, sel, in_2d=in_2d)
    ref = ref_compute_features(img, sel, in_2d=in_2d)
    assert gpu.shape == cpu.shape == ref.shape and gpu.dtype == np.float32
    assert np.all(per_channel_rel_err(gpu, ref) < RTOL)
    # both are within RTOL of the reference, so within 2*RTOL of each other
    assert np.all(per_channel_rel_err(gpu, cpu.astype(np.float64)) < 2 * RTOL)


def test_gpu_validation() -> None:
    with pytest.raises(ValueError, match="σ=0.3"):
        fg.compute_features(cp.zeros((40, 40, 1), cp.float32), [("LaplacianOfGaussian", 0.3)])
