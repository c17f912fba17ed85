"""Shared fixtures: the development data folder and small helper operators."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tda_graph import ArraySpec, InputSlot, Operator, Roi, Window

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests using it skip cleanly when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"development data not found at {DATA}")
    return DATA


@dataclass(frozen=True)
class HookSettings:
    halo: int = 0


class Hook(Operator):
    """Identity (as float32) with a settable halo and a callback run inside compute.

    ``hook(roi)`` lets tests make a computation slow, block on an event, or raise.
    """

    inputs = (InputSlot("image"),)
    Settings = HookSettings
    cached = True

    def __init__(self, hook: Callable[[Roi], None] | None = None, **kw: object) -> None:
        super().__init__(**kw)
        self.hook = hook
        self.calls = 0
        self._lock = threading.Lock()

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        s = inputs["image"]
        return ArraySpec(s.shape, np.float32, s.axes, s.channel_names)

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        return {a: self.settings.halo for a in spec.spatial_axes}

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        with self._lock:
            self.calls += 1
        if self.hook is not None:
            self.hook(roi)
        w = inputs["image"]
        return np.asarray(w.crop(roi, w.axes), dtype=np.float32).copy()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
