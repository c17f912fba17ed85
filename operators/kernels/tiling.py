"""Tiling arithmetic for fixed- or step-sized models (pure numpy, no engine imports).

A model that accepts inputs of size ``min + n * step`` along an axis and
declares an output ``halo`` (invalid border on each side) is run on tiles:
a tile *core* (the part whose output is kept) is grown by the halo, the input
window is rounded up to the next valid size, parts outside the image are
reflect-padded, and the halo is cropped off the model output again.

The tile grid is anchored at the image origin and the input window of a core
starting at ``s`` always starts at ``s - halo``; with a core size that is a
multiple of the network's downsampling factor every tile sees the image on the
same pooling grid, so tiled and whole-image results agree away from borders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["valid_size", "tile_input_range", "core_size", "read_padded", "grid_starts"]


def valid_size(n: int, min_size: int, step: int) -> int:
    """The smallest size ``min_size + k * step >= n`` (``step == 0``: fixed size).

    Parameters
    ----------
    n : int
        Wanted size.
    min_size, step : int
        The model's valid sizes along this axis.

    Raises
    ------
    ValueError
        If the axis has a fixed size smaller than ``n``.
    """
    if n <= min_size:
        return int(min_size)
    if step <= 0:
        raise ValueError(f"size {n} exceeds the fixed model size {min_size}")
    return int(min_size + -(-(n - min_size) // step) * step)


def core_size(tile: int, halo: int) -> int:
    """Kept output size of an input tile of size ``tile`` with ``halo`` cropped on both sides."""
    core = int(tile) - 2 * int(halo)
    if core < 1:
        raise ValueError(f"a tile of size {tile} with halo {halo} on both sides keeps no output")
    return core


def tile_input_range(core_start: int, core_stop: int, halo: int, min_size: int, step: int) -> tuple[int, int]:
    """Input range ``[start, stop)`` (may reach outside the image) of the tile for one core.

    ``start = core_start - halo`` and the size is the smallest valid size
    covering the core plus the halo on both sides.
    """
    start = int(core_start) - int(halo)
    size = valid_size(int(core_stop) - int(core_start) + 2 * int(halo), min_size, step)
    return start, start + size


def grid_starts(lo: int, hi: int, core: int) -> list[int]:
    """Starts of the grid cells of size ``core`` (anchored at 0) that intersect ``[lo, hi)``."""
    return list(range((lo // core) * core, hi, core))


def read_padded(
    data: np.ndarray,
    data_start: Sequence[int],
    want_start: Sequence[int],
    want_stop: Sequence[int],
) -> np.ndarray:
    """The region ``[want_start, want_stop)`` of an array known over ``data``.

    ``data`` covers ``[data_start, data_start + data.shape)`` in global
    coordinates. Parts of the wanted region outside ``data`` are filled by
    reflection (numpy ``mode="reflect"``, repeated when the padding exceeds the
    data; ``"edge"`` for axes of length 1). Callers pass windows that end at the
    image border wherever padding is needed, so the reflection is about the
    image border.
    """
    sl, pads = [], []
    for d0, n, w0, w1 in zip(data_start, data.shape, want_start, want_stop):
        lo = max(w0, d0)
        hi = min(w1, d0 + n)
        if hi <= lo:
            raise ValueError(f"wanted range [{w0}, {w1}) does not overlap the data [{d0}, {d0 + n})")
        sl.append(slice(lo - d0, hi - d0))
        pads.append((lo - w0, w1 - hi))
    part = np.asarray(data[tuple(sl)])
    if not any(a or b for a, b in pads):
        return part
    out = part
    for ax, (a, b) in enumerate(pads):
        if not (a or b):
            continue
        width = [(0, 0)] * out.ndim
        width[ax] = (a, b)
        out = np.pad(out, width, mode="reflect" if out.shape[ax] > 1 else "edge")
    return out
