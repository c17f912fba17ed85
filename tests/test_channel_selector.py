"""ChannelSelector: named channels of a multi-channel output."""

from __future__ import annotations

import numpy as np
import pytest

from operators.channels import ChannelSelector
from operators.filters import GaussianSmoothing
from operators.sources import ArraySource
from tda_graph import Graph, IncompatibleInputError, Roi, SettingsError, testing

NAMES = ("background", "foreground", "boundary")


@pytest.fixture
def graph_and_source(rng: np.random.Generator) -> tuple[Graph, ArraySource]:
    g = Graph(workers=2)
    src = g.add(ArraySource(rng.random((40, 30, 3)).astype(np.float32), "yxc", channel_names=NAMES, name="probs"))
    return g, src


def test_select_by_name_and_index(graph_and_source: tuple[Graph, ArraySource]) -> None:
    g, src = graph_and_source
    one = g.add(ChannelSelector(channels="foreground"), image=src)
    two = g.add(ChannelSelector(channels=["boundary", 0]), image=src)
    assert g.spec(one).axes == "yxc" and g.spec(one).shape == (40, 30, 1)
    assert g.spec(one).channel_names == ("foreground",)
    assert g.spec(two).channel_names == ("boundary", "background")
    np.testing.assert_array_equal(g.request(one), src.data[..., 1:2])
    np.testing.assert_array_equal(g.request(two), src.data[..., [2, 0]])
    r = Roi((3, 4, 1), (20, 9, 2))
    np.testing.assert_array_equal(g.request(two, r), src.data[3:20, 4:9][..., [0]])
    testing.check_roi_equals_full(g, two)
    testing.check_spec_pure(two, {"image": g.spec(src)})


def test_unknown_channel_is_a_settings_error(graph_and_source: tuple[Graph, ArraySource]) -> None:
    g, src = graph_and_source
    with pytest.raises(SettingsError, match="unknown channel 'mito'.*'background', 'foreground', 'boundary'"):
        g.add(ChannelSelector(channels="mito"), image=src)
    with pytest.raises(SettingsError, match="out of range: the input has 3 channels"):
        g.add(ChannelSelector(channels=3), image=src)
    sel = g.add(ChannelSelector(channels="foreground"), image=src)
    with pytest.raises(SettingsError, match="unknown channel 'Foreground'"):
        sel.configure(channels="Foreground")
    assert sel.settings.channels == ("foreground",)  # unchanged
    np.testing.assert_array_equal(g.request(sel), src.data[..., 1:2])
    for bad, match in [((), "at least one"), (("a", "a"), "twice"), ((1.5,), "neither"), ((-1,), "negative")]:
        with pytest.raises(SettingsError, match=match):
            ChannelSelector(channels=bad)
    with pytest.raises(SettingsError, match="twice"):
        g.add(ChannelSelector(channels=("foreground", 1)), image=src)


def test_needs_a_channel_axis() -> None:
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8), np.float32), "yx"))
    with pytest.raises(IncompatibleInputError, match="channel axis"):
        g.add(ChannelSelector(channels=0), image=src)


def test_dirtiness_is_roi_precise(graph_and_source: tuple[Graph, ArraySource]) -> None:
    g, src = graph_and_source
    sel = g.add(ChannelSelector(channels=("boundary", "foreground")), image=src, cache=True)
    g.request(sel)
    events = []
    sub = g.subscribe(sel, events.append)
    src.write(Roi((5, 6, 1), (9, 8, 2)), 0.5)  # foreground only: output channel 1
    assert events[-1].rois == (Roi((5, 6, 1), (9, 8, 2)),)
    src.write(Roi((5, 6, 0), (9, 8, 1)), 0.5)  # background: not selected (conservative: all channels)
    assert events[-1].rois == (Roi((5, 6, 0), (9, 8, 2)),)
    sub.disconnect()
    testing.check_dirty_covers_changes(g, src, sel)


def test_halo_is_passed_through_upstream(graph_and_source: tuple[Graph, ArraySource]) -> None:
    g, src = graph_and_source
    smooth = g.add(GaussianSmoothing(sigma=1.0), image=src)
    sel = g.add(ChannelSelector(channels="foreground"), image=smooth)
    events = []
    sub = g.subscribe(sel, events.append)
    src.write(Roi((10, 10, 1), (11, 11, 2)), 2.0)
    (roi,) = events[-1].rois
    assert roi == Roi((6, 6, 0), (15, 15, 1))  # the smoothing's halo of 4, no extra from the selector
    sub.disconnect()
    testing.check_roi_equals_full(g, sel, n=4)


def test_changing_the_selection_dirties_the_output(graph_and_source: tuple[Graph, ArraySource]) -> None:
    g, src = graph_and_source
    sel = g.add(ChannelSelector(channels="foreground"), image=src, cache=True)
    g.request(sel)
    events = []
    sub = g.subscribe(sel, events.append)
    sel.configure(channels="boundary")
    assert events, "a selection change must notify listeners"
    assert g.spec(sel).channel_names == ("boundary",)
    np.testing.assert_array_equal(g.request(sel), src.data[..., 2:3])
    sel.configure(channels=(2,))  # same channel by index: same spec
    np.testing.assert_array_equal(g.request(sel), src.data[..., 2:3])
    sub.disconnect()
