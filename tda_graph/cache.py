"""Versioned block caches and the graph-wide memory budget (LRU).

Each cached output owns a :class:`BlockCache` on a fixed block grid. Every
block carries a version counter that :meth:`BlockCache.invalidate` bumps. A
computation claims a block (recording the version) *before* it reads any input;
its result is stored only if the version is unchanged when it finishes, so a
result computed from superseded inputs is never stored or handed out as fresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .roi import Roi, block_roi
from .stats import NodeStats

__all__ = ["BlockCache", "CacheManager", "Claim"]

BlockIndex = tuple[int, ...]


@dataclass(eq=False)
class Claim:
    """The right to compute one block; others wait on ``future``.

    ``future`` resolves to ``(data, fresh)``; ``fresh`` is False when the block
    was invalidated while being computed (waiters must then recompute), and the
    future raises when the claimant failed or was cancelled.
    """

    index: BlockIndex
    version: int
    future: Future = field(default_factory=Future)


class CacheManager:
    """Graph-wide memory budget with least-recently-used eviction across caches."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("cache budget must be >= 0 bytes")
        self.budget_bytes = int(budget_bytes)
        self._lru: OrderedDict[tuple[int, BlockIndex], tuple[BlockCache, int, object]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def _key(self, cache: BlockCache, idx: BlockIndex) -> tuple[int, BlockIndex]:
        return (id(cache), idx)

    def add(self, cache: BlockCache, idx: BlockIndex, nbytes: int, token: object) -> None:
        with self._lock:
            key = self._key(cache, idx)
            old = self._lru.pop(key, None)
            if old is not None:
                self._used -= old[1]
            self._lru[key] = (cache, nbytes, token)
            self._used += nbytes
            victims = []
            while self._used > self.budget_bytes and self._lru:
                _, (c, n, t) = self._lru.popitem(last=False)
                self._used -= n
                victims.append((c, t))
        # Dropping outside the manager lock: caches take their own lock to drop,
        # and a cache calls add() without holding its lock, so no lock cycle.
        for c, t in victims:
            c._drop_evicted(t)

    def touch(self, cache: BlockCache, idx: BlockIndex) -> None:
        with self._lock:
            key = self._key(cache, idx)
            if key in self._lru:
                self._lru.move_to_end(key)

    def remove(self, cache: BlockCache, idx: BlockIndex) -> None:
        with self._lock:
            old = self._lru.pop(self._key(cache, idx), None)
            if old is not None:
                self._used -= old[1]

    def set_budget(self, budget_bytes: int) -> None:
        with self._lock:
            self.budget_bytes = int(budget_bytes)
            victims = []
            while self._used > self.budget_bytes and self._lru:
                _, (c, n, t) = self._lru.popitem(last=False)
                self._used -= n
                victims.append((c, t))
        for c, t in victims:
            c._drop_evicted(t)


@dataclass(eq=False)
class _Entry:
    index: BlockIndex
    data: np.ndarray


class BlockCache:
    """Blocks of one output on a grid of ``block_shape``, versioned per block."""

    def __init__(
        self, shape: tuple[int, ...], block_shape: tuple[int, ...], manager: CacheManager, stats: NodeStats
    ) -> None:
        self.shape = tuple(shape)
        self.block_shape = tuple(block_shape)
        self._manager = manager
        self._stats = stats
        self._lock = threading.Lock()
        self._entries: dict[BlockIndex, _Entry] = {}
        self._versions: dict[BlockIndex, int] = {}
        self._inflight: dict[BlockIndex, Claim] = {}
        self._closed = False

    # -- queries --------------------------------------------------------------------
    def block_roi(self, idx: BlockIndex) -> Roi:
        return block_roi(idx, self.block_shape, self.shape)

    def blocks_of(self, roi: Roi) -> list[BlockIndex]:
        return list(roi.block_indices(self.block_shape))

    def has(self, idx: BlockIndex) -> bool:
        return idx in self._entries

    def version(self, idx: BlockIndex) -> int:
        return self._versions.get(idx, 0)

    def cached_indices(self) -> frozenset[BlockIndex]:
        with self._lock:
            return frozenset(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.data.nbytes for e in self._entries.values())

    def get(self, idx: BlockIndex) -> np.ndarray | None:
        """The cached block (read-only) or ``None``; counts a hit or miss."""
        with self._lock:
            e = self._entries.get(idx)
        if e is None:
            self._stats.add(cache_misses=1)
            return None
        self._manager.touch(self, idx)
        self._stats.add(cache_hits=1)
        return e.data

    # -- claims ---------------------------------------------------------------------
    def claim(self, idx: BlockIndex) -> tuple[str, Any]:
        """Look up a block, or claim the right to compute it.

        Returns ``("hit", data)``, ``("wait", future)`` when another computation
        of the same block version is in flight, or ``("claimed", Claim)``.
        """
        with self._lock:
            e = self._entries.get(idx)
            if e is None:
                c = self._inflight.get(idx)
                if c is None:
                    c = Claim(idx, self._versions.get(idx, 0))
                    self._inflight[idx] = c
                    kind: str = "claimed"
                else:
                    kind = "wait"
        if e is not None:
            self._manager.touch(self, idx)
            self._stats.add(cache_hits=1)
            return "hit", e.data
        self._stats.add(cache_misses=1)
        return (kind, c) if kind == "claimed" else (kind, c.future)

    def begin(self, idx: BlockIndex) -> int:
        """Record the version of a block before an unclaimed computation reads inputs."""
        with self._lock:
            return self._versions.get(idx, 0)

    def complete(self, claim: Claim, data: np.ndarray) -> bool:
        """Finish a claim; store ``data`` if the block is still at the claimed version.

        Returns whether the data was fresh (and stored).
        """
        fresh = self.store(claim.index, claim.version, data, _claim=claim)
        claim.future.set_result((data, fresh))
        return fresh

    def abandon(self, claim: Claim, error: BaseException) -> None:
        """Release a claim that will not be completed (error or cancellation)."""
        with self._lock:
            if self._inflight.get(claim.index) is claim:
                del self._inflight[claim.index]
        if not claim.future.done():
            claim.future.set_exception(error)

    def store(self, idx: BlockIndex, version: int, data: np.ndarray, *, _claim: Claim | None = None) -> bool:
        """Store a block computed at ``version``; refused (stale) if the block was invalidated since."""
        data.flags.writeable = False
        with self._lock:
            if _claim is not None and self._inflight.get(idx) is _claim:
                del self._inflight[idx]
            fresh = not self._closed and self._versions.get(idx, 0) == version
            entry = None
            if fresh:
                entry = _Entry(idx, data)
                self._entries[idx] = entry
        if entry is None:
            self._stats.add(stale_discards=1)
            return False
        self._manager.add(self, idx, data.nbytes, entry)
        return True

    # -- invalidation ------------------------------------------------------------------
    def invalidate(self, rois: Iterable[Roi]) -> int:
        """Bump the version of every block touching ``rois`` and drop their data.

        In-flight claims of those blocks are detached: their result will be
        refused as stale and new requests claim afresh.
        """
        indices: set[BlockIndex] = set()
        for r in rois:
            indices.update(r.block_indices(self.block_shape))
        dropped = []
        with self._lock:
            for idx in indices:
                self._versions[idx] = self._versions.get(idx, 0) + 1
                if self._entries.pop(idx, None) is not None:
                    dropped.append(idx)
                self._inflight.pop(idx, None)
        for idx in dropped:
            self._manager.remove(self, idx)
        return len(dropped)

    def close(self) -> None:
        """Drop everything and refuse later stores (the output's spec changed)."""
        with self._lock:
            self._closed = True
            dropped = list(self._entries)
            self._entries.clear()
            self._inflight.clear()
        for idx in dropped:
            self._manager.remove(self, idx)

    def _drop_evicted(self, token: object) -> None:
        entry: Any = token
        with self._lock:
            if self._entries.get(entry.index) is entry:
                del self._entries[entry.index]
                evicted = True
            else:
                evicted = False
        if evicted:
            self._stats.add(evictions=1)
