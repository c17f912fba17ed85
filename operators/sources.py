"""Data sources: operators without inputs."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tda_graph import ArraySpec, Operator, Roi, RoiError, SpecError, Window

__all__ = ["ArraySource"]


class ArraySource(Operator):
    """An in-memory numpy array as a graph source.

    Parameters
    ----------
    data : numpy.ndarray
        The array. It is used without copying, so :meth:`write` changes it.
    axes : str
        Axis letters of ``data`` from ``"tzyxc"`` in that order, e.g. ``"yx"``.
    channel_names : sequence of str, optional
        Names of the channels when ``axes`` has ``"c"``.
    """

    def __init__(self, data: Any, axes: str, *, channel_names: Sequence[str] = (), name: str | None = None) -> None:
        super().__init__(name=name)
        self._lock = threading.Lock()
        self._version = 0
        self._set(data, axes, channel_names)

    def _set(self, data: Any, axes: str, channel_names: Sequence[str]) -> None:
        arr = np.asarray(data)
        if arr.dtype.kind not in "biuf":
            raise SpecError(f"ArraySource needs a boolean, integer or float array, got dtype {arr.dtype}")
        try:
            spec = ArraySpec(arr.shape, arr.dtype, axes, tuple(channel_names))
        except SpecError as e:
            raise SpecError(f"ArraySource with data of shape {arr.shape}: {e}") from e
        self._data = arr
        self._spec = spec

    @property
    def version(self) -> int:
        """Incremented by every :meth:`write` and :meth:`set_data`."""
        return self._version

    @property
    def data(self) -> np.ndarray:
        return self._data

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        return self._spec

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        # Copy under the lock so a concurrent write is never seen half-done.
        with self._lock:
            return self._data[roi.to_slices()].copy()

    def write(self, roi: Roi, values: Any) -> None:
        """Replace the region ``roi`` by ``values`` (broadcast) and mark it dirty."""
        roi.check_inside(self._spec.shape)
        vals = np.asarray(values)
        try:
            np.broadcast_shapes(vals.shape, roi.shape)
        except ValueError:
            raise RoiError(f"values of shape {vals.shape} do not fit {roi!r} of shape {roi.shape}") from None
        with self._lock:
            self._data[roi.to_slices()] = vals
            self._version += 1
        if self._graph is not None:
            self._graph.mark_dirty(self, roi)

    def set_data(self, data: Any, axes: str | None = None, *, channel_names: Sequence[str] = ()) -> None:
        """Replace the whole array (shape may change); everything downstream is dirtied."""
        with self._lock:
            self._set(data, axes or self._spec.axes, channel_names)
            self._version += 1
        if self._graph is not None:
            self._graph.spec_changed(self)
