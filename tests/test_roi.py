import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tda_graph import Roi, RoiError, bounding_roi, merge_rois
from tda_graph.testing import roi_strategy


def test_basic_properties():
    r = Roi((1, 2), (4, 10))
    assert r.shape == (3, 8)
    assert r.size == 24
    assert r.ndim == 2
    assert r.to_slices() == (slice(1, 4), slice(2, 10))
    assert repr(r) == "Roi[1:4, 2:10]"


@pytest.mark.parametrize(
    "start, stop, match",
    [
        ((-1, 0), (2, 2), "negative"),
        ((0, 3), (2, 3), "empty"),
        ((0,), (1, 1), "different lengths"),
        ((), (), "at least one axis"),
        ((0.5,), (2,), "integers"),
    ],
)
def test_invalid_rois_raise(start, stop, match):
    with pytest.raises(RoiError, match=match):
        Roi(start, stop)


def test_outside_shape_raises():
    with pytest.raises(RoiError, match="outside the array of shape"):
        Roi((0, 0), (5, 11)).check_inside((10, 10))
    with pytest.raises(RoiError, match="lies outside"):
        Roi((10, 0), (12, 5)).clip((10, 10))


def test_intersection_and_union():
    a = Roi((0, 0), (10, 10))
    b = Roi((5, 8), (20, 9))
    assert a.intersection(b) == Roi((5, 8), (10, 9))
    assert a.intersection(Roi((10, 0), (11, 1))) is None
    assert a.union_bounds(b) == Roi((0, 0), (20, 10))
    assert bounding_roi([a, b]) == Roi((0, 0), (20, 10))


def test_grow_clips_to_shape():
    r = Roi((2, 5), (4, 9))
    assert r.grow(3, (10, 10)) == Roi((0, 2), (7, 10))
    assert r.grow((0, 1), (10, 10)) == Roi((2, 4), (4, 10))
    with pytest.raises(RoiError, match="negative"):
        r.grow(-1, (10, 10))


def test_blocks_and_alignment():
    r = Roi((30, 0), (70, 10))
    assert list(r.block_indices((32, 32))) == [(0, 0), (1, 0), (2, 0)]
    blocks = list(r.iter_blocks((32, 32), (80, 20)))
    assert blocks[-1] == Roi((64, 0), (80, 20))
    assert r.align((32, 32), (80, 20)) == Roi((0, 0), (80, 20))


def test_relative_and_from_slices():
    outer = Roi((10, 10), (20, 20))
    assert Roi((12, 15), (14, 20)).relative_to(outer) == (slice(2, 4), slice(5, 10))
    with pytest.raises(RoiError, match="not inside"):
        Roi((0, 0), (1, 1)).relative_to(outer)
    assert Roi.from_slices((slice(None), slice(2, 5)), (7, 9)) == Roi((0, 2), (7, 5))
    with pytest.raises(RoiError, match="step"):
        Roi.from_slices((slice(0, 4, 2),), (8,))


def test_merge_rois_merges_touching_and_caps():
    a, b, c = Roi((0,), (5,)), Roi((5,), (8,)), Roi((20,), (22,))
    assert set(merge_rois([a, b, c])) == {Roi((0,), (8,)), c}
    many = [Roi((i * 3,), (i * 3 + 1,)) for i in range(100)]
    assert merge_rois(many, max_count=10) == (Roi((0,), (298,)),)


@given(st.data())
def test_blocks_cover_roi_exactly(data):
    shape = data.draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
    block = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
    r = data.draw(roi_strategy(shape))
    mask = np.zeros(shape, int)
    for b in r.iter_blocks(block, shape):
        mask[b.to_slices()] += 1
    assert mask.max() == 1  # blocks never overlap
    assert mask[r.to_slices()].all()  # and cover the ROI
