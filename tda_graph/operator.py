"""The Operator base class, input declarations, and the one halo rule.

An operator is a small object with frozen settings. Its output spec is a pure
function of its input specs and settings; its halo is declared once per input
(:meth:`Operator.halo`) and the engine uses that single declaration in both
directions: :func:`required_input_roi` grows requests upstream and
:func:`dirty_output_roi` grows dirty regions downstream.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import GraphError, SettingsError
from .roi import Roi
from .spec import SPATIAL_AXES, ArraySpec

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["InputSlot", "Operator", "PrepareContext", "Window", "NoSettings", "required_input_roi", "dirty_output_roi"]


@dataclass(frozen=True)
class InputSlot:
    """Declaration of one named input.

    Parameters
    ----------
    name : str
        Keyword used when connecting (``graph.add(op, image=src)``).
    axes : tuple of str, optional
        Accepted axes strings (e.g. ``("yx", "zyx")``); ``None`` accepts any.
    dtype_kinds : str
        Accepted numpy dtype kinds (``"b"`` bool, ``"u"``/``"i"`` integers, ``"f"`` float).
    channels : int, optional
        Required channel count (1 also accepts inputs without a ``c`` axis).
    dependency : {"regional", "global"}
        ``"global"``: any change of this input changes the whole output (a trained
        classifier, for instance); the halo rule does not apply.
    """

    name: str
    axes: tuple[str, ...] | None = None
    dtype_kinds: str = "biuf"
    channels: int | None = None
    dependency: str = "regional"

    def __post_init__(self) -> None:
        if self.dependency not in ("regional", "global"):
            raise ValueError(f"dependency must be 'regional' or 'global', not {self.dependency!r}")

    def check(self, spec: ArraySpec) -> str | None:
        """Why ``spec`` cannot be connected here, or ``None`` when it can."""
        if self.axes is not None and spec.axes not in self.axes:
            return f"axes {spec.axes!r} not accepted (accepted: {', '.join(repr(a) for a in self.axes)})"
        if spec.dtype.kind not in self.dtype_kinds:
            return f"dtype {spec.dtype} not accepted (accepted kinds: {self.dtype_kinds!r})"
        if self.channels is not None and spec.n_channels != self.channels:
            return f"{spec.n_channels} channels given, {self.channels} required"
        return None


@dataclass(frozen=True)
class PrepareContext:
    """What :meth:`Operator.prepare` may use: a way to request other nodes."""

    request: Callable[[Operator, Roi], Any]


@dataclass(frozen=True)
class NoSettings:
    """Settings of an operator that has none."""


@dataclass(frozen=True)
class Window:
    """An input array handed to :meth:`Operator.compute`.

    ``data`` covers ``roi`` (in the input's own coordinates and ``axes``): the
    required region grown by the halo and clipped to the input's shape.
    Treat ``data`` as read-only; it may be a view of a cache block.
    """

    data: Any
    roi: Roi
    axes: str

    def local(self, roi: Roi, axes: str) -> tuple[slice, ...]:
        """Slices of ``data`` for region ``roi`` given in ``axes``.

        Window axes missing from ``axes`` are taken whole: pass the spatial
        axes only when output channels do not correspond to input channels.
        """
        out = []
        for i, a in enumerate(self.axes):
            if a in axes:
                j = axes.index(a)
                lo = roi.start[j] - self.roi.start[i]
                hi = roi.stop[j] - self.roi.start[i]
                if lo < 0 or hi > self.roi.shape[i]:
                    raise GraphError(f"{roi!r} ({axes}) is not inside the window {self.roi!r} ({self.axes})")
                out.append(slice(lo, hi))
            else:
                out.append(slice(None))
        return tuple(out)

    def crop(self, roi: Roi, axes: str) -> Any:
        """``data[self.local(roi, axes)]``."""
        return self.data[self.local(roi, axes)]


class Operator(abc.ABC):
    """Base class of every node of a :class:`~tda_graph.Graph`.

    Subclasses declare:

    * ``inputs``: a tuple of :class:`InputSlot` (empty for sources);
    * ``Settings``: a frozen dataclass of the operator's settings;
    * ``cached``: whether the output gets a block cache by default;
    * :meth:`output_spec` (pure), :meth:`halo` (per input, per axis),
      :meth:`compute`; optionally :meth:`settings_dirty`.
    """

    inputs: ClassVar[tuple[InputSlot, ...]] = ()
    Settings: ClassVar[type] = NoSettings
    cached: ClassVar[bool] = False

    def __init__(self, *, name: str | None = None, **settings: Any) -> None:
        self._settings = self._make_settings(None, settings)
        self._name = name
        self._graph: Graph | None = None

    # -- settings -----------------------------------------------------------------
    def _make_settings(self, base: Any, changes: Mapping[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = set(changes) - fields
        if unknown:
            raise SettingsError(
                f"{type(self).__name__} has no setting(s) {sorted(unknown)}; its settings are {sorted(fields)}"
            )
        try:
            if base is None:
                return self.Settings(**changes)
            return dataclasses.replace(base, **changes)
        except SettingsError:
            raise
        except (TypeError, ValueError) as e:
            raise SettingsError(f"invalid settings for {type(self).__name__}: {e}") from e

    @property
    def settings(self) -> Any:
        """The current (frozen) settings."""
        return self._settings

    def configure(self, **changes: Any) -> None:
        """Change settings; in a graph this re-resolves specs and dirties what they affect."""
        if self._graph is not None:
            self._graph.configure(self, **changes)
        else:
            self._settings = self._make_settings(self._settings, changes)

    # -- identity -----------------------------------------------------------------
    @property
    def label(self) -> str:
        """A human-readable name used in messages, stats and drawings."""
        return self._name or f"{type(self).__name__}@{id(self):x}"

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            raise GraphError(f"{self.label} is not part of a graph; add it with graph.add(...)")
        return self._graph

    @property
    def spec(self) -> ArraySpec:
        """The resolved output spec (the node must be in a graph)."""
        return self.graph.spec(self)

    def __repr__(self) -> str:
        return f"<{self.label}>"

    # -- contract for subclasses ----------------------------------------------------
    def slot(self, name: str) -> InputSlot:
        for s in self.inputs:
            if s.name == name:
                return s
        raise GraphError(f"{type(self).__name__} has no input {name!r}; inputs: {[s.name for s in self.inputs]}")

    def check_input(self, name: str, spec: ArraySpec) -> str | None:
        """Why ``spec`` cannot be connected to input ``name`` (``None`` if it can)."""
        return self.slot(name).check(spec)

    @abc.abstractmethod
    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        """The output spec: a pure function of ``inputs`` and ``self.settings``."""

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        """Extra context needed from input ``name`` per axis letter (default none)."""
        return {}

    @abc.abstractmethod
    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        """Compute the output region ``roi`` from input windows grown by the halo."""

    def prepare(self, context: PrepareContext) -> None:
        """Hook run in the requesting thread before this node computes for a request.

        Operators with global state (a classifier that trains on labels) bring
        it up to date here; ``context.request`` may pull other nodes. It runs
        before the request claims its cache blocks (so nested requests never
        wait on this request's own claims); :meth:`is_prepared` is checked
        again after claiming, and the request prepares again if an input
        changed in between. Default: nothing.
        """

    def is_prepared(self) -> bool:
        """Whether the state :meth:`prepare` builds is current (default: always)."""
        return True

    def prepared_state(self) -> object:
        """A value that changes whenever the prepared state or its inputs change (default: ``None``).

        The executor stores a computed block only if this value was the same
        before and after the computation and :meth:`is_prepared` held.
        """
        return None

    def input_changed(self, name: str, rois: tuple[Roi, ...]) -> None:
        """Hook called while a change of input ``name`` over ``rois`` propagates.

        Runs under the graph lock: keep it quick (drop derived state). Default: nothing.
        """

    def settings_dirty(self, old: Any, new: Any, spec: ArraySpec) -> Roi | None:
        """The output region a settings change affects (default: everything; ``None``: nothing)."""
        return Roi.full(spec.shape)

    def input_roi(self, name: str, roi: Roi, out_spec: ArraySpec, in_spec: ArraySpec) -> Roi:
        """Input region (before the halo) that output region ``roi`` reads.

        Default: shared non-channel axes keep their range; the channel axis and
        axes the output lacks are taken whole. Override for resampling operators.
        """
        start, stop = [], []
        for a, n in zip(in_spec.axes, in_spec.shape):
            if a != "c" and a in out_spec.axes:
                j = out_spec.axes.index(a)
                start.append(roi.start[j])
                stop.append(min(roi.stop[j], n))
            else:
                start.append(0)
                stop.append(n)
        return Roi(start, stop)

    def output_region(self, name: str, roi: Roi, in_spec: ArraySpec, out_spec: ArraySpec) -> Roi:
        """Output region (before the halo) that reads input region ``roi``: inverse of :meth:`input_roi`."""
        start, stop = [], []
        for a, n in zip(out_spec.axes, out_spec.shape):
            if a != "c" and a in in_spec.axes:
                j = in_spec.axes.index(a)
                start.append(min(roi.start[j], n - 1))
                stop.append(min(roi.stop[j], n))
            else:
                start.append(0)
                stop.append(n)
        return Roi(start, stop)


def halo_vector(op: Operator, name: str, in_spec: ArraySpec) -> tuple[int, ...]:
    """``op.halo(name)`` as a tuple over the input's axes (validated)."""
    h = op.halo(name, in_spec)
    for a, v in h.items():
        if a not in SPATIAL_AXES + "t" or int(v) < 0:
            raise GraphError(f"{op.label} declares an invalid halo {dict(h)} for input {name!r}")
    return tuple(int(h.get(a, 0)) if a in h else 0 for a in in_spec.axes)


def required_input_roi(op: Operator, name: str, roi: Roi, out_spec: ArraySpec, in_spec: ArraySpec) -> Roi:
    """Request direction of the halo rule: input region needed for output ``roi``."""
    base = op.input_roi(name, roi, out_spec, in_spec)
    return base.grow(halo_vector(op, name, in_spec), in_spec.shape)


def dirty_output_roi(op: Operator, name: str, roi: Roi, in_spec: ArraySpec, out_spec: ArraySpec) -> Roi:
    """Dirty direction of the halo rule: output region changed by input change ``roi``.

    Global inputs dirty everything. Regional inputs grow by the same halo that
    :func:`required_input_roi` adds, mapped onto the output's axes.
    """
    if op.slot(name).dependency == "global":
        return Roi.full(out_spec.shape)
    grown = roi.grow(halo_vector(op, name, in_spec), in_spec.shape)
    return op.output_region(name, grown, in_spec, out_spec)
