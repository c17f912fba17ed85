"""Channel selection: a view on some named channels of a multi-channel output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tda_graph import ArraySpec, InputSlot, Operator, Roi, SettingsError, SpecError, Window

__all__ = ["ChannelSelector"]


@dataclass(frozen=True)
class ChannelSelectorSettings:
    """Settings of :class:`ChannelSelector`.

    Parameters
    ----------
    channels : str, int or sequence of str and int
        The channels to keep, in output order: channel names of the input, or
        indices into its channel axis. Names are checked against the input when
        the node is connected.
    """

    channels: tuple[str | int, ...] = (0,)

    def __post_init__(self) -> None:
        chans = self.channels
        if isinstance(chans, (str, int, np.integer)):
            chans = (chans,)
        try:
            chans = tuple(chans)
        except TypeError:
            raise SettingsError(
                f"channels must be a channel name, an index or a sequence of them, got {self.channels!r}"
            ) from None
        if not chans:
            raise SettingsError("channels must name at least one channel")
        norm: list[str | int] = []
        for c in chans:
            if isinstance(c, (bool, np.bool_)):
                raise SettingsError(f"channel {c!r} is neither a name nor an index")
            if isinstance(c, (int, np.integer)):
                if c < 0:
                    raise SettingsError(f"channel index {int(c)} is negative; indices count from 0")
                norm.append(int(c))
            elif isinstance(c, str):
                norm.append(c)
            else:
                raise SettingsError(f"channel {c!r} is neither a name (str) nor an index (int)")
        if len(set(norm)) != len(norm):
            raise SettingsError(f"channels {tuple(norm)} select a channel twice")
        object.__setattr__(self, "channels", tuple(norm))


class ChannelSelector(Operator):
    """Some channels of an input with a channel axis, by name or index.

    The output keeps the channel axis (even for one channel) and the chosen
    channels' names. It has no halo: an input change dirties exactly the same
    spatial region of the output (restricted to the selected channels' range).
    Changing ``channels`` dirties the whole output.

    Examples
    --------
    >>> sel = graph.add(ChannelSelector(channels=("foreground",)), image=probabilities)  # doctest: +SKIP
    """

    inputs = (InputSlot("image"),)
    Settings = ChannelSelectorSettings
    cached = False

    def __init__(self, **kw: Any) -> None:
        if "channels" in kw and isinstance(kw["channels"], list):
            kw["channels"] = tuple(kw["channels"])
        super().__init__(**kw)

    def configure(self, **changes: Any) -> None:
        """Change settings (``channels`` may be a list)."""
        if isinstance(changes.get("channels"), list):
            changes["channels"] = tuple(changes["channels"])
        super().configure(**changes)

    def indices(self, spec: ArraySpec) -> tuple[int, ...]:
        """Input channel indices selected by the settings, in output order.

        Raises
        ------
        SettingsError
            If a name is not a channel of ``spec`` or an index is out of range.
        """
        if "c" not in spec.axes:
            raise SpecError(f"ChannelSelector needs an input with a channel axis 'c', got {spec.describe()}")
        names = spec.channel_names
        out: list[int] = []
        for c in self.settings.channels:
            if isinstance(c, int):
                if c >= len(names):
                    raise SettingsError(
                        f"channel index {c} is out of range: the input has {len(names)} channels (0..{len(names) - 1})"
                    )
                out.append(c)
            else:
                if c not in names:
                    raise SettingsError(
                        f"unknown channel {c!r}; the input's channels are {list(names)} (select by name or index)"
                    )
                out.append(names.index(c))
        if len(set(out)) != len(out):
            raise SettingsError(f"channels {self.settings.channels} select the same input channel twice")
        return tuple(out)

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        src = inputs["image"]
        idx = self.indices(src)
        shape = src.shape[:-1] + (len(idx),)
        return ArraySpec(shape, src.dtype, src.axes, tuple(src.channel_names[i] for i in idx))

    def output_region(self, name: str, roi: Roi, in_spec: ArraySpec, out_spec: ArraySpec) -> Roi:
        """Same spatial region; on the channel axis the range of selected channels that changed."""
        base = super().output_region(name, roi, in_spec, out_spec)
        c0, c1 = roi.start[-1], roi.stop[-1]
        hit = [j for j, i in enumerate(self.indices(in_spec)) if c0 <= i < c1]
        if not hit:  # an unselected channel changed: keep the (conservative) whole channel range
            return base
        return Roi(base.start[:-1] + (min(hit),), base.stop[:-1] + (max(hit) + 1,))

    def settings_dirty(self, old: Any, new: Any, spec: ArraySpec) -> Roi | None:
        return None if old == new else Roi.full(spec.shape)

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        w = inputs["image"]
        spatial = w.local(roi, self.spec.axes[:-1])[:-1]
        idx = list(self.indices(self.graph.inputs_of(self)["image"].spec)[roi.start[-1] : roi.stop[-1]])
        return np.ascontiguousarray(w.data[spatial + (idx,)])
