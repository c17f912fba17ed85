"""Running a :class:`~tda_graph.planning.Plan` on a thread pool.

One *orchestrator* (the requesting thread, or a request thread for async
requests) owns a run: it claims the cache blocks it will compute, submits a
task to the worker pool as soon as its inputs are done, and assembles the
answer. Workers never wait on anything, so a bounded pool cannot deadlock;
surprises (a present block evicted before use, a block another request was
computing that turned out stale or failed) are handled by computing the block
serially inside the worker that needs it (:meth:`Run.pull`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cache import BlockCache, Claim
from .errors import OperatorError, RequestCancelled, TdaError
from .operator import Operator, PrepareContext, Window
from .planning import Plan, Topology
from .roi import Roi
from .stats import NodeStats

__all__ = ["Run", "invoke"]


def _as_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def invoke(op: Operator, info_spec: Any, roi: Roi, windows: Mapping[str, Window], stats: NodeStats) -> Any:
    """Call ``op.compute`` with error wrapping, output checks and counters."""
    t0 = time.perf_counter()
    try:
        out = op.compute(roi, windows)
    except TdaError as e:
        if isinstance(e, OperatorError):
            raise
        raise OperatorError(f"{op.label} failed computing {roi!r}: {e}", operator=op.label, roi=roi) from e
    except Exception as e:  # noqa: BLE001 - chained, never swallowed
        raise OperatorError(
            f"{op.label} failed computing {roi!r}: {type(e).__name__}: {e}", operator=op.label, roi=roi
        ) from e
    dt = time.perf_counter() - t0
    if not _as_array_like(out):
        raise OperatorError(
            f"{op.label} returned {type(out).__name__} for {roi!r}; compute must return an array",
            operator=op.label,
            roi=roi,
        )
    if tuple(out.shape) != roi.shape or out.dtype != info_spec.dtype:
        raise OperatorError(
            f"{op.label} returned {out.dtype}{tuple(out.shape)} for {roi!r}; "
            f"its spec promises {info_spec.dtype}{roi.shape}",
            operator=op.label,
            roi=roi,
        )
    stats.add(blocks_computed=1, voxels_computed=roi.size, compute_seconds=dt)
    return out


@dataclass(eq=False)
class _Task:
    node: Operator
    roi: Roi
    index: tuple[int, ...] | None = None  # block index for cached nodes
    claim: Claim | None = None
    waiting: Future | None = None
    deps: set[_Task] = field(default_factory=set)
    dependents: list[_Task] = field(default_factory=list)
    done: bool = False


_PREPARE_ATTEMPTS = 3  # prepare -> claim rounds before answering without caching


class Run:
    """The execution of one plan. Not reused; create one per request."""

    def __init__(
        self,
        topology: Topology,
        plan: Plan,
        caches: Mapping[Operator, BlockCache],
        stats: Mapping[Operator, NodeStats],
        pool: Executor,
        cancel: threading.Event | None = None,
        context: PrepareContext | None = None,
    ) -> None:
        self.topo = topology
        self.plan = plan
        self.caches = caches
        self.stats = stats
        self.pool = pool
        self.cancel = cancel or threading.Event()
        self.context = context
        # Results of this run, kept until it ends so eviction cannot take them away.
        self.blocks: dict[tuple[Operator, tuple[int, ...]], Any] = {}
        self.results: dict[tuple[Operator, Roi], Any] = {}

    # -- planning into tasks -------------------------------------------------------------
    def _build_tasks(self) -> list[_Task]:
        tasks: list[_Task] = []
        by_key: dict[tuple[Operator, Roi], _Task] = {}
        by_block: dict[tuple[Operator, tuple[int, ...]], _Task] = {}
        for node in self.plan.order:
            info = self.topo.nodes[node]
            for r in self.plan.tasks[node]:
                t = _Task(node, r)
                if info.cached:
                    t.index = tuple(a // s for a, s in zip(r.start, info.block_shape))
                    by_block[(node, t.index)] = t
                by_key[(node, r)] = t
                tasks.append(t)
        # Claim before any input is read: the claim records the block version
        # that the stale-write guard compares against when storing. Downstream
        # first, so every version is recorded before any upstream data (a hit)
        # is taken: an edit in between then always bumps the version.
        for t in reversed(tasks):
            if t.index is None:
                continue
            kind, payload = self.caches[t.node].claim(t.index)
            if kind == "hit":
                self.blocks[(t.node, t.index)] = payload
                t.done = True
            elif kind == "wait":
                t.waiting = payload
            else:
                t.claim = payload
        for t in tasks:
            if t.done or t.waiting is not None:
                continue
            info = self.topo.nodes[t.node]
            for name, up in info.inputs:
                win = self.topo.window(t.node, name, up, t.roi)
                upinfo = self.topo.nodes[up]
                if upinfo.cached:
                    for idx in win.block_indices(upinfo.block_shape):
                        d = by_block.get((up, idx))
                        if d is not None and not d.done:
                            t.deps.add(d)
                else:
                    d = by_key.get((up, win))
                    if d is None:  # the planner always plans this; keep a clear failure if not
                        raise TdaError(f"internal planning error: {up.label} {win!r} missing from the plan")
                    t.deps.add(d)
            for d in t.deps:
                d.dependents.append(t)
        return [t for t in tasks if not t.done]

    # -- execution ----------------------------------------------------------------------------
    def execute(self) -> Any:
        """Compute everything the plan needs and return the requested array."""
        self.stats[self.plan.output].add(requests=1)
        tasks = self._prepare_and_claim()
        events: queue.SimpleQueue = queue.SimpleQueue()
        pending = set(tasks)
        started: set[_Task] = set()

        def start(t: _Task) -> None:
            started.add(t)
            fut = t.waiting if t.waiting is not None else self.pool.submit(self._run_task, t)
            fut.add_done_callback(lambda f, t=t: events.put((t, f)))

        try:
            for t in tasks:
                if not t.deps:
                    start(t)
            while pending:
                if self.cancel.is_set():
                    raise RequestCancelled(f"request for {self.plan.output.label} {self.plan.roi!r} was cancelled")
                try:
                    t, fut = events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if t.waiting is not None and fut is t.waiting:
                    ok = False
                    if fut.exception() is None:
                        data, fresh = fut.result()
                        if fresh:
                            self.blocks[(t.node, t.index)] = data
                            ok = True
                    if not ok:
                        # The other computation failed or went stale: compute it ourselves,
                        # preparing first here (the requesting thread; never in a worker, where
                        # nested requests could starve the pool).
                        t.waiting = None
                        if self.context is not None:
                            for node in self.plan.order:
                                node.prepare(self.context)
                        f2 = self.pool.submit(self._run_fallback, t)
                        f2.add_done_callback(lambda f, t=t: events.put((t, f)))
                        continue
                else:
                    exc = fut.exception()
                    if exc is not None:
                        raise exc
                pending.discard(t)
                for d in t.dependents:
                    d.deps.discard(t)
                    if not d.deps and d not in started:
                        start(d)
            return self._assemble(self.plan.output, self.plan.roi, copy=True)
        finally:
            err = RequestCancelled("the request that claimed this block stopped before computing it")
            for t in tasks:
                if t.claim is not None and t not in started:
                    self.caches[t.node].abandon(t.claim, err)

    def _prepare_and_claim(self) -> list[_Task]:
        """Prepare the planned nodes, then claim blocks; again if an input changed in between.

        Preparing first lets ``prepare`` request other nodes without waiting on
        this run's own claims. Claims record block versions, so a change after
        claiming is caught by the stale-write guard; a change between preparing
        and claiming is caught here by :meth:`Operator.is_prepared`.
        """
        for attempt in range(_PREPARE_ATTEMPTS):
            if self.context is not None:
                for node in self.plan.order:
                    node.prepare(self.context)
            tasks = self._build_tasks()
            if all(node.is_prepared() for node in self.plan.order):
                return tasks
            err = RequestCancelled("the request that claimed this block is preparing again")
            for t in tasks:
                if t.claim is not None:
                    self.caches[t.node].abandon(t.claim, err)
                    t.claim = None
            if attempt + 1 < _PREPARE_ATTEMPTS:
                self.blocks.clear()
        # Inputs keep changing faster than preparing takes (e.g. strokes while the
        # forest trains): answer from the last prepared state, consistent with an
        # earlier input version, but store nothing in the caches as current.
        self.stats[self.plan.output].add(uncached_answers=1)
        return tasks

    def _run_task(self, t: _Task) -> None:
        if self.cancel.is_set():
            if t.claim is not None:
                self.caches[t.node].abandon(t.claim, RequestCancelled("request cancelled"))
            return
        try:
            before = _prepared(t.node)
            data = self._compute(t.node, t.roi)
            current = before is not None and _prepared(t.node) == before
        except BaseException as e:
            if t.claim is not None:
                self.caches[t.node].abandon(t.claim, e)
            raise
        if t.index is not None:
            if t.claim is not None:
                if current:
                    self.caches[t.node].complete(t.claim, data)
                else:  # prepared state changed meanwhile: answer, but do not store
                    self.stats[t.node].add(stale_discards=1)
                    self.caches[t.node].abandon(t.claim, RequestCancelled("prepared state changed"))
            self.blocks[(t.node, t.index)] = data
        else:
            self.results[(t.node, t.roi)] = data

    def _run_fallback(self, t: _Task) -> None:
        # Fallback tasks only exist for cached blocks, so t.index is set.
        self.blocks[(t.node, t.index)] = self._compute_block(t.node, t.index)  # type: ignore[index]

    # -- data access ------------------------------------------------------------------------------
    def _compute(self, node: Operator, roi: Roi, *, local: bool = True) -> Any:
        info = self.topo.nodes[node]
        windows = {}
        for name, up in info.inputs:
            win = self.topo.window(node, name, up, roi)
            windows[name] = Window(self.pull(up, win, local=local), win, self.topo.nodes[up].spec.axes)
        return invoke(node, info.spec, roi, windows, self.stats[node])

    def _compute_block(self, node: Operator, idx: tuple[int, ...]) -> Any:
        """Compute one block outside the claim protocol, storing it only if still fresh.

        Its version is recorded now, so it must not read this run's earlier
        results (they may predate the version): inputs come from caches or are
        computed afresh (``local=False``).
        """
        cache = self.caches[node]
        version = cache.begin(idx)  # before reading inputs
        # Prepared state (a trained forest) must be current for that version, as
        # for claimed blocks; preparing here (a worker thread) could starve the
        # pool with nested requests, so an outdated block is answered, not stored.
        before = _prepared(node) if all(n.is_prepared() for n in self.plan.order) else None
        data = self._compute(node, cache.block_roi(idx), local=False)
        if before is not None and _prepared(node) == before:
            cache.store(idx, version, data)
        else:
            self.stats[node].add(stale_discards=1)
        return data

    def pull(self, node: Operator, roi: Roi, *, local: bool = True) -> Any:
        """The data of ``node`` over ``roi``: from this run (if ``local``), the cache, or computed now."""
        info = self.topo.nodes[node]
        if not info.cached:
            data = self.results.get((node, roi)) if local else None
            return data if data is not None else self._compute(node, roi, local=local)
        return self._assemble(node, roi, copy=False, local=local)

    def _block(self, node: Operator, idx: tuple[int, ...], local: bool) -> Any:
        data = self.blocks.get((node, idx)) if local else None
        if data is None:
            data = self.caches[node].get(idx)
            if data is None:
                data = self._compute_block(node, idx)
        return data

    def _assemble(self, node: Operator, roi: Roi, *, copy: bool, local: bool = True) -> Any:
        info = self.topo.nodes[node]
        if not info.cached:
            data = self.pull(node, roi, local=local)
            # Hand out an array the caller may modify: copy anything that is a
            # view or read-only (it may belong to a cache or an input).
            if copy and (not data.flags.writeable or data.base is not None):
                data = data.copy()
            return data
        cache = self.caches[node]
        indices = list(roi.block_indices(info.block_shape))
        if len(indices) == 1:
            broi = cache.block_roi(indices[0])
            view = self._block(node, indices[0], local)[roi.relative_to(broi)]
            return view.copy() if copy else view
        out = None
        for idx in indices:
            broi = cache.block_roi(idx)
            part = roi.intersection(broi)
            if part is None:  # cannot happen: block_indices yields touching blocks only
                continue
            data = self._block(node, idx, local)
            if out is None:
                out = _empty_like(data, roi.shape)
            out[part.relative_to(roi)] = data[part.relative_to(broi)]
        return out


def _prepared(node: Operator) -> object:
    """``node``'s prepared-state value, or ``None`` if it is not prepared."""
    state = node.prepared_state()
    return ("prepared", state) if node.is_prepared() else None


def _empty_like(proto: Any, shape: tuple[int, ...]) -> Any:
    if isinstance(proto, np.ndarray):
        return np.empty(shape, dtype=proto.dtype)
    # device arrays (cupy) provide the same constructor on their module
    mod = type(proto).__module__.split(".")[0]
    return __import__(mod).empty(shape, dtype=proto.dtype)
