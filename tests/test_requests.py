"""Requests: exact ROI results, only needed blocks computed, errors, async, budget."""

import threading

import numpy as np
import pytest
from conftest import Hook
from scipy import ndimage

from operators import ArraySource, GaussianSmoothing, MeanFilter, Scale
from tda_graph import Graph, OperatorError, RequestCancelled, Roi, RoiError
from tda_graph import testing as kit


@pytest.fixture(scope="module")
def big():
    data = np.random.default_rng(7).random((4096, 4096), dtype=np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=2.0), image=src, block_shape=(256, 256))
    yield g, src, sm, data
    g.close()


def test_public_contract_small():
    data = np.random.default_rng(0).random((200, 150), dtype=np.float32)
    g = Graph()
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=2.0), image=src)
    out = g.request(sm, Roi((0, 0), (64, 64)))
    np.testing.assert_array_equal(out, ndimage.gaussian_filter(data, 2.0, mode="reflect")[:64, :64])
    st = g.stats(sm)
    assert {"blocks_computed", "voxels_computed", "cache_hits"} <= set(st)
    src.write(Roi((100, 100), (110, 110)), np.zeros((10, 10), np.float32))
    data2 = data.copy()
    data2[100:110, 100:110] = 0
    np.testing.assert_array_equal(g.request(sm), ndimage.gaussian_filter(data2, 2.0, mode="reflect"))


def test_roi_request_computes_only_touched_blocks(big):
    """Issue item 1: a 64x64 ROI computes only the cache blocks it touches; again computes nothing."""
    g, src, sm, data = big
    g.reset_stats()
    roi = Roi((1030, 2040), (1094, 2104))  # straddles a block border in x
    out = g.request(sm, roi)
    ref = ndimage.gaussian_filter(data[900:1200, 1900:2200], 2.0, mode="reflect")[130:194, 140:204]
    np.testing.assert_array_equal(out, ref)
    st, ss = g.stats(sm), g.stats(src)
    touched = list(roi.iter_blocks((256, 256), data.shape))
    assert st["blocks_computed"] == len(touched) == 2
    assert st["voxels_computed"] == sum(b.size for b in touched)
    # the source is read for exactly those blocks grown by the halo (radius 8)
    assert ss["voxels_computed"] == sum(b.grow(8, data.shape).size for b in touched)
    g.request(sm, roi)
    st2 = g.stats(sm)
    assert st2["blocks_computed"] == st["blocks_computed"]
    assert st2["cache_hits"] == st["cache_hits"] + 2


def test_write_recomputes_only_blocks_near_edit(big):
    """Issue item 2: after a 10x10 write only blocks meeting the write grown by the halo recompute."""
    g, src, sm, data = big
    g.request(sm)  # fill the whole cache
    g.reset_stats()
    edit = Roi((250, 1020), (260, 1030))
    src.write(edit, np.full((10, 10), 5.0, np.float32))
    out = g.request(sm)
    st = g.stats(sm)
    expected = list(edit.grow(8, data.shape).block_indices((256, 256)))
    assert len(expected) == 4
    assert st["blocks_computed"] == 4
    assert st["cache_hits"] == 256 - 4
    ref = ndimage.gaussian_filter(data, 2.0, mode="reflect")
    np.testing.assert_array_equal(out[200:320, 960:1100], ref[200:320, 960:1100])


@pytest.mark.parametrize("axes, shape", [("yx", (37, 53)), ("zyx", (9, 21, 17)), ("yxc", (30, 26, 2))])
def test_contract_kit_on_library_operators(axes, shape):
    rng = np.random.default_rng(3)
    data = (rng.random(shape) * 200).astype(np.uint8)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes=axes))
    a = g.add(MeanFilter(radius=2), image=src)
    b = g.add(GaussianSmoothing(sigma=1.5), image=a, block_shape=tuple(max(1, n // 3) for n in shape))
    c = g.add(Scale(factor=-2.0, offset=1.0), image=b)
    for node in (a, b, c):
        kit.check_roi_equals_full(g, node, n=6)
        kit.check_dirty_covers_changes(g, src, node, n_edits=3)
    kit.check_roi_property(g, c, max_examples=15)


def test_uncached_chain_equals_full():
    data = np.random.default_rng(5).random((40, 50), dtype=np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes="yx"))
    m = g.add(MeanFilter(radius=3), image=src)
    s = g.add(GaussianSmoothing(sigma=1.0), image=m, cache=False)
    full = ndimage.gaussian_filter(ndimage.uniform_filter(data, 7, mode="reflect"), 1.0, mode="reflect")
    np.testing.assert_allclose(g.request(s), full, rtol=1e-6)
    kit.check_roi_equals_full(g, s)


def test_plan_is_pure_and_block_aligned():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((100, 100), np.float32), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src, block_shape=(32, 32))
    p = g.plan(sm, Roi((10, 10), (40, 20)))
    assert p.tasks[sm] == (Roi((0, 0), (32, 32)), Roi((32, 0), (64, 32)))
    assert p.bounds()[src] == Roi((0, 0), (68, 36))
    assert g.plan(sm, Roi((10, 10), (40, 20))).tasks == p.tasks  # no side effect
    assert g.stats(sm)["blocks_computed"] == 0
    g.request(sm, Roi((10, 10), (40, 20)))
    assert g.plan(sm, Roi((10, 10), (40, 20))).tasks == {}


def test_returned_array_is_a_private_copy():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((16, 16), np.float32), axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src)
    a = g.request(sm, Roi((0, 0), (8, 8)))
    a[:] = -1
    assert (g.request(sm, Roi((0, 0), (8, 8))) > 0).all()
    b = g.request(src)
    b[:] = 7
    assert src.data[0, 0] == 1


def test_request_validates_roi():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((16, 16), np.float32), axes="yx"))
    with pytest.raises(RoiError, match="outside"):
        g.request(src, Roi((0, 0), (17, 4)))
    with pytest.raises(RoiError, match="3 axes"):
        g.request(src, Roi((0, 0, 0), (1, 1, 1)))
    np.testing.assert_array_equal(g.request(src, (slice(2, 4), slice(None))), np.ones((2, 16)))


def test_operator_error_reaches_caller_with_name_and_roi():
    def boom(roi):
        raise ZeroDivisionError("bad kernel")

    g = Graph(workers=2)
    src = g.add(ArraySource(np.ones((64, 64), np.float32), axes="yx"))
    h = g.add(Hook(boom, name="exploder"), image=src, block_shape=(32, 32))
    down = g.add(Scale(), image=h)
    msg = r"exploder failed computing Roi\[0:32, 0:32\].*ZeroDivisionError: bad kernel"
    with pytest.raises(OperatorError, match=msg) as ei:
        g.request(down, Roi((0, 0), (10, 10)))
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    assert ei.value.operator == "exploder"
    # the graph stays usable and nothing was cached as zeros
    h.hook = None
    np.testing.assert_array_equal(g.request(down, Roi((0, 0), (10, 10))), 1.0)


def test_wrong_output_shape_is_reported():
    class Bad(Scale):
        def compute(self, roi, inputs):
            return np.zeros((1, 1), np.float32)

    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((8, 8), np.float32), axes="yx"))
    bad = g.add(Bad(name="liar"), image=src)
    with pytest.raises(OperatorError, match=r"liar returned float32\(1, 1\).*promises float32\(8, 8\)"):
        g.request(bad)


def test_async_request_and_cancel():
    started, release = threading.Event(), threading.Event()

    def slow(roi):
        started.set()
        release.wait(5)

    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((64, 64), np.float32), axes="yx"))
    h = g.add(Hook(slow), image=src, block_shape=(16, 16))
    fut = g.request_async(h)
    assert started.wait(5)
    assert fut.cancel()
    release.set()
    assert fut.cancelled()
    # cancellation is clean: a later request computes everything correctly
    np.testing.assert_array_equal(g.request(h), 1.0)
    ok = g.request_async(h, Roi((0, 0), (4, 4)))
    np.testing.assert_array_equal(ok.result(timeout=5), 1.0)


def test_cancel_event_raises_request_cancelled():
    g = Graph(workers=1)
    src = g.add(ArraySource(np.ones((64, 64), np.float32), axes="yx"))
    h = g.add(Hook(), image=src, block_shape=(16, 16))
    ev = threading.Event()
    ev.set()
    with pytest.raises(RequestCancelled, match="cancelled"):
        g._request(h, None, 0, ev)
    np.testing.assert_array_equal(g.request(h), 1.0)


def test_memory_budget_evicts_lru_and_results_stay_correct():
    data = np.random.default_rng(1).random((256, 256), dtype=np.float32)
    block_bytes = 64 * 64 * 4
    g = Graph(workers=2, cache_budget=4 * block_bytes)
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.0), image=src, block_shape=(64, 64))
    out = g.request(sm)
    np.testing.assert_array_equal(out, ndimage.gaussian_filter(data, 1.0, mode="reflect"))
    st = g.stats(sm)
    assert g.cache_info()["used_bytes"] <= 4 * block_bytes
    assert st["evictions"] == 16 - 4 and st["cached_blocks"] == 4
    # the most recently used blocks survived
    g.reset_stats()
    g.request(sm, Roi((192, 192), (256, 256)))
    assert g.stats(sm)["blocks_computed"] == 0


def test_request_larger_than_memory_is_refused_before_planning():
    from operators.sources import ArraySource
    from tda_graph import Graph, Roi, RoiError

    class Huge(ArraySource):
        """A lazy source describing 10^12 voxels (like a huge zarr volume); reads zeros."""

        def __init__(self):
            super().__init__(np.zeros((1, 1, 1), np.float32), axes="zyx")

        def output_spec(self, inputs):
            from tda_graph import ArraySpec

            return ArraySpec((10_000, 10_000, 10_000), np.float32, "zyx")

        def compute(self, roi, inputs):
            return np.zeros(roi.shape, np.float32)

    g = Graph(workers=1)
    src = g.add(Huge())
    with pytest.raises(RoiError, match=r"would take 3725\.3 GiB, more than this machine's .*block by block"):
        g.request(src)  # refused before planning a billion blocks
    assert g.request(src, Roi((0, 0, 0), (2, 3, 4))).shape == (2, 3, 4)  # small regions still work
    g.close()
