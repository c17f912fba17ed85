"""The single region-of-interest type: a frozen box of half-open ranges."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import RoiError

__all__ = ["Roi", "Shape", "bounding_roi"]

Shape = tuple[int, ...]


def _as_int_tuple(values: Sequence[int], what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not float(v).is_integer():
            raise RoiError(f"Roi {what} must be integers, got {tuple(values)!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Roi:
    """A non-empty box ``[start, stop)`` per axis, with ``0 <= start < stop``.

    Parameters
    ----------
    start, stop : sequence of int
        Inclusive start and exclusive stop per axis.

    Raises
    ------
    RoiError
        If the lengths differ, a start is negative, or an axis is empty.
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __init__(self, start: Sequence[int], stop: Sequence[int]) -> None:
        s = _as_int_tuple(start, "start")
        e = _as_int_tuple(stop, "stop")
        if len(s) != len(e):
            raise RoiError(f"Roi start {s} and stop {e} have different lengths")
        if len(s) == 0:
            raise RoiError("Roi needs at least one axis")
        if any(a < 0 for a in s):
            raise RoiError(f"Roi start {s} is negative; regions start at 0")
        if any(b <= a for a, b in zip(s, e)):
            raise RoiError(f"Roi {s}..{e} is empty along an axis (stop must be > start)")
        object.__setattr__(self, "start", s)
        object.__setattr__(self, "stop", e)

    # -- constructors -------------------------------------------------------------
    @classmethod
    def full(cls, shape: Sequence[int]) -> Roi:
        """The ROI covering a whole array of ``shape``."""
        return cls((0,) * len(shape), tuple(shape))

    @classmethod
    def from_slices(cls, slices: Sequence[slice], shape: Sequence[int]) -> Roi:
        """Build from step-1 slices (``None`` bounds mean the array edge); negative indices are refused."""
        if len(slices) != len(shape):
            raise RoiError(f"{len(slices)} slices given for a {len(shape)}-d array")
        start, stop = [], []
        for sl, n in zip(slices, shape):
            if sl.step not in (None, 1):
                raise RoiError(f"slice {sl} has a step; a Roi is a contiguous box")
            a = 0 if sl.start is None else sl.start
            b = n if sl.stop is None else sl.stop
            if a < 0 or b < 0:
                raise RoiError(f"slice {sl} has a negative bound; use explicit positions")
            start.append(a)
            stop.append(b)
        roi = cls(start, stop)
        roi.check_inside(shape)
        return roi

    # -- properties ---------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> Shape:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_slices(self) -> tuple[slice, ...]:
        """Slices selecting this ROI from an array."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def __repr__(self) -> str:
        spans = ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop))
        return f"Roi[{spans}]"

    # -- checks -------------------------------------------------------------------
    def _check_ndim(self, n: int, what: str) -> None:
        if n != self.ndim:
            raise RoiError(f"{self!r} has {self.ndim} axes but {what} has {n}")

    def check_inside(self, shape: Sequence[int]) -> Roi:
        """Return self, or raise if it reaches outside an array of ``shape``."""
        self._check_ndim(len(shape), f"shape {tuple(shape)}")
        if any(b > n for b, n in zip(self.stop, shape)):
            raise RoiError(f"{self!r} reaches outside the array of shape {tuple(shape)}")
        return self

    def contains(self, other: Roi) -> bool:
        other._check_ndim(self.ndim, repr(self))
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    def intersects(self, other: Roi) -> bool:
        self._check_ndim(other.ndim, repr(other))
        return all(max(a, c) < min(b, d) for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    # -- algebra ------------------------------------------------------------------
    def intersection(self, other: Roi) -> Roi | None:
        """The overlap of two ROIs, or ``None`` when they do not overlap."""
        if not self.intersects(other):
            return None
        return Roi(
            tuple(max(a, c) for a, c in zip(self.start, other.start)),
            tuple(min(b, d) for b, d in zip(self.stop, other.stop)),
        )

    def union_bounds(self, other: Roi) -> Roi:
        """The smallest ROI containing both."""
        self._check_ndim(other.ndim, repr(other))
        return Roi(
            tuple(min(a, c) for a, c in zip(self.start, other.start)),
            tuple(max(b, d) for b, d in zip(self.stop, other.stop)),
        )

    def grow(self, halo: Sequence[int] | int, shape: Sequence[int]) -> Roi:
        """Grow by ``halo`` on both sides per axis and clip to ``[0, shape)``.

        Clipping is part of growing because a ROI can never be negative; the
        operator's kernel handles the true image border (mirror boundary).
        """
        self._check_ndim(len(shape), f"shape {tuple(shape)}")
        h = (halo,) * self.ndim if isinstance(halo, int) else tuple(halo)
        self._check_ndim(len(h), f"halo {h}")
        if any(x < 0 for x in h):
            raise RoiError(f"halo {h} is negative")
        return Roi(
            tuple(max(0, a - x) for a, x in zip(self.start, h)),
            tuple(min(n, b + x) for b, x, n in zip(self.stop, h, shape)),
        )

    def clip(self, shape: Sequence[int]) -> Roi:
        """Clip to ``[0, shape)``; raises if nothing remains."""
        self._check_ndim(len(shape), f"shape {tuple(shape)}")
        if any(a >= n for a, n in zip(self.start, shape)):
            raise RoiError(f"{self!r} lies outside the array of shape {tuple(shape)}")
        return Roi(self.start, tuple(min(b, n) for b, n in zip(self.stop, shape)))

    def shift(self, offset: Sequence[int]) -> Roi:
        """Translate by ``offset`` (e.g. ``-window.start`` for local coordinates)."""
        self._check_ndim(len(offset), f"offset {tuple(offset)}")
        return Roi(
            tuple(a + o for a, o in zip(self.start, offset)),
            tuple(b + o for b, o in zip(self.stop, offset)),
        )

    def relative_to(self, outer: Roi) -> tuple[slice, ...]:
        """Slices locating this ROI inside an array that covers ``outer``."""
        if not outer.contains(self):
            raise RoiError(f"{self!r} is not inside {outer!r}")
        return tuple(slice(a - c, b - c) for a, b, c in zip(self.start, self.stop, outer.start))

    # -- blocks -------------------------------------------------------------------
    def block_indices(self, block_shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
        """Indices of the blocks of a grid of ``block_shape`` that this ROI touches."""
        self._check_ndim(len(block_shape), f"block shape {tuple(block_shape)}")
        ranges = [range(a // s, (b - 1) // s + 1) for a, b, s in zip(self.start, self.stop, block_shape)]
        return itertools.product(*ranges)

    def iter_blocks(self, block_shape: Sequence[int], shape: Sequence[int]) -> Iterator[Roi]:
        """The ROIs of the grid blocks (clipped to ``shape``) this ROI touches."""
        for idx in self.block_indices(block_shape):
            yield block_roi(idx, block_shape, shape)

    def align(self, block_shape: Sequence[int], shape: Sequence[int]) -> Roi:
        """Expand outwards to whole blocks of ``block_shape``, clipped to ``shape``."""
        self._check_ndim(len(block_shape), f"block shape {tuple(block_shape)}")
        return Roi(
            tuple((a // s) * s for a, s in zip(self.start, block_shape)),
            tuple(min(n, -(-b // s) * s) for b, s, n in zip(self.stop, block_shape, shape)),
        )


def block_roi(index: Sequence[int], block_shape: Sequence[int], shape: Sequence[int]) -> Roi:
    """The ROI of grid block ``index`` clipped to ``shape``."""
    return Roi(
        tuple(i * s for i, s in zip(index, block_shape)),
        tuple(min(n, (i + 1) * s) for i, s, n in zip(index, block_shape, shape)),
    )


def bounding_roi(rois: Sequence[Roi]) -> Roi:
    """The smallest ROI containing all of ``rois`` (at least one)."""
    if not rois:
        raise RoiError("bounding_roi of no ROIs")
    out = rois[0]
    for r in rois[1:]:
        out = out.union_bounds(r)
    return out


def merge_rois(rois: Sequence[Roi], max_count: int = 64) -> tuple[Roi, ...]:
    """Merge overlapping or touching ROIs into their bounding boxes.

    Repeats until no two remaining boxes overlap or touch; if more than
    ``max_count`` remain they collapse into one bounding box, which keeps dirty
    notifications small when thousands of strokes are batched.
    """
    boxes = list(dict.fromkeys(rois))
    changed = True
    while changed and len(boxes) > 1:
        changed = False
        out: list[Roi] = []
        for r in boxes:
            for i, o in enumerate(out):
                if all(max(a, c) <= min(b, d) for a, b, c, d in zip(r.start, r.stop, o.start, o.stop)):
                    out[i] = o.union_bounds(r)
                    changed = True
                    break
            else:
                out.append(r)
        boxes = out
    if len(boxes) > max_count:
        boxes = [bounding_roi(boxes)]
    return tuple(boxes)
