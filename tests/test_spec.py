import dataclasses

import numpy as np
import pytest

from tda_graph import ArraySpec, SpecError


def test_spec_defaults_and_properties():
    s = ArraySpec((4, 32, 32, 3), "float32", "zyxc")
    assert s.dtype == np.float32
    assert s.channel_names == ("channel 0", "channel 1", "channel 2")
    assert s.n_channels == 3
    assert s.spatial_axes == "zyx"
    assert s.default_block_shape() == (4, 32, 32, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.shape = (1,)


@pytest.mark.parametrize(
    "shape, axes, names, match",
    [
        ((4, 4), "yy", (), "repeat"),
        ((4, 4), "xy", (), "out of order"),
        ((4, 4), "yq", (), "unknown letters"),
        ((4,), "yx", (), "name 2 axes"),
        ((4, 0), "yx", (), "empty axis"),
        ((4, 4, 2), "yxc", ("a",), "1 channel names given for 2"),
        ((4, 4), "yx", ("a",), "no channel axis"),
        ((3,), "c", (), "no spatial axis"),
    ],
)
def test_invalid_specs(shape, axes, names, match):
    with pytest.raises(SpecError, match=match):
        ArraySpec(shape, np.uint8, axes, names)


def test_with_returns_new_spec():
    s = ArraySpec((8, 8), np.uint8, "yx")
    t = s.with_(dtype=np.float32)
    assert s.dtype == np.uint8 and t.dtype == np.float32
