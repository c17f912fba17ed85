"""Per-node counters."""

from __future__ import annotations

import threading

__all__ = ["NodeStats", "COUNTERS"]

#: Counter names, all cumulative.
COUNTERS: tuple[str, ...] = (
    "requests",
    "blocks_computed",
    "voxels_computed",
    "cache_hits",
    "cache_misses",
    "evictions",
    "stale_discards",
    "uncached_answers",
    "dirty_events",
    "compute_seconds",
)


class NodeStats:
    """Cumulative counters of one node; read them with :meth:`as_dict`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._values["compute_seconds"] = 0.0

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._values[k] += v

    def __getitem__(self, key: str) -> float:
        return self._values[key]

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        with self._lock:
            for k in self._values:
                self._values[k] = 0.0 if k == "compute_seconds" else 0
