"""Request planning: a pure function from graph topology and a request to work.

:func:`plan` reads only its arguments: the immutable :class:`Topology`
snapshot, the requested output and ROI, and a predicate saying which cache
blocks are present. It returns, per node, the regions that must be computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from .roi import Roi, bounding_roi

if TYPE_CHECKING:
    from .operator import Operator
    from .spec import ArraySpec

from .operator import required_input_roi

__all__ = ["NodeInfo", "Topology", "Plan", "plan"]


@dataclass(frozen=True, eq=False)
class NodeInfo:
    """What planning and execution need to know about one node."""

    op: Operator
    inputs: tuple[tuple[str, Operator], ...]
    spec: ArraySpec
    block_shape: tuple[int, ...] | None  # None: not cached

    @property
    def cached(self) -> bool:
        return self.block_shape is not None


@dataclass(frozen=True, eq=False)
class Topology:
    """An immutable snapshot of the graph: nodes and a topological order."""

    nodes: Mapping[Operator, NodeInfo]
    order: tuple[Operator, ...]

    @staticmethod
    def build(nodes: dict[Operator, NodeInfo], order: list[Operator]) -> Topology:
        return Topology(MappingProxyType(dict(nodes)), tuple(order))

    def ancestors_and_self(self, output: Operator) -> list[Operator]:
        """``output`` and everything upstream of it, in topological order."""
        keep = {output}
        stack = [output]
        while stack:
            for _, up in self.nodes[stack.pop()].inputs:
                if up not in keep:
                    keep.add(up)
                    stack.append(up)
        return [n for n in self.order if n in keep]

    def window(self, op: Operator, name: str, up: Operator, roi: Roi) -> Roi:
        """Input region of ``up`` that ``op`` reads (halo included) to compute ``roi``."""
        return required_input_roi(op, name, roi, self.nodes[op].spec, self.nodes[up].spec)


@dataclass(frozen=True, eq=False)
class Plan:
    """Regions to compute per node, in execution (topological) order.

    For a cached node the regions are whole blocks that are missing; for an
    uncached node they are the distinct regions its consumers read.
    """

    output: Operator
    roi: Roi
    tasks: Mapping[Operator, tuple[Roi, ...]]
    order: tuple[Operator, ...]

    def bounds(self) -> dict[Operator, Roi]:
        """Per node, the bounding ROI of what must be computed (``{node: roi}``)."""
        return {n: bounding_roi(list(r)) for n, r in self.tasks.items() if r}

    @property
    def n_tasks(self) -> int:
        return sum(len(r) for r in self.tasks.values())

    @property
    def voxels(self) -> int:
        return sum(r.size for rs in self.tasks.values() for r in rs)


def plan(
    topology: Topology,
    output: Operator,
    roi: Roi,
    is_cached: Callable[[Operator, tuple[int, ...]], bool] = lambda op, idx: False,
) -> Plan:
    """Plan the computation of ``output`` over ``roi``.

    Parameters
    ----------
    topology : Topology
        Snapshot of the graph.
    output : Operator
        The node whose output is requested.
    roi : Roi
        Requested region (already checked to lie inside the output).
    is_cached : callable
        ``is_cached(node, block_index)``: whether a cache block is present.

    Returns
    -------
    Plan
        Walks nodes from the output upstream: a cached node needs the blocks
        its readers touch, minus those present; an uncached node needs exactly
        the regions its readers ask for. Each region to compute asks its inputs
        for the region grown by the halo (the halo rule).
    """
    need: dict[Operator, list[Roi]] = {output: [roi]}
    tasks: dict[Operator, tuple[Roi, ...]] = {}
    nodes = topology.ancestors_and_self(output)
    for op in reversed(nodes):
        wanted = need.pop(op, None)
        if not wanted:
            continue
        info = topology.nodes[op]
        if info.cached:
            bs = info.block_shape
            blocks: dict[tuple[int, ...], None] = {}
            for r in wanted:
                blocks.update(dict.fromkeys(r.block_indices(bs)))
            todo = tuple(
                Roi(
                    tuple(i * s for i, s in zip(idx, bs)),
                    tuple(min(n, (i + 1) * s) for i, s, n in zip(idx, bs, info.spec.shape)),
                )
                for idx in sorted(blocks)
                if not is_cached(op, idx)
            )
        else:
            todo = tuple(dict.fromkeys(wanted))
        if not todo:
            continue
        tasks[op] = todo
        for name, up in info.inputs:
            lst = need.setdefault(up, [])
            lst.extend(topology.window(op, name, up, r) for r in todo)
    order = tuple(n for n in nodes if n in tasks)
    return Plan(output, roi, MappingProxyType(tasks), order)
