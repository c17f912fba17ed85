"""Dirty propagation: ROI precision, halos, batching, freezing, listeners."""

import gc

import numpy as np
import pytest
from conftest import Hook

from operators import ArraySource, GaussianSmoothing, MeanFilter, Scale
from tda_graph import Graph, InputSlot, Roi


def test_three_level_chain_dirty_roi_is_edit_grown_by_sum_of_halos():
    """Issue item 6: dirty ROI at the end = edit grown by 1 + 2 + 4."""
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((100, 120), np.float32), axes="yx"))
    a = g.add(MeanFilter(radius=1), image=src)
    b = g.add(MeanFilter(radius=2), image=a)
    c = g.add(GaussianSmoothing(sigma=1.0), image=b)  # radius int(4*1+0.5) = 4
    seen = {n: [] for n in (a, b, c)}
    subs = [g.subscribe(n, seen[n].append) for n in (a, b, c)]
    edit = Roi((40, 50), (45, 60))
    src.write(edit, 1.0)
    assert seen[a][0].rois == (Roi((39, 49), (46, 61)),)
    assert seen[b][0].rois == (Roi((37, 47), (48, 63)),)
    assert seen[c][0].rois == (edit.grow(7, (100, 120)),)
    src.write(Roi((0, 118), (2, 120)), 1.0)  # clipped at the border
    assert seen[c][1].rois == (Roi((0, 111), (9, 120)),)
    del subs


def test_frozen_cache_serves_old_data_and_releases_one_event():
    """Issue item 5: frozen requests return old data without computing; unfreeze notifies once."""
    data = np.zeros((128, 128), np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src, block_shape=(32, 32))
    old = g.request(sm)
    events = []
    sub = g.subscribe(sm, events.append)
    g.freeze(sm)
    src.write(Roi((10, 10), (12, 12)), 100.0)
    src.write(Roi((100, 100), (104, 104)), 100.0)
    g.reset_stats()
    np.testing.assert_array_equal(g.request(sm), old)
    assert g.stats(sm)["blocks_computed"] == 0 and events == []
    g.unfreeze(sm)
    assert len(events) == 1
    assert set(events[0].rois) == {Roi((6, 6), (16, 16)), Roi((96, 96), (108, 108))}
    new = g.request(sm)
    assert g.stats(sm)["blocks_computed"] == 2
    np.testing.assert_array_equal(new, g.recompute(sm))
    assert new[11, 11] > 0
    sub.disconnect()


def test_frozen_context_manager_freezes_all_cached_nodes():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((16, 16), np.float32), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src)
    g.request(sm)
    with g.frozen():
        assert g.is_frozen(sm)
        src.write(Roi((0, 0), (1, 1)), 5.0)
        assert g.request(sm)[0, 0] == 0
    assert not g.is_frozen(sm)
    assert g.request(sm)[0, 0] > 0


def test_batch_makes_one_propagation_for_many_strokes():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((64, 64), np.float32), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src, block_shape=(16, 16))
    g.request(sm)
    events = []
    sub = g.subscribe(sm, events.append)
    with g.batch():
        for i in range(20):
            src.write(Roi((i, i), (i + 1, i + 1)), 1.0)
        with g.batch():  # nesting defers to the outermost
            src.write(Roi((60, 0), (61, 1)), 1.0)
        assert events == []
    assert len(events) == 1
    covered = np.zeros((64, 64), bool)
    for r in events[0].rois:
        covered[r.to_slices()] = True
    assert covered[0:24, 0:24].all() and covered[56:64, 0:5].all() and not covered[40, 50]
    assert g.stats(sm)["dirty_events"] == 1
    sub.disconnect()


def test_global_input_dirties_everything():
    class Weighted(Scale):
        inputs = (InputSlot("image"), InputSlot("model", dependency="global"))

    g = Graph(workers=1)
    img = g.add(ArraySource(np.zeros((32, 32), np.float32), axes="yx"))
    model = g.add(ArraySource(np.zeros((4, 4), np.float32), axes="yx"))
    w = g.add(Weighted(), image=img, model=model)
    events = []
    sub = g.subscribe(w, events.append)
    model.write(Roi((0, 0), (1, 1)), 1.0)
    assert events[-1].rois == (Roi((0, 0), (32, 32)),)
    img.write(Roi((3, 3), (4, 4)), 1.0)
    assert events[-1].rois == (Roi((3, 3), (4, 4)),)
    sub.disconnect()


def test_bound_method_listeners_are_weak_and_functions_strong():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8), np.float32), axes="yx"))
    calls = []

    class Viewer:
        def on_dirty(self, ev):
            calls.append(("viewer", ev.rois))

    v = Viewer()
    g.subscribe(src, v.on_dirty)
    sub = g.subscribe(src, lambda ev: calls.append(("fn", ev.rois)))
    src.write(Roi((0, 0), (1, 1)), 1.0)
    assert [c[0] for c in calls] == ["viewer", "fn"]
    del v
    gc.collect()
    calls.clear()
    src.write(Roi((0, 0), (1, 1)), 2.0)
    assert [c[0] for c in calls] == ["fn"]
    sub.disconnect()
    calls.clear()
    src.write(Roi((0, 0), (1, 1)), 3.0)
    assert calls == []


def test_listener_may_request_from_callback():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((16, 16), np.float32), axes="yx"))
    h = g.add(Hook(), image=src)
    got = []
    sub = g.subscribe(h, lambda ev: got.append(g.request(h, ev.rois[0])))
    src.write(Roi((2, 2), (4, 4)), 3.0)
    np.testing.assert_array_equal(got[0], 3.0)
    sub.disconnect()


def test_mark_dirty_validates():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((8, 8), np.float32), axes="yx"))
    with pytest.raises(Exception, match="outside"):
        g.mark_dirty(src, Roi((0, 0), (9, 1)))
