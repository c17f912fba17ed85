"""FeatureFilters as a graph operator: specs, halos, exact ROIs, dirtiness, errors."""

import numpy as np
import pytest

from operators import ArraySource, FeatureFilters, normalize_selection
from operators.kernels import features_cpu
from tda_graph import Graph, IncompatibleInputError, Roi, SettingsError
from tda_graph import testing as kit

SEL = {
    "GaussianSmoothing": [0.3, 1.0],
    "DifferenceOfGaussians": [1.6],
    "StructureTensorEigenvalues": [1.0],
    "HessianOfGaussianEigenvalues": [1.6],
}


@pytest.mark.parametrize(
    "shape, axes, in_2d, block",
    [
        ((61, 47), "yx", False, (24, 20)),
        ((9, 30, 26), "zyx", False, (4, 16, 16)),
        ((9, 30, 26), "zyx", True, (2, 16, 16)),
        ((40, 33, 2), "yxc", False, (16, 16)),
    ],
)
def test_contract_kit(shape, axes, in_2d, block):
    rng = np.random.default_rng(2)
    data = (rng.random(shape) * 255).astype(np.uint16)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes=axes))
    f = g.add(FeatureFilters(SEL, in_2d=in_2d), image=src)
    g2 = g  # same graph, different cache grid on a second node
    f2 = g2.add(FeatureFilters(SEL, in_2d=in_2d), image=src, block_shape=block + (f.spec.shape[-1],))
    kit.check_roi_equals_full(g, f, n=4)
    kit.check_roi_equals_full(g, f2, n=6)
    kit.check_dirty_covers_changes(g, src, f2, n_edits=2)
    kit.check_roi_property(g, f2, max_examples=8)
    # the operator computes exactly what the plain kernel computes
    img = data if "c" in axes else data[..., None]
    ref = features_cpu.compute_features(img, normalize_selection(SEL), in_2d=in_2d)
    np.testing.assert_array_equal(g.request(f), ref)


def test_spec_channel_names_and_halo():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((10, 64, 64), np.uint8), axes="zyx"))
    f = g.add(FeatureFilters({"HessianOfGaussianEigenvalues": [1.6], "GaussianSmoothing": [1.0]}), image=src)
    assert f.spec.axes == "zyxc" and f.spec.dtype == np.float32
    assert f.spec.channel_names == (
        "Gaussian Smoothing (σ=1.0)",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [0]",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [1]",
        "Hessian of Gaussian Eigenvalues (σ=1.6) [2]",
    )
    assert f.halo("image", src.spec) == {"z": 6, "y": 6, "x": 6}
    f2 = g.add(FeatureFilters({"StructureTensorEigenvalues": [3.5]}, in_2d=True), image=src)
    assert f2.halo("image", src.spec) == {"z": 0, "y": 13 + 7, "x": 20}
    assert f2.spec.channel_names[0] == "Structure Tensor Eigenvalues (σ=3.5) in 2D [0]"
    kit.check_spec_pure(f2, {"image": src.spec})


def test_all_features_channel_counts():
    g = Graph(workers=1)
    s2 = g.add(ArraySource(np.zeros((64, 64), np.uint8), axes="yx"))
    s3 = g.add(ArraySource(np.zeros((40, 40, 40), np.uint8), axes="zyx"))
    assert g.add(FeatureFilters("all"), image=s2).spec.shape[-1] == 49
    assert g.add(FeatureFilters("all"), image=s3).spec.shape[-1] == 61


def test_scale_too_large_for_image_is_rejected_naming_scale_and_axis():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((5, 200, 200), np.uint8), axes="zyx", name="raw"))
    with pytest.raises(IncompatibleInputError, match=r"σ=3.5 .*axis 'z'.*has 5"):
        g.add(FeatureFilters({"GaussianSmoothing": [3.5]}), image=src)
    g.add(FeatureFilters({"GaussianSmoothing": [3.5]}, in_2d=True), image=src)  # z not filtered: fine


@pytest.mark.parametrize(
    "selection, match",
    [
        ({"LaplacianOfGaussian": [0.3]}, "σ=0.3 for GaussianSmoothing only"),
        ({"Sobel": [1.0]}, "unknown feature id"),
        ({"GaussianSmoothing": [2.0]}, "not allowed"),
        ({}, "empty"),
        ("everything", "unknown feature preset"),
    ],
)
def test_bad_selections(selection, match):
    with pytest.raises(SettingsError, match=match):
        FeatureFilters(selection)


def test_selection_change_dirties_everything_and_resizes():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.random.default_rng(0).random((50, 50)).astype(np.float32), axes="yx"))
    f = g.add(FeatureFilters({"GaussianSmoothing": [1.0]}), image=src)
    g.request(f)
    events = []
    sub = g.subscribe(f, events.append)
    f.configure(selection={"GaussianSmoothing": [1.0], "LaplacianOfGaussian": [1.6]})
    assert f.spec.shape == (50, 50, 2)
    assert events[-1].rois == (Roi((0, 0, 0), (50, 50, 2)),)
    np.testing.assert_array_equal(g.request(f), g.recompute(f))
    src.write(Roi((10, 10), (12, 12)), 5.0)
    assert events[-1].rois == (Roi((4, 4, 0), (18, 18, 2)),)  # edit grown by the halo ceil(3.5*1.6)=6
    sub.disconnect()


def test_real_em_crop(shared_data):
    import h5py

    with h5py.File(shared_data / "isbi2012_train.h5", "r") as fh:
        raw = fh["raw"][0, :200, :220]
    g = Graph(workers=2)
    src = g.add(ArraySource(raw, axes="yx"))
    f = g.add(FeatureFilters("default"), image=src, block_shape=(64, 64, 24))
    kit.check_roi_equals_full(g, f, n=3)
