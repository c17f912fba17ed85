"""The Graph: structure, specs, dirty propagation, caches and requests."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from .cache import BlockCache, CacheManager
from .errors import CycleError, GraphError, IncompatibleInputError, RequestCancelled, RoiError, SpecError, TdaError
from .executor import Run
from .listeners import DirtyEvent, ListenerList, Subscription
from .operator import Operator, PrepareContext, dirty_output_roi
from .planning import NodeInfo, Plan, Topology, plan
from .roi import Roi, merge_rois
from .spec import ArraySpec
from .stats import NodeStats

__all__ = ["Graph", "RequestFuture"]

DEFAULT_CACHE_BUDGET = 2 * 1024**3


def _presence(caches: dict[Operator, BlockCache]) -> Callable[[Operator, tuple[int, ...]], bool]:
    """The ``is_cached`` predicate for :func:`plan` over a snapshot of the caches."""
    return lambda op, idx: caches[op].has(idx)


class InlineExecutor(Executor):
    """Runs each submitted call at once in the calling thread (for serial recomputation)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            fut.set_exception(e)
        return fut


class RequestFuture(Future):
    """Future of :meth:`Graph.request_async`; :meth:`cancel` stops scheduling new work."""

    def __init__(self) -> None:
        super().__init__()
        self._cancel_event = threading.Event()

    def cancel(self) -> bool:
        self._cancel_event.set()
        return super().cancel()


@dataclass(eq=False)
class _Watch:
    roi: Roi
    hit: bool = False


RoiLike = Roi | Sequence[slice] | None


class Graph:
    """A lazy DAG of operators with ROI requests, block caches and dirty propagation.

    Parameters
    ----------
    workers : int, optional
        Threads computing blocks (default: CPU count). Kernels that release the
        GIL (numba ``nogil``, numpy, scipy) run truly in parallel.
    cache_budget : int
        Bytes all block caches of this graph may hold together (LRU eviction).

    Examples
    --------
    >>> import numpy as np
    >>> from tda_graph import Graph, Roi
    >>> from operators import ArraySource, GaussianSmoothing
    >>> g = Graph()
    >>> src = g.add(ArraySource(np.zeros((64, 64), np.float32), axes="yx"))
    >>> sm = g.add(GaussianSmoothing(sigma=1.0), image=src)
    >>> g.request(sm, Roi((0, 0), (8, 8))).shape
    (8, 8)
    """

    def __init__(self, *, workers: int | None = None, cache_budget: int = DEFAULT_CACHE_BUDGET) -> None:
        self.workers = int(workers or os.cpu_count() or 1)
        if self.workers < 1:
            raise GraphError("workers must be >= 1")
        self._nx = nx.MultiDiGraph()
        self._inputs: dict[Operator, dict[str, Operator]] = {}
        self._specs: dict[Operator, ArraySpec] = {}
        self._block_shapes: dict[Operator, tuple[int, ...] | None] = {}
        self._caches: dict[Operator, BlockCache] = {}
        self._stats: dict[Operator, NodeStats] = {}
        self._listeners: dict[Operator, ListenerList] = defaultdict(ListenerList)
        self._frozen: dict[Operator, list[Roi]] = {}
        self._watches: dict[Operator, list[_Watch]] = defaultdict(list)
        self._batch_depth = 0
        self._batch_seeds: dict[Operator, list[Roi]] = defaultdict(list)
        self._lock = threading.RLock()
        self._manager = CacheManager(cache_budget)
        self._topo = Topology.build({}, [])
        self._pool: ThreadPoolExecutor | None = None
        self._request_pool: ThreadPoolExecutor | None = None
        self._names: set[str] = set()
        self._context = PrepareContext(lambda op, roi: self.request(op, roi))

    # ================================================================ structure
    def add(
        self,
        op: Operator,
        *,
        cache: bool | None = None,
        block_shape: Sequence[int] | None = None,
        **inputs: Operator,
    ) -> Operator:
        """Add ``op``, connecting each of its inputs by keyword, and return it.

        Parameters
        ----------
        op : Operator
            A fresh operator (not part of any graph).
        cache : bool, optional
            Give the output a block cache (default: ``op.cached``).
        block_shape : sequence of int, optional
            Cache block grid (default: the spec's hint, else ~256² / 64³).
        **inputs : Operator
            Upstream nodes by input name.
        """
        if not isinstance(op, Operator):
            raise GraphError(f"graph.add expects an Operator, got {type(op).__name__}")
        with self._lock:
            if op._graph is not None:
                raise GraphError(f"{op.label} is already part of a graph; create a new operator")
            names = [s.name for s in op.inputs]
            missing = [n for n in names if n not in inputs]
            unknown = [n for n in inputs if n not in names]
            if unknown:
                raise GraphError(f"{type(op).__name__} has no input(s) {unknown}; its inputs are {names}")
            if missing:
                raise GraphError(
                    f"{type(op).__name__} needs input(s) {missing}: connect them as keywords, "
                    f"e.g. graph.add(op, {missing[0]}=upstream)"
                )
            for n, up in inputs.items():
                self._check_member(up, f"input {n!r} of {type(op).__name__}")
            if op._name is None:
                op._name = self._unique_name(type(op).__name__)
            elif op._name in self._names:
                raise GraphError(f"a node named {op._name!r} already exists in this graph")
            spec = self._resolve(op, {n: self._specs[u] for n, u in inputs.items()}, inputs)
            self._names.add(op.label)
            op._graph = self
            self._nx.add_node(op)
            for n, up in inputs.items():
                self._nx.add_edge(up, op, key=n)
            self._inputs[op] = dict(inputs)
            self._specs[op] = spec
            self._stats[op] = NodeStats()
            use_cache = op.cached if cache is None else bool(cache)
            self._block_shapes[op] = self._grid(spec, block_shape) if use_cache else None
            if use_cache:
                self._caches[op] = self._new_cache(op)
            self._rebuild_topology()
        return op

    def connect(self, op: Operator, **inputs: Operator) -> None:
        """Re-wire inputs of ``op`` (e.g. swap the image source); dirties its whole output."""
        with self._lock:
            self._check_member(op, "connect")
            for n, up in inputs.items():
                op.slot(n)
                self._check_member(up, f"input {n!r} of {op.label}")
                if up is op or nx.has_path(self._nx, op, up):
                    raise CycleError(f"connecting {up.label} to {op.label}.{n} would create a cycle")
            new_inputs = {**self._inputs[op], **inputs}
            specs = self._respec({op: new_inputs})
            for n, up in inputs.items():
                self._nx.remove_edge(self._inputs[op][n], op, key=n)
                self._nx.add_edge(up, op, key=n)
            self._inputs[op] = new_inputs
            seeds = self._commit_specs(specs)
            seeds.setdefault(op, [Roi.full(self._specs[op].shape)])
            self._rebuild_topology()
        self._dirty(seeds)

    def remove(self, op: Operator) -> None:
        """Remove a node that nothing reads from."""
        with self._lock:
            self._check_member(op, "remove")
            consumers = [c.label for c in self._nx.successors(op)]
            if consumers:
                raise GraphError(f"cannot remove {op.label}: {consumers} read from it; remove them first")
            self._nx.remove_node(op)
            for d in (self._inputs, self._specs, self._block_shapes, self._stats, self._frozen, self._listeners):
                d.pop(op, None)
            cache = self._caches.pop(op, None)
            if cache is not None:
                cache.close()
            self._names.discard(op.label)
            op._graph = None
            self._rebuild_topology()

    def configure(self, op: Operator, **changes: Any) -> None:
        """Change settings of ``op``: re-resolve specs downstream, dirty what changed.

        The change is atomic: if any downstream node cannot accept the new
        output, nothing changes and :class:`IncompatibleInputError` is raised.
        """
        with self._lock:
            self._check_member(op, "configure")
            old = op._settings
            new = op._make_settings(old, changes)
            if new == old:
                return
            op._settings = new
            try:
                specs = self._respec({op: self._inputs[op]})
            except BaseException:
                op._settings = old
                raise
            seeds = self._commit_specs(specs)
            if op not in seeds:
                region = op.settings_dirty(old, new, self._specs[op])
                if region is not None:
                    seeds[op] = [region]
            self._rebuild_topology()
        self._dirty(seeds)

    def spec_changed(self, op: Operator) -> None:
        """Tell the graph that ``op``'s output spec may have changed (e.g. a source got new data)."""
        with self._lock:
            self._check_member(op, "spec_changed")
            specs = self._respec({op: self._inputs[op]})
            seeds = self._commit_specs(specs)
            seeds.setdefault(op, [Roi.full(self._specs[op].shape)])
            self._rebuild_topology()
        self._dirty(seeds)

    # ---------------------------------------------------------------- helpers
    def _unique_name(self, base: str) -> str:
        i = 1
        while f"{base}-{i}" in self._names:
            i += 1
        return f"{base}-{i}"

    def _check_member(self, op: Any, what: str) -> None:
        if not isinstance(op, Operator):
            raise GraphError(f"{what}: expected an operator in this graph, got {type(op).__name__}")
        if op._graph is not self:
            raise GraphError(f"{what}: {op.label} is not part of this graph; add it first with graph.add(...)")

    @staticmethod
    def _grid(spec: ArraySpec, block_shape: Sequence[int] | None) -> tuple[int, ...]:
        if block_shape is None:
            return spec.default_block_shape()
        bs = tuple(int(b) for b in block_shape)
        if len(bs) != spec.ndim or any(b <= 0 for b in bs):
            raise SpecError(f"block shape {bs} does not fit output {spec.describe()}")
        return bs

    def _new_cache(self, op: Operator) -> BlockCache:
        return BlockCache(self._specs[op].shape, self._block_shapes[op] or (), self._manager, self._stats[op])

    def _resolve(self, op: Operator, in_specs: dict[str, ArraySpec], ups: dict[str, Operator]) -> ArraySpec:
        for n, s in in_specs.items():
            why = op.check_input(n, s)
            if why is not None:
                raise IncompatibleInputError(
                    f"cannot connect {ups[n].label} (output {s.describe()}) to {op.label}.{n}: {why}"
                )
        try:
            spec = op.output_spec(in_specs)
        except IncompatibleInputError:
            raise
        except SpecError as e:
            srcs = ", ".join(f"{n}={ups[n].label}" for n in in_specs) or "no inputs"
            raise IncompatibleInputError(f"{op.label} cannot work on its inputs ({srcs}): {e}") from e
        if not isinstance(spec, ArraySpec):
            raise GraphError(f"{op.label}.output_spec returned {type(spec).__name__}, not an ArraySpec")
        return spec

    def _respec(self, changed: dict[Operator, dict[str, Operator]]) -> dict[Operator, ArraySpec]:
        """New specs of the changed nodes and everything downstream (pure: commits nothing)."""
        specs = dict(self._specs)
        start = set(changed)
        affected = set(start)
        for s in start:
            affected |= nx.descendants(self._nx, s)
        out = {}
        for op in self._topo.order:
            if op not in affected:
                continue
            ups = changed.get(op, self._inputs[op])
            spec = self._resolve(op, {n: specs[u] for n, u in ups.items()}, ups)
            specs[op] = spec
            out[op] = spec
        return out

    def _commit_specs(self, specs: dict[Operator, ArraySpec]) -> dict[Operator, list[Roi]]:
        """Install new specs; nodes whose spec changed get a fresh cache and are dirty everywhere."""
        seeds: dict[Operator, list[Roi]] = {}
        for op, spec in specs.items():
            if spec == self._specs[op]:
                continue
            self._specs[op] = spec
            if self._block_shapes[op] is not None:
                old = self._caches.pop(op)
                old.close()
                self._block_shapes[op] = self._grid(spec, None if spec.shape != old.shape else old.block_shape)
                self._caches[op] = self._new_cache(op)
            seeds[op] = [Roi.full(spec.shape)]
        return seeds

    def _rebuild_topology(self) -> None:
        order = list(nx.topological_sort(self._nx))
        infos = {
            op: NodeInfo(op, tuple(self._inputs[op].items()), self._specs[op], self._block_shapes[op]) for op in order
        }
        self._topo = Topology.build(infos, order)

    # ================================================================ introspection
    @property
    def nodes(self) -> tuple[Operator, ...]:
        """All nodes in topological order."""
        return self._topo.order

    def spec(self, op: Operator) -> ArraySpec:
        """The resolved output spec of ``op``."""
        self._check_member(op, "spec")
        return self._specs[op]

    def inputs_of(self, op: Operator) -> dict[str, Operator]:
        self._check_member(op, "inputs_of")
        return dict(self._inputs[op])

    def consumers_of(self, op: Operator) -> list[tuple[Operator, str]]:
        self._check_member(op, "consumers_of")
        return [(v, k) for _, v, k in self._nx.out_edges(op, keys=True)]

    def is_cached(self, op: Operator) -> bool:
        self._check_member(op, "is_cached")
        return self._block_shapes[op] is not None

    def block_shape(self, op: Operator) -> tuple[int, ...] | None:
        self._check_member(op, "block_shape")
        return self._block_shapes[op]

    def stats(self, op: Operator | None = None) -> dict[str, Any]:
        """Counters of ``op`` (a dict), or of every node (dict of label -> dict)."""
        if op is None:
            return {n.label: self._stats[n].as_dict() for n in self._topo.order}
        self._check_member(op, "stats")
        d = self._stats[op].as_dict()
        cache = self._caches.get(op)
        d["cached_blocks"] = len(cache.cached_indices()) if cache else 0
        d["cached_bytes"] = cache.nbytes if cache else 0
        return d

    def reset_stats(self) -> None:
        for s in self._stats.values():
            s.reset()

    def cache_info(self) -> dict[str, int]:
        """Bytes held by all caches together and the budget."""
        return {"used_bytes": self._manager.used_bytes, "budget_bytes": self._manager.budget_bytes}

    def set_cache_budget(self, nbytes: int) -> None:
        self._manager.set_budget(nbytes)

    def to_dot(self) -> str:
        """The graph in Graphviz dot syntax (nodes: label, spec, cache; edges: input names)."""
        lines = ["digraph tda {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
        ids = {op: f"n{i}" for i, op in enumerate(self._topo.order)}
        for op in self._topo.order:
            s = self._specs[op]
            cache = "cached " + "x".join(map(str, self._block_shapes[op])) if self._block_shapes[op] else "uncached"
            frozen = " frozen" if op in self._frozen else ""
            text = f"{op.label}\\n{s.axes} {s.shape} {s.dtype}\\n{cache}{frozen}"
            lines.append(f'  {ids[op]} [label="{text}"];')
        for u, v, k in self._nx.edges(keys=True):
            lines.append(f'  {ids[u]} -> {ids[v]} [label="{k}"];')
        lines.append("}")
        return "\n".join(lines)

    # ================================================================ requests
    def _as_roi(self, op: Operator, roi: RoiLike) -> Roi:
        shape = self._specs[op].shape
        if roi is None:
            return Roi.full(shape)
        if isinstance(roi, Roi):
            return roi.check_inside(shape)
        return Roi.from_slices(tuple(roi), shape)

    def plan(self, output: Operator, roi: RoiLike = None) -> Plan:
        """What a request would compute now: per node, the regions (see :func:`tda_graph.plan`)."""
        self._check_member(output, "plan")
        return plan(self._topo, output, self._as_roi(output, roi), _presence(dict(self._caches)))

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tda-worker")
            return self._pool

    def request(self, output: Operator, roi: RoiLike = None, *, max_retries: int = 2) -> np.ndarray:
        """Compute ``output`` over ``roi`` and return a new array.

        The result equals computing the whole output and cropping. If an edit
        that changes this region lands while it is being computed, the request
        runs again (up to ``max_retries`` times) so it answers with current data;
        that includes an error caused by such a change (a settings change that
        alters an upstream spec mid-request), which is raised only if it persists.
        """
        return self._request(output, roi, max_retries, None)

    def request_async(self, output: Operator, roi: RoiLike = None, *, max_retries: int = 2) -> RequestFuture:
        """Like :meth:`request` but returns a cancellable future at once."""
        self._check_member(output, "request_async")
        r = self._as_roi(output, roi)
        fut = RequestFuture()
        with self._lock:
            if self._request_pool is None:
                self._request_pool = ThreadPoolExecutor(64, thread_name_prefix="tda-request")
            pool = self._request_pool

        def work() -> None:
            if fut.cancelled():
                return
            try:
                result = self._request(output, r, max_retries, fut._cancel_event)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    if not fut.cancelled():
                        fut.set_exception(e)
                return
            with contextlib.suppress(Exception):
                if not fut.cancelled():
                    fut.set_result(result)

        pool.submit(work)
        return fut

    def _request(self, output: Operator, roi: RoiLike, max_retries: int, cancel: threading.Event | None) -> np.ndarray:
        self._check_member(output, "request")
        r = self._as_roi(output, roi)
        _check_result_size(output, r, self._specs[output].dtype)
        result = None
        attempts = max(0, max_retries) + 1
        for attempt in range(attempts):
            watch = _Watch(r)
            with self._lock:
                self._watches[output].append(watch)
                topo = self._topo
                caches = dict(self._caches)
            try:
                p = plan(topo, output, r, _presence(caches))
                run = Run(topo, p, caches, self._stats, self.pool, cancel, self._context)
                result = run.execute()
            except TdaError:
                # A settings change under the request (e.g. a new feature selection with
                # another channel count) can make the planned windows fail; the change
                # dirtied the output, so plan again with the new specs.
                if not watch.hit or attempt + 1 == attempts or (cancel is not None and cancel.is_set()):
                    raise
                continue
            finally:
                with self._lock:
                    self._watches[output].remove(watch)
            if not watch.hit:
                break
            if cancel is not None and cancel.is_set():
                raise RequestCancelled(f"request for {output.label} {r!r} was cancelled")
        return result

    def recompute(self, output: Operator, roi: RoiLike = None) -> np.ndarray:
        """Compute ``output`` over ``roi`` from scratch, single-threaded, bypassing every cache.

        The reference that cached, threaded results must equal (used by the
        contract test kit and stress tests). Counters are not touched.
        """
        self._check_member(output, "recompute")
        r = self._as_roi(output, roi)
        topo = self._topo
        bare = Topology.build(
            {op: NodeInfo(op, i.inputs, i.spec, None) for op, i in topo.nodes.items()}, list(topo.order)
        )
        scratch = {op: NodeStats() for op in topo.order}
        return Run(bare, plan(bare, output, r), {}, scratch, InlineExecutor(), None, self._context).execute()

    # ================================================================ dirtiness
    def mark_dirty(self, op: Operator, rois: Roi | Iterable[Roi] | None = None) -> None:
        """Declare that ``op``'s output changed over ``rois`` (all of it when ``None``).

        Sources call this after writing; inside :meth:`batch` the propagation is
        deferred and merged.
        """
        self._check_member(op, "mark_dirty")
        shape = self._specs[op].shape
        if rois is None:
            lst = [Roi.full(shape)]
        elif isinstance(rois, Roi):
            lst = [rois.check_inside(shape)]
        else:
            lst = [r.check_inside(shape) for r in rois]
        if not lst:
            return
        self._dirty({op: lst})

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Defer dirty propagation; on exit, all edits propagate as one event per node."""
        with self._lock:
            self._batch_depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._batch_depth -= 1
                seeds = None
                if self._batch_depth == 0 and self._batch_seeds:
                    seeds = dict(self._batch_seeds)
                    self._batch_seeds = defaultdict(list)
            if seeds:
                self._dirty(seeds)

    def _dirty(self, seeds: dict[Operator, list[Roi]]) -> None:
        with self._lock:
            if self._batch_depth > 0:
                for op, rois in seeds.items():
                    self._batch_seeds[op].extend(rois)
                return
            notes = self._propagate(seeds)
        for cb, ev in notes:
            cb(ev)

    def _propagate(self, seeds: dict[Operator, list[Roi]]) -> list[tuple[Callable, DirtyEvent]]:
        """Walk downstream in topological order; caller holds the lock. Returns notifications."""
        pending: dict[Operator, list[Roi]] = defaultdict(list)
        for op, rois in seeds.items():
            pending[op].extend(rois)
        notes: list[tuple[Callable, DirtyEvent]] = []
        for op in self._topo.order:
            incoming = pending.pop(op, None)
            if not incoming:
                continue
            rois = merge_rois(incoming)
            if op in self._frozen:
                self._frozen[op].extend(rois)
                continue
            cache = self._caches.get(op)
            if cache is not None:
                cache.invalidate(rois)
            self._stats[op].add(dirty_events=1)
            for w in self._watches.get(op, ()):
                if any(w.roi.intersects(r) for r in rois):
                    w.hit = True
            ev = DirtyEvent(op, rois)
            notes.extend((cb, ev) for cb in self._listeners[op].callbacks())
            spec = self._specs[op]
            for _, child, name in self._nx.out_edges(op, keys=True):
                child.input_changed(name, rois)
                cspec = self._specs[child]
                pending[child].extend(dirty_output_roi(child, name, r, spec, cspec) for r in rois)
        return notes

    def subscribe(self, op: Operator, callback: Callable[[DirtyEvent], Any]) -> Subscription:
        """Call ``callback(DirtyEvent)`` whenever ``op``'s output changes.

        Bound methods are held weakly; other callables until
        :meth:`Subscription.disconnect`. Callbacks run in the thread that made
        the change, after the graph lock is released.
        """
        self._check_member(op, "subscribe")
        return self._listeners[op].add(callback)

    # ================================================================ freezing
    def freeze(self, *ops: Operator) -> None:
        """Stop invalidating the caches of ``ops`` (default: every cached node).

        Frozen nodes keep serving what they hold; dirty regions reaching them
        are remembered and released, merged, in one notification by
        :meth:`unfreeze`. Blocks they do not hold are still computed.
        """
        with self._lock:
            targets = ops or tuple(op for op in self._topo.order if self._block_shapes[op] is not None)
            for op in targets:
                self._check_member(op, "freeze")
                self._frozen.setdefault(op, [])

    def unfreeze(self, *ops: Operator) -> None:
        """Release frozen nodes (default: all) and propagate their merged dirty regions once."""
        with self._lock:
            targets = ops or tuple(self._frozen)
            seeds = {}
            for op in targets:
                self._check_member(op, "unfreeze")
                pend = self._frozen.pop(op, None)
                if pend:
                    seeds[op] = pend
        if seeds:
            self._dirty(seeds)

    def is_frozen(self, op: Operator) -> bool:
        return op in self._frozen

    @contextlib.contextmanager
    def frozen(self, *ops: Operator) -> Iterator[None]:
        """Context manager: :meth:`freeze` on entry, :meth:`unfreeze` on exit."""
        self.freeze(*ops)
        try:
            yield
        finally:
            self.unfreeze(*ops)

    # ================================================================ lifecycle
    def close(self) -> None:
        """Stop the worker threads (the graph can still be inspected)."""
        with self._lock:
            pools = [self._pool, self._request_pool]
            self._pool = self._request_pool = None
        for p in pools:
            if p is not None:
                p.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Graph {len(self._topo.order)} nodes, {self.workers} workers>"


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_result_size(op: Operator, roi: Roi, dtype: np.dtype) -> None:
    """Refuse a request whose answer alone could not fit in this machine's memory.

    WHY: a lazy source may describe a volume far larger than RAM; requesting all of it
    (``request(out)`` with no region) would plan millions of blocks and then fail to
    allocate. Say so at once instead.
    """
    total = _physical_memory()
    nbytes = roi.size * np.dtype(dtype).itemsize
    if total is not None and nbytes > total:
        raise RoiError(
            f"the answer for {op.label} {roi!r} would take {nbytes / 2**30:.1f} GiB, more than this machine's "
            f"{total / 2**30:.1f} GiB of memory; request a smaller region (a viewport or block), or use "
            "'tda predict', which works block by block"
        )
