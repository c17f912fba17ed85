"""Building graphs: connecting, specs, settings, errors at connect time."""

import numpy as np
import pytest
from conftest import Hook
from scipy import ndimage

from operators import ArraySource, GaussianSmoothing, MeanFilter, Scale
from tda_graph import (
    CycleError,
    Graph,
    GraphError,
    IncompatibleInputError,
    InputSlot,
    Roi,
    SettingsError,
    SpecError,
)
from tda_graph.testing import check_spec_pure


class NeedsYXC(Scale):
    inputs = (InputSlot("image", axes=("yxc",), dtype_kinds="f", channels=3),)


def test_add_returns_operator_and_resolves_spec():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((20, 30), np.uint8), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src)
    assert sm.spec.shape == (20, 30) and sm.spec.dtype == np.float32
    assert g.inputs_of(sm) == {"image": src}
    assert g.consumers_of(src) == [(sm, "image")]
    assert g.nodes == (src, sm)
    assert "GaussianSmoothing-1" in g.to_dot() and "->" in g.to_dot()


@pytest.mark.parametrize(
    "data, axes, match",
    [
        (np.zeros((8, 8), np.float32), "yx", r"axes 'yx' not accepted"),
        (np.zeros((8, 8, 3), np.uint8), "yxc", r"dtype uint8 not accepted"),
        (np.zeros((8, 8, 2), np.float32), "yxc", r"2 channels given, 3 required"),
    ],
)
def test_incompatible_connection_names_both_ends(data, axes, match):
    g = Graph(workers=1)
    src = g.add(ArraySource(data, axes=axes, name="raw"))
    with pytest.raises(IncompatibleInputError, match=match) as ei:
        g.add(NeedsYXC(name="picky"), image=src)
    assert "raw" in str(ei.value) and "picky.image" in str(ei.value)


def test_missing_unknown_and_foreign_inputs():
    g, h = Graph(workers=1), Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8)), axes="yx"))
    other = h.add(ArraySource(np.zeros((8, 8)), axes="yx"))
    with pytest.raises(GraphError, match="needs input"):
        g.add(GaussianSmoothing())
    with pytest.raises(GraphError, match="no input"):
        g.add(GaussianSmoothing(), image=src, mask=src)
    with pytest.raises(GraphError, match="not part of this graph"):
        g.add(GaussianSmoothing(), image=other)
    with pytest.raises(GraphError, match="already part of a graph"):
        g.add(src)


def test_bad_source_axes_raise_spec_error():
    with pytest.raises(SpecError, match=r"shape \(4, 5, 6\).*name 2 axes"):
        ArraySource(np.zeros((4, 5, 6)), axes="yx")
    with pytest.raises(SpecError, match="boolean, integer or float"):
        ArraySource(np.zeros((4, 4), complex), axes="yx")


def test_connect_rejects_cycles():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8), np.float32), axes="yx"))
    a = g.add(Scale(), image=src)
    b = g.add(Scale(), image=a)
    with pytest.raises(CycleError, match="cycle"):
        g.connect(a, image=b)
    with pytest.raises(CycleError):
        g.connect(a, image=a)


def test_connect_rewires_and_dirties():
    g = Graph(workers=1)
    s1 = g.add(ArraySource(np.ones((8, 8), np.float32), axes="yx"))
    s2 = g.add(ArraySource(np.full((8, 8), 3, np.float32), axes="yx"))
    sc = g.add(Scale(factor=2.0), image=s1, cache=True)
    assert g.request(sc)[0, 0] == 2
    events = []
    sub = g.subscribe(sc, events.append)
    g.connect(sc, image=s2)
    assert g.request(sc)[0, 0] == 6
    assert len(events) == 1 and events[0].rois == (Roi((0, 0), (8, 8)),)
    sub.disconnect()


def test_settings_validation_and_unknown_setting():
    with pytest.raises(SettingsError, match="sigma must be a positive"):
        GaussianSmoothing(sigma=-1)
    with pytest.raises(SettingsError, match="no setting"):
        GaussianSmoothing(sigmaa=1)
    with pytest.raises(SettingsError, match="radius must be an integer"):
        MeanFilter(radius=1.5)


def test_configure_recomputes_and_dirties_whole_output(rng):
    data = rng.random((64, 64), dtype=np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src, block_shape=(32, 32))
    g.request(sm)
    events = []
    sub = g.subscribe(sm, events.append)
    sm.configure(sigma=3.0)
    np.testing.assert_array_equal(g.request(sm), ndimage.gaussian_filter(data, 3.0, mode="reflect"))
    assert events[0].rois == (Roi((0, 0), (64, 64)),)
    assert g.stats(sm)["blocks_computed"] == 8
    sub.disconnect()


def test_configure_is_atomic_when_downstream_rejects():
    class OnlyFloat64(Scale):
        inputs = (InputSlot("image", dtype_kinds="f"),)

    class DtypeOp(Scale):
        def output_spec(self, inputs):
            s = inputs["image"]
            return s.with_(dtype=np.uint8 if self.settings.factor == 0 else np.float32)

    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((8, 8), np.float32), axes="yx"))
    mid = g.add(DtypeOp(factor=1.0), image=src)
    g.add(OnlyFloat64(), image=mid)
    with pytest.raises(IncompatibleInputError, match="dtype uint8 not accepted"):
        mid.configure(factor=0.0)
    assert mid.settings.factor == 1.0 and mid.spec.dtype == np.float32


def test_set_data_changes_spec_downstream():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8), np.float32), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src)
    g.request(sm)
    src.set_data(np.ones((16, 12), np.float32))
    assert sm.spec.shape == (16, 12)
    np.testing.assert_allclose(g.request(sm), 1.0, rtol=1e-6)


def test_remove_only_leaves():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8)), axes="yx"))
    sm = g.add(GaussianSmoothing(), image=src)
    with pytest.raises(GraphError, match="read from it"):
        g.remove(src)
    g.remove(sm)
    assert g.nodes == (src,)


@pytest.mark.parametrize(
    "op, spec_axes",
    [(GaussianSmoothing(sigma=2.0), "yx"), (MeanFilter(radius=2), "zyxc"), (Scale(factor=3.0), "yx"), (Hook(), "yx")],
)
def test_spec_purity(op, spec_axes):
    from tda_graph import ArraySpec

    shape = (4, 8, 8, 2) if spec_axes == "zyxc" else (8, 8)
    check_spec_pure(op, {"image": ArraySpec(shape, np.uint16, spec_axes)})
