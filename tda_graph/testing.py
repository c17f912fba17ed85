"""Contract test kit: checks every operator must pass.

Use from any test::

    from tda_graph import testing
    testing.check_roi_equals_full(graph, node)
    testing.check_dirty_covers_changes(graph, source, node)
    testing.check_spec_pure(op, {"image": spec})

Each check raises ``AssertionError`` with a message naming the node and ROI.
Hypothesis is only imported by :func:`check_roi_property`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .graph import Graph
from .listeners import DirtyEvent
from .operator import Operator
from .roi import Roi
from .spec import ArraySpec

__all__ = [
    "random_roi",
    "roi_strategy",
    "check_roi_equals_full",
    "check_roi_property",
    "check_dirty_covers_changes",
    "check_spec_pure",
    "assert_same",
]


def random_roi(rng: np.random.Generator, shape: Sequence[int], max_extent: int | None = None) -> Roi:
    """A random non-empty ROI inside ``shape`` (extent per axis at most ``max_extent``)."""
    start, stop = [], []
    for n in shape:
        ext = int(rng.integers(1, (min(n, max_extent) if max_extent else n) + 1))
        a = int(rng.integers(0, n - ext + 1))
        start.append(a)
        stop.append(a + ext)
    return Roi(start, stop)


def roi_strategy(shape: Sequence[int]) -> Any:
    """A hypothesis strategy of ROIs inside ``shape``."""
    from hypothesis import strategies as st

    def one_axis(n: int) -> Any:
        return st.tuples(st.integers(0, n - 1), st.integers(1, n)).map(
            lambda ab: (min(ab[0], n - 1), max(min(ab[0], n - 1) + 1, ab[1]))
        )

    return st.tuples(*(one_axis(n) for n in shape)).map(lambda spans: Roi([a for a, _ in spans], [b for _, b in spans]))


def assert_same(actual: Any, expected: Any, what: str, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Equal shapes and values (bitwise when both tolerances are 0; NaNs compare equal)."""
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    if rtol == 0 and atol == 0:
        ok = np.array_equal(a, e, equal_nan=a.dtype.kind == "f")
    else:
        ok = np.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not ok:
        diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
        where = np.unravel_index(np.nanargmax(diff), diff.shape)
        raise AssertionError(f"{what}: values differ, max |diff| {np.nanmax(diff):.3g} at {where}")


def check_roi_equals_full(
    graph: Graph,
    node: Operator,
    rois: Sequence[Roi] | None = None,
    *,
    n: int = 12,
    seed: int = 0,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """ROI results equal the whole output cropped, whatever the cache already holds.

    The whole output comes from :meth:`Graph.recompute` (no cache, one
    thread); ROIs are requested through the normal cached, threaded path, in
    random order so they hit partially filled caches. Borders are always tried.
    """
    full = graph.recompute(node)
    shape = graph.spec(node).shape
    rng = np.random.default_rng(seed)
    if rois is None:
        corner_lo = Roi((0,) * len(shape), tuple(min(s, 5) for s in shape))
        corner_hi = Roi(tuple(max(0, s - 5) for s in shape), shape)
        rois = [corner_lo, corner_hi] + [random_roi(rng, shape) for _ in range(n)]
    for r in rois:
        assert_same(graph.request(node, r), full[r.to_slices()], f"{node.label} ROI {r!r}", rtol=rtol, atol=atol)


def check_roi_property(graph: Graph, node: Operator, *, max_examples: int = 25, **tol: float) -> None:
    """Property-based version of :func:`check_roi_equals_full` (hypothesis chooses the ROIs)."""
    from hypothesis import HealthCheck, given, settings

    full = graph.recompute(node)
    shape = graph.spec(node).shape

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(roi_strategy(shape))
    def prop(r: Roi) -> None:
        assert_same(graph.request(node, r), full[r.to_slices()], f"{node.label} ROI {r!r}", **tol)

    prop()


def _random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype) * 10
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000) + 1, shape).astype(dtype)


def check_dirty_covers_changes(
    graph: Graph,
    source: Operator,
    node: Operator,
    *,
    n_edits: int = 4,
    seed: int = 0,
    max_extent: int = 12,
    write: Callable[[Roi, np.ndarray], None] | None = None,
) -> list[DirtyEvent]:
    """After a random edit of ``source``, every changed voxel of ``node`` lies in its dirty region.

    Also checks that the cached answer after the edit equals a fresh
    recomputation (nothing stale survives) and that one edit makes exactly one
    notification. ``write(roi, values)`` defaults to ``source.write``.
    """
    events: list[DirtyEvent] = []

    def listener(ev: DirtyEvent) -> None:
        events.append(ev)

    sub = graph.subscribe(node, listener)
    try:
        rng = np.random.default_rng(seed)
        src_spec = graph.spec(source)
        write = write or source.write  # type: ignore[attr-defined]
        for _ in range(n_edits):
            before = graph.request(node)
            r = random_roi(rng, src_spec.shape, max_extent)
            events.clear()
            write(r, _random_values(rng, r.shape, src_spec.dtype))
            after = graph.request(node)
            assert_same(after, graph.recompute(node), f"{node.label} after editing {source.label} {r!r}")
            same = before == after
            if before.dtype.kind == "f":
                same |= np.isnan(before) & np.isnan(after)
            changed = ~same
            if not changed.any():
                continue
            if len(events) != 1:
                raise AssertionError(f"{node.label}: {len(events)} dirty notifications for one edit {r!r}, expected 1")
            covered = np.zeros(after.shape, bool)
            for d in events[0].rois:
                covered[d.to_slices()] = True
            missed = changed & ~covered
            if missed.any():
                raise AssertionError(
                    f"{node.label}: {int(missed.sum())} changed voxels outside the dirty region "
                    f"{events[0].rois} after editing {source.label} {r!r}; first at {np.argwhere(missed)[0]}"
                )
    finally:
        sub.disconnect()
    return events


def check_spec_pure(op: Operator, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
    """``op.output_spec`` is a pure function: same answer twice, inputs and settings untouched."""
    settings_before = copy.deepcopy(op.settings)
    inputs_before = dict(inputs)
    first = op.output_spec(dict(inputs))
    second = op.output_spec(dict(inputs))
    if not isinstance(first, ArraySpec):
        raise AssertionError(f"{op.label}.output_spec returned {type(first).__name__}")
    if first != second:
        raise AssertionError(f"{op.label}.output_spec is not deterministic: {first} != {second}")
    if op.settings != settings_before:
        raise AssertionError(f"{op.label}.output_spec changed the operator's settings")
    if dict(inputs) != inputs_before:
        raise AssertionError(f"{op.label}.output_spec changed its input specs")
    try:
        first.shape = ()  # type: ignore[misc]
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError(f"{op.label}.output_spec returned a mutable spec")
    return first
