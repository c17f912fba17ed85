"""Typed, frozen metadata of an operator output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import SpecError

__all__ = ["ArraySpec", "SPATIAL_AXES", "AXES_ORDER"]

#: Axis letters tda-graph understands, in canonical order.
AXES_ORDER = "tzyxc"
#: Axes that filters smooth over (halos apply here).
SPATIAL_AXES = "zyx"


@dataclass(frozen=True)
class ArraySpec:
    """Shape, dtype and meaning of an array output.

    Parameters
    ----------
    shape : tuple of int
        Full array shape.
    dtype : numpy dtype (anything ``np.dtype`` accepts)
        Element type.
    axes : str
        One letter per axis from ``"tzyxc"`` in that order, e.g. ``"yx"``, ``"zyxc"``.
    channel_names : tuple of str, optional
        One name per channel when ``"c"`` is an axis; defaults to ``"channel 0"``, ...
    block_shape : tuple of int, optional
        Hint for the cache block grid; the engine picks a default when absent.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str
    channel_names: tuple[str, ...] = ()
    block_shape: tuple[int, ...] | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        object.__setattr__(self, "shape", shape)
        try:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        except TypeError as e:
            raise SpecError(f"ArraySpec dtype {self.dtype!r} is not a numpy dtype") from e
        axes = self.axes
        if not isinstance(axes, str) or not axes:
            raise SpecError(f"axes must be a non-empty string such as 'yx' or 'zyxc', got {axes!r}")
        bad = set(axes) - set(AXES_ORDER)
        if bad:
            raise SpecError(f"axes {axes!r} contain unknown letters {sorted(bad)}; use letters of 'tzyxc'")
        if len(set(axes)) != len(axes):
            raise SpecError(f"axes {axes!r} repeat a letter")
        if list(axes) != sorted(axes, key=AXES_ORDER.index):
            raise SpecError(f"axes {axes!r} are out of order; tda-graph uses the order 't z y x c'")
        if not any(a in SPATIAL_AXES for a in axes):
            raise SpecError(f"axes {axes!r} have no spatial axis (z, y or x)")
        if len(axes) != len(shape):
            raise SpecError(f"axes {axes!r} name {len(axes)} axes but the shape {shape} has {len(shape)}")
        if any(n <= 0 for n in shape):
            raise SpecError(f"shape {shape} has an empty axis; every axis needs at least one element")
        names = tuple(str(n) for n in self.channel_names)
        if "c" in axes:
            nc = shape[axes.index("c")]
            if not names:
                names = tuple(f"channel {i}" for i in range(nc))
            if len(names) != nc:
                raise SpecError(f"{len(names)} channel names given for {nc} channels")
        elif names:
            raise SpecError(f"channel names {names} given but axes {axes!r} have no channel axis 'c'")
        object.__setattr__(self, "channel_names", names)
        if self.block_shape is not None:
            bs = tuple(int(n) for n in self.block_shape)
            if len(bs) != len(shape) or any(n <= 0 for n in bs):
                raise SpecError(f"block shape {bs} does not fit shape {shape}")
            object.__setattr__(self, "block_shape", bs)

    # -- derived ------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_channels(self) -> int:
        return self.shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL_AXES)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Lengths of the spatial axes, in axes order."""
        return tuple(n for a, n in zip(self.axes, self.shape) if a in SPATIAL_AXES)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def size_of(self, axis: str) -> int:
        """Length of axis ``axis`` (a letter)."""
        if axis not in self.axes:
            raise SpecError(f"axis {axis!r} not in axes {self.axes!r}")
        return self.shape[self.axes.index(axis)]

    def default_block_shape(self) -> tuple[int, ...]:
        """The cache grid: the hint if given, else ~256² in 2D and 64³ in 3D, whole channels, one t."""
        if self.block_shape is not None:
            return self.block_shape
        nspatial = len(self.spatial_axes)
        side = {1: 65536, 2: 256}.get(nspatial, 64)
        out = []
        for a, n in zip(self.axes, self.shape):
            if a == "c":
                out.append(n)
            elif a == "t":
                out.append(1)
            else:
                out.append(min(n, side))
        return tuple(out)

    def with_(self, **changes: object) -> ArraySpec:
        """A copy with fields replaced (specs are never mutated)."""
        return replace(self, **changes)

    def describe(self) -> str:
        return f"{self.axes} {self.shape} {self.dtype}"

    @classmethod
    def like(cls, array: np.ndarray, axes: str, channel_names: Sequence[str] = ()) -> ArraySpec:
        return cls(tuple(array.shape), array.dtype, axes, tuple(channel_names))
