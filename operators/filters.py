"""Simple filter operators on plain scipy kernels."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tda_graph import ArraySpec, InputSlot, Operator, Roi, SettingsError, Window
from tda_graph.spec import SPATIAL_AXES

__all__ = ["GaussianSmoothing", "MeanFilter", "Scale"]


def _spatial_vector(axes: str, value: float) -> list[float]:
    return [value if a in SPATIAL_AXES else 0 for a in axes]


@dataclass(frozen=True)
class GaussianSettings:
    sigma: float = 1.0
    truncate: float = 4.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise SettingsError(f"sigma must be a positive number, got {self.sigma!r}")
        if not (math.isfinite(self.truncate) and self.truncate > 0):
            raise SettingsError(f"truncate must be a positive number, got {self.truncate!r}")


class GaussianSmoothing(Operator):
    """Gaussian smoothing over the spatial axes (each channel and time point alone).

    Output is float32. The kernel radius is ``int(truncate * sigma + 0.5)``
    (scipy's rule), which is exactly the halo this operator declares, so ROI
    results equal the whole-image result cropped, bit for bit. Boundary: mirror
    with the edge sample repeated (scipy ``mode="reflect"``).
    """

    inputs = (InputSlot("image"),)
    Settings = GaussianSettings
    cached = True

    @property
    def radius(self) -> int:
        s = self.settings
        return int(s.truncate * s.sigma + 0.5)

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        src = inputs["image"]
        return ArraySpec(src.shape, np.float32, src.axes, src.channel_names)

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        return {a: self.radius for a in spec.spatial_axes}

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        w = inputs["image"]
        data = np.asarray(w.data, dtype=np.float32)
        s = self.settings
        out = ndimage.gaussian_filter(
            data, _spatial_vector(w.axes, s.sigma), mode="reflect", truncate=s.truncate, output=np.float32
        )
        return out[w.local(roi, w.axes)]


@dataclass(frozen=True)
class MeanSettings:
    radius: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise SettingsError(f"radius must be an integer >= 0, got {self.radius!r}")


class MeanFilter(Operator):
    """Mean over a ``(2·radius+1)`` box on the spatial axes; float32 output, halo = radius."""

    inputs = (InputSlot("image"),)
    Settings = MeanSettings
    cached = False

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        src = inputs["image"]
        return ArraySpec(src.shape, np.float32, src.axes, src.channel_names)

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        return {a: self.settings.radius for a in spec.spatial_axes}

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        w = inputs["image"]
        size = [2 * self.settings.radius + 1 if a in SPATIAL_AXES else 1 for a in w.axes]
        out = ndimage.uniform_filter(np.asarray(w.data, dtype=np.float32), size, mode="reflect", output=np.float32)
        return out[w.local(roi, w.axes)]


@dataclass(frozen=True)
class ScaleSettings:
    factor: float = 1.0
    offset: float = 0.0


class Scale(Operator):
    """Pointwise ``factor * x + offset`` in float32 (no halo): a cheap operator for chains."""

    inputs = (InputSlot("image"),)
    Settings = ScaleSettings
    cached = False

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        src = inputs["image"]
        return ArraySpec(src.shape, np.float32, src.axes, src.channel_names)

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        s = self.settings
        w = inputs["image"]
        x = np.asarray(w.crop(roi, w.axes), dtype=np.float32)
        return (x * np.float32(s.factor) + np.float32(s.offset)).astype(np.float32, copy=False)
