"""The FeatureFilters operator: ilastik's pixel-classification filter bank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tda_graph import ArraySpec, InputSlot, Operator, Roi, SettingsError, SpecError, Window

from .kernels import feature_table as ft

__all__ = ["FeatureFilters", "DEFAULT_SELECTION", "normalize_selection"]

#: A compact default (the scales shallow2deep's forests use): 6 features at σ 0.7, 1.6, 3.5, 5.0.
DEFAULT_SELECTION: dict[str, list[float]] = {fid: [0.7, 1.6, 3.5, 5.0] for fid in ft.FEATURE_IDS}

Selection = Mapping[str, Sequence[float]] | Sequence[tuple[str, float]]


def normalize_selection(selection: Selection | str) -> tuple[tuple[str, float], ...]:
    """Canonical ``((feature_id, sigma), ...)`` in ilastik order (feature, then σ).

    Accepts ``{"GaussianSmoothing": [1.0, 3.5], ...}``, a sequence of pairs, or
    ``"all"`` / ``"default"``.
    """
    if isinstance(selection, str):
        if selection == "all":
            return tuple(ft.all_features_selection())
        if selection == "default":
            selection = DEFAULT_SELECTION
        else:
            raise SettingsError(f"unknown feature preset {selection!r}; use 'default', 'all' or a mapping")
    pairs: list[tuple[str, float]] = []
    if isinstance(selection, Mapping):
        for fid, sigmas in selection.items():
            if isinstance(sigmas, (int, float)):
                sigmas = [sigmas]
            pairs.extend((str(fid), float(s)) for s in sigmas)
    else:
        for item in selection:
            try:
                fid, s = item
            except (TypeError, ValueError):
                raise SettingsError(f"selection entries must be (feature_id, sigma) pairs, got {item!r}") from None
            pairs.append((str(fid), float(s)))
    if not pairs:
        raise SettingsError("the feature selection is empty; select at least one feature and scale")
    for fid, s in pairs:
        if fid not in ft.FEATURE_IDS:
            raise SettingsError(f"unknown feature id {fid!r}; known: {', '.join(ft.FEATURE_IDS)}")
        valid = ft.valid_sigmas(fid)
        if not any(abs(s - v) < 1e-9 for v in valid):
            why = " (ilastik offers σ=0.3 for GaussianSmoothing only)" if abs(s - 0.3) < 1e-9 else ""
            raise SettingsError(f"scale σ={s} is not allowed for {fid}{why}; valid: {', '.join(map(str, valid))}")
    order = {f: i for i, f in enumerate(ft.FEATURE_IDS)}
    return tuple(sorted(dict.fromkeys(pairs), key=lambda p: (order[p[0]], p[1])))


@dataclass(frozen=True)
class FeatureSettings:
    selection: tuple[tuple[str, float], ...] = ()
    in_2d: bool = False
    backend: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "selection", normalize_selection(self.selection or "default"))
        if self.backend not in ("cpu", "cuda"):
            raise SettingsError(f"backend must be 'cpu' or 'cuda', got {self.backend!r}")
        object.__setattr__(self, "in_2d", bool(self.in_2d))


class FeatureFilters(Operator):
    """ilastik's filter features of an image (float32, channels last, named).

    Parameters
    ----------
    selection : mapping or sequence or str
        ``{"HessianOfGaussianEigenvalues": [1.6], ...}`` (ilastik feature ids), a
        sequence of ``(id, sigma)`` pairs, or ``"default"`` / ``"all"``.
    in_2d : bool
        For 3D images: filter each z slice on its own (no halo along z).
    backend : {"cpu", "cuda"}
        numba kernels on the CPU, or cupy kernels on the GPU (outputs stay on the device).

    Notes
    -----
    Halo per filtered axis: ``ceil(3.5·σ_max)`` plus the structure tensor's outer
    radius ``ceil(3.5·σ/2)`` when selected. With a multi-channel input each
    input channel gets all features (input-channel major). A scale whose kernel
    does not fit an axis (``ceil(3.5σ)+1`` > length) is rejected at connect time.
    """

    inputs = (InputSlot("image", axes=("yx", "yxc", "zyx", "zyxc")),)
    Settings = FeatureSettings
    cached = True

    def __init__(
        self,
        selection: Selection | str = "default",
        in_2d: bool = False,
        backend: str = "cpu",
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name, selection=normalize_selection(selection), in_2d=in_2d, backend=backend)

    def configure(self, **changes: Any) -> None:
        if "selection" in changes:
            changes["selection"] = normalize_selection(changes["selection"])
        super().configure(**changes)

    @property
    def halo_size(self) -> int:
        return ft.halo(self.settings.selection)

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        img = inputs["image"]
        s = self.settings
        spatial = tuple(n for a, n in zip(img.axes, img.shape) if a != "c")
        try:
            ft.validate(s.selection, spatial, s.in_2d)
        except ValueError as e:
            raise SpecError(str(e)) from e
        nd = len(spatial)
        n_in = img.n_channels
        names = ft.channel_names(s.selection, nd, s.in_2d, n_in, img.channel_names if "c" in img.axes else None)
        axes = img.spatial_axes + "c"
        # per-slice features (in_2d) are 2D work: 256² tiles, one slice deep
        side = 256 if (nd == 2 or s.in_2d) else (64 if self.halo_size <= 16 else 128)
        block = tuple(min(n, 1 if (s.in_2d and a == "z") else side) for a, n in zip(img.spatial_axes, spatial))
        return ArraySpec(spatial + (len(names),), np.float32, axes, names, block_shape=block + (len(names),))

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        h = self.halo_size
        return {a: (0 if (self.settings.in_2d and a == "z") else h) for a in spec.spatial_axes}

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> Any:
        w = inputs["image"]
        s = self.settings
        data = w.data if "c" in w.axes else w.data[..., None]
        if s.backend == "cuda":
            from .kernels import features_gpu as kernels
        else:
            from .kernels import features_cpu as kernels  # type: ignore[no-redef]
        feats = kernels.compute_features(data, s.selection, in_2d=s.in_2d)
        spatial = self.spec.spatial_axes
        local = w.local(Roi(roi.start[:-1], roi.stop[:-1]), spatial)
        if "c" in w.axes:
            local = local[:-1]
        return feats[local + (slice(roi.start[-1], roi.stop[-1]),)]
