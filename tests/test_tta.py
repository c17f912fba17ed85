"""Test-time augmentation: the transforms, the average, and the enhancer's tiled TTA."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from operators.kernels.tta import _forward, _inverse, augmentations, predict_augmented


@pytest.mark.parametrize(
    ("n", "rotations", "count"), [(1, True, 2), (2, True, 8), (2, False, 4), (3, True, 16), (3, False, 8)]
)
def test_augmentations_are_distinct_and_invertible(n, rotations, count):
    ts = augmentations(n, rotations=rotations)
    assert len(ts) == count and ts[0] == (0, ())
    x = np.random.default_rng(0).normal(size=(2,) + (6,) * n)  # a leading channel axis
    seen = set()
    for t in ts:
        y = _forward(x, t, n)
        seen.add(y.tobytes())
        np.testing.assert_array_equal(_inverse(y, t, n), x)
    assert len(seen) == count


def test_identity_and_equivariant_predictions_are_unchanged():
    x = np.random.default_rng(1).random((1, 40, 40)).astype(np.float32)
    np.testing.assert_array_equal(predict_augmented(lambda a: a, x, n_spatial=2), x)
    blur = lambda a: ndimage.gaussian_filter(a, (0, 2, 2), mode="reflect")  # noqa: E731 - symmetric kernel
    np.testing.assert_allclose(predict_augmented(blur, x, n_spatial=2), blur(x), atol=1e-6)


@pytest.mark.parametrize("rotations", [True, False])
def test_average_of_an_oriented_prediction_equals_the_manual_mean(rotations):
    x = np.random.default_rng(2).random((3, 24, 24)).astype(np.float32)

    def oriented(a):  # reacts to direction: a forward difference along x, two output channels
        d = np.diff(a, axis=-1, append=a[..., -1:])
        return np.stack([d[0] + 2 * d[1], a[2]])

    got = predict_augmented(oriented, x, n_spatial=2, rotations=rotations)
    want = np.mean([_inverse(oriented(_forward(x, t, 2)), t, 2) for t in augmentations(2, rotations=rotations)], 0)
    assert got.dtype == np.float32 and got.shape == (2, 24, 24)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got[0], oriented(x)[0], atol=1e-3)  # the average really differs from one pass


def test_a_prediction_that_changes_the_shape_is_refused():
    with pytest.raises(ValueError, match="predict returned spatial shape"):
        predict_augmented(lambda a: a[..., 1:], np.zeros((1, 8, 8), np.float32), n_spatial=2)
    with pytest.raises(ValueError, match="n_spatial must be >= 1"):
        augmentations(0)


def test_enhancer_tta_setting_is_checked():
    pytest.importorskip("bioimageio.core")
    from operators import Enhancer
    from tda_graph import SettingsError
    from tda_graph.models import bundled_enhancer

    with pytest.raises(SettingsError, match="tta must be True or False"):
        Enhancer(bundled_enhancer("mitochondria_em2d"), tta="yes")


def test_enhancer_tiled_tta_equals_whole_image_tta():
    pytest.importorskip("torch")
    pytest.importorskip("bioimageio.core")
    from operators import ArraySource, Enhancer
    from operators.enhancer import load_enhancer_model
    from tda_graph import Graph
    from tda_graph.models import bundled_enhancer

    model = load_enhancer_model(bundled_enhancer("mitochondria_em2d"))
    assert model.turnable((400, 496)) and model.valid_size(0, 112) and not model.valid_size(0, 120)
    rng = np.random.default_rng(4)
    x = ndimage.gaussian_filter(rng.normal(size=(400, 496)), 6)
    x = np.clip(0.5 + 4 * x + 0.05 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
    whole = predict_augmented(lambda a: model.predict(a), x[None], n_spatial=2)[0]
    g = Graph(workers=2)
    src = g.add(ArraySource(x.copy(), "yx", name="prob"))
    enh = g.add(Enhancer(model, name="enhancer", tta=True), image=src)
    tiled = g.request(enh)[..., 0]
    assert g.stats(enh)["blocks_computed"] >= 4
    b = model.halo[0]
    diff = np.abs(tiled[b:-b, b:-b] - whole[b:-b, b:-b])
    assert diff.max() <= 1e-5, f"tiled vs whole max |diff| {diff.max():.3g}"
    plain = model.predict(x[None])[0]
    assert np.abs(whole - plain).max() > 1e-3  # TTA changed the output
    g.close()
