"""Sparse, block-wise storage of user label strokes."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tda_graph import ArraySpec, Operator, Roi, RoiError, SpecError, TdaError, Window
from tda_graph.roi import block_roi

__all__ = ["LabelStore", "LabelClass", "LabelError"]

DEFAULT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))


class LabelError(TdaError, ValueError):
    """A label operation is invalid (bad class, mask shape, or an empty undo history)."""


@dataclass(frozen=True)
class LabelClass:
    """Name and RGB colour of one label class (label values are 1..K in order)."""

    name: str
    color: tuple[int, int, int]


BlockIndex = tuple[int, ...]


class LabelStore(Operator):
    """User labels: ``uint8``, 0 = unlabelled, 1..K = classes; only touched blocks are stored.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the image being labelled.
    axes : str
        Spatial axes, ``"yx"`` or ``"zyx"``.
    classes : sequence of str or LabelClass
        Class names (colours are assigned) or full class descriptions.
    block_shape : tuple of int, optional
        Storage grid (default 64 per axis).
    undo_depth : int
        How many strokes :meth:`undo` can take back.

    Every edit bumps the version of the blocks it touches and marks dirty
    only the bounding box of the voxels it actually changed.
    """

    cached = False

    def __init__(
        self,
        shape: Sequence[int],
        axes: str,
        classes: Sequence[str | LabelClass] = ("background", "foreground"),
        *,
        block_shape: Sequence[int] | None = None,
        undo_depth: int = 50,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if axes not in ("yx", "zyx"):
            raise SpecError(f"LabelStore axes must be 'yx' or 'zyx', got {axes!r}")
        self._spec = ArraySpec(tuple(shape), np.uint8, axes, block_shape=None)
        self._classes = tuple(self._as_class(c, i) for i, c in enumerate(classes))
        if not 1 <= len(self._classes) <= 255:
            raise LabelError(f"need between 1 and 255 label classes, got {len(self._classes)}")
        self.block_shape = tuple(int(b) for b in (block_shape or (64,) * len(shape)))
        if len(self.block_shape) != len(shape):
            raise SpecError(f"block shape {self.block_shape} does not fit shape {tuple(shape)}")
        self._blocks: dict[BlockIndex, np.ndarray] = {}
        self._versions: dict[BlockIndex, int] = {}
        self._lock = threading.RLock()
        self._undo: deque[list[tuple[BlockIndex, np.ndarray | None]]] = deque(maxlen=undo_depth)
        self._version = 0

    @staticmethod
    def _as_class(c: str | LabelClass, i: int) -> LabelClass:
        if isinstance(c, LabelClass):
            return c
        return LabelClass(str(c), DEFAULT_COLORS[i % len(DEFAULT_COLORS)])

    # -- metadata -------------------------------------------------------------------
    @property
    def classes(self) -> tuple[LabelClass, ...]:
        return self._classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._classes)

    @property
    def version(self) -> int:
        """Incremented by every edit."""
        return self._version

    def block_version(self, idx: BlockIndex) -> int:
        return self._versions.get(idx, 0)

    def labelled_blocks(self) -> dict[BlockIndex, int]:
        """Indices of blocks holding at least one label, with their versions."""
        with self._lock:
            return {i: self._versions.get(i, 0) for i, b in self._blocks.items() if b.any()}

    def labelled_rois(self) -> list[Roi]:
        """ROIs of the stored blocks that hold labels (what a trainer must read)."""
        return [self.block_roi(i) for i in sorted(self.labelled_blocks())]

    def block(self, idx: BlockIndex) -> np.ndarray | None:
        """A copy of one stored block (``None`` if never touched)."""
        with self._lock:
            b = self._blocks.get(idx)
            return None if b is None else b.copy()

    def block_roi(self, idx: BlockIndex) -> Roi:
        return block_roi(idx, self.block_shape, self._spec.shape)

    def set_classes(self, classes: Sequence[str | LabelClass]) -> None:
        """Rename / recolour classes or add new ones (removing classes in use is refused)."""
        new = tuple(self._as_class(c, i) for i, c in enumerate(classes))
        used = self.counts()
        if any(v > len(new) for v in used):
            raise LabelError(f"labels {sorted(v for v in used if v > len(new))} are in use; erase them first")
        self._classes = new

    # -- engine contract ------------------------------------------------------------------
    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        return self._spec

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        out = np.zeros(roi.shape, np.uint8)
        with self._lock:
            for idx in roi.block_indices(self.block_shape):
                b = self._blocks.get(idx)
                if b is None:
                    continue
                broi = self.block_roi(idx)
                part = roi.intersection(broi)
                if part is not None:
                    out[part.relative_to(roi)] = b[part.relative_to(broi)]
        return out

    # -- editing --------------------------------------------------------------------------
    def paint(self, roi: Roi, mask: Any, label: int) -> None:
        """Set ``label`` where ``mask`` is true inside ``roi`` (``mask`` has ``roi.shape``)."""
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= label <= len(self._classes):
            raise LabelError(
                f"label {label!r} is not a class of this store; use 1..{len(self._classes)} "
                f"({', '.join(self.class_names)}), or erase() to remove labels"
            )
        self._edit(roi, mask, int(label))

    def erase(self, roi: Roi, mask: Any | None = None) -> None:
        """Remove labels where ``mask`` is true inside ``roi`` (everywhere in ``roi`` if no mask)."""
        self._edit(roi, np.ones(roi.shape, bool) if mask is None else mask, 0)

    def _edit(self, roi: Roi, mask: Any, value: int) -> None:
        roi.check_inside(self._spec.shape)
        m = np.asarray(mask)
        if m.shape != roi.shape:
            raise LabelError(f"mask of shape {m.shape} does not match {roi!r} of shape {roi.shape}")
        m = m.astype(bool, copy=False)
        changed: list[Roi] = []
        history: list[tuple[BlockIndex, np.ndarray | None]] = []
        with self._lock:
            for idx in roi.block_indices(self.block_shape):
                broi = self.block_roi(idx)
                part = roi.intersection(broi)
                if part is None:
                    continue
                sub = m[part.relative_to(roi)]
                if not sub.any():
                    continue
                blk = self._blocks.get(idx)
                if blk is None:
                    if value == 0:
                        continue
                    blk = np.zeros(broi.shape, np.uint8)
                view = blk[part.relative_to(broi)]
                diff = sub & (view != value)
                if not diff.any():
                    continue
                history.append((idx, None if idx not in self._blocks else blk.copy()))
                view[diff] = value
                self._blocks[idx] = blk
                self._versions[idx] = self._versions.get(idx, 0) + 1
                pos = np.argwhere(diff)
                lo = pos.min(axis=0) + np.array(part.start)
                hi = pos.max(axis=0) + np.array(part.start) + 1
                changed.append(Roi(lo, hi))
            if not changed:
                return
            self._undo.append(history)
            self._version += 1
        self._notify(changed)

    def undo(self) -> None:
        """Take back the last stroke (paint or erase)."""
        with self._lock:
            if not self._undo:
                raise LabelError("nothing to undo")
            history = self._undo.pop()
            changed = []
            for idx, old in reversed(history):
                if old is None:
                    self._blocks.pop(idx, None)
                else:
                    self._blocks[idx] = old
                self._versions[idx] = self._versions.get(idx, 0) + 1
                changed.append(self.block_roi(idx))
            self._version += 1
        self._notify(changed)

    def _notify(self, rois: list[Roi]) -> None:
        if self._graph is not None:
            self._graph.mark_dirty(self, rois)

    # -- import / export ----------------------------------------------------------------------
    def to_dense(self) -> np.ndarray:
        """All labels as a dense ``uint8`` array."""
        return self.compute(Roi.full(self._spec.shape), {})

    def counts(self) -> dict[int, int]:
        """Number of labelled voxels per label value."""
        with self._lock:
            total: dict[int, int] = {}
            for b in self._blocks.values():
                vals, n = np.unique(b[b > 0], return_counts=True)
                for v, k in zip(vals.tolist(), n.tolist()):
                    total[v] = total.get(v, 0) + k
        return total

    def load_dense(self, labels: Any, *, offset: Sequence[int] | None = None) -> None:
        """Replace the labels in a region by a dense array (0 = unlabelled), e.g. from HDF5/zarr.

        Values above the number of classes are refused (add classes first).
        """
        arr = np.asarray(labels)
        if arr.ndim != len(self._spec.shape):
            raise LabelError(f"labels have {arr.ndim} axes, the store has {len(self._spec.shape)} ({self._spec.axes})")
        if arr.dtype.kind not in "biu":
            raise LabelError(f"labels must be integers (0 = unlabelled, 1..K), got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > len(self._classes)):
            raise LabelError(
                f"label values {int(arr.min())}..{int(arr.max())} outside 0..{len(self._classes)}; "
                f"the store has {len(self._classes)} classes ({', '.join(self.class_names)})"
            )
        start = tuple(offset or (0,) * arr.ndim)
        try:
            roi = Roi(start, tuple(s + n for s, n in zip(start, arr.shape))).check_inside(self._spec.shape)
        except RoiError as e:
            raise LabelError(
                f"labels of shape {arr.shape} at {start} do not fit the image {self._spec.shape}: {e}"
            ) from e
        changed = []
        with self._lock:
            for idx in roi.block_indices(self.block_shape):
                broi = self.block_roi(idx)
                part = roi.intersection(broi)
                if part is None:
                    continue
                src = arr[part.relative_to(roi)].astype(np.uint8)
                blk = self._blocks.get(idx)
                if blk is None:
                    if not src.any():
                        continue
                    blk = np.zeros(broi.shape, np.uint8)
                blk[part.relative_to(broi)] = src
                if blk.any():
                    self._blocks[idx] = blk
                else:
                    self._blocks.pop(idx, None)
                self._versions[idx] = self._versions.get(idx, 0) + 1
                changed.append(part)
            self._undo.clear()
            self._version += 1
        if changed:
            self._notify(changed)

    def save_h5(self, group: Any) -> None:
        """Write the labelled blocks into an h5py group.

        Layout :data:`H5_LAYOUT` (2): attributes ``shape``, ``axes``, ``block_shape``,
        ``class_names``, ``class_colors``, ``layout``; dataset ``starts`` (int64,
        ``(n, ndim)``: first voxel of each block) and ``blocks`` (uint8,
        ``(n, *block_shape)``, one gzip chunk per block, blocks at the image edge
        zero-padded). Both datasets carry fletcher32 checksums. Empty stores write
        no datasets.
        """
        with self._lock:
            items = sorted((i, b.copy()) for i, b in self._blocks.items() if b.any())
        group.attrs["shape"] = np.asarray(self._spec.shape)
        group.attrs["axes"] = self._spec.axes
        group.attrs["block_shape"] = np.asarray(self.block_shape)
        group.attrs["class_names"] = np.asarray([c.name for c in self._classes], dtype=object)
        group.attrs["class_colors"] = np.asarray([c.color for c in self._classes], dtype=np.uint8).reshape(-1, 3)
        group.attrs["layout"] = np.int64(H5_LAYOUT)
        if not items:
            return
        # WHY two datasets, not one per block: a project with thousands of label blocks had
        # thousands of HDF5 objects, each opened, named and digested on every load.
        # fletcher32: HDF5 checks every chunk when reading, so a bit flipped on disk in the
        # user's labels or in a block position is an error, not silently moved labels.
        starts = np.asarray([self.block_roi(i).start for i, _ in items], dtype=np.int64)
        group.create_dataset("starts", data=starts, fletcher32=True, chunks=starts.shape)
        blocks = group.create_dataset(
            "blocks",
            shape=(len(items), *self.block_shape),
            dtype=np.uint8,
            chunks=(1, *self.block_shape),
            compression="gzip",
            fletcher32=True,
        )
        for k0 in range(0, len(items), _H5_BATCH):
            part = items[k0 : k0 + _H5_BATCH]
            buf = np.zeros((len(part), *self.block_shape), np.uint8)
            for j, (_, b) in enumerate(part):
                buf[(j, *(slice(0, n) for n in b.shape))] = b
            blocks[k0 : k0 + len(part)] = buf

    @classmethod
    def load_h5(cls, group: Any, *, name: str | None = None) -> LabelStore:
        """Rebuild a store written by :meth:`save_h5` (this layout or the older one), checking shapes and values."""
        try:
            shape = tuple(int(v) for v in group.attrs["shape"])
            axes = str(group.attrs["axes"])
            bshape = tuple(int(v) for v in group.attrs["block_shape"])
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["class_names"]]
            colors = np.asarray(group.attrs["class_colors"]).reshape(-1, 3)
            layout = int(group.attrs.get("layout", 1))
        except KeyError as e:
            raise LabelError(f"label group {group.name!r} lacks attribute {e}; it was not written by tda-graph") from e
        if layout not in (1, H5_LAYOUT):
            raise LabelError(
                f"label group {group.name!r} has layout {layout}; this tda-graph reads layouts 1 and "
                f"{H5_LAYOUT}: upgrade tda-graph to read it"
            )
        classes = [LabelClass(n, tuple(int(c) for c in col)) for n, col in zip(names, colors)]
        store = cls(shape, axes, classes, block_shape=bshape, name=name)
        if layout == 1:
            _load_h5_layout1(store, group, shape)
        else:
            _load_h5_layout2(store, group, shape, bshape)
        store._undo.clear()
        return store


#: Version of the HDF5 layout :meth:`LabelStore.save_h5` writes (1: one dataset per block).
H5_LAYOUT = 2
#: Blocks read or written per HDF5 call (64 blocks of 64^3 voxels: 16 MiB).
_H5_BATCH = 64


def _load_h5_layout1(store: LabelStore, group: Any, shape: tuple[int, ...]) -> None:
    # one dataset per block, its position in a "start" attribute (tda-graph before layout 2)
    for key in group:
        ds = group[key]
        start = tuple(int(v) for v in ds.attrs.get("start", ()))
        data = ds[()]
        if len(start) != len(shape) or data.dtype != np.uint8:
            raise LabelError(f"label block {ds.name!r} is malformed (start {start}, dtype {data.dtype})")
        store.load_dense(data, offset=start)


def _load_h5_layout2(store: LabelStore, group: Any, shape: tuple[int, ...], bshape: tuple[int, ...]) -> None:
    keys = sorted(group)
    if keys not in ([], ["blocks", "starts"]) or not all(hasattr(group[k], "dtype") for k in keys):
        raise LabelError(f"label group {group.name!r} is malformed: expected datasets starts and blocks, got {keys}")
    if not keys:
        return
    starts_ds, blocks = group["starts"], group["blocks"]
    n = blocks.shape[0] if blocks.ndim else -1
    if (
        blocks.dtype != np.uint8
        or blocks.shape[1:] != bshape
        or starts_ds.ndim != 2
        or starts_ds.shape != (n, len(shape))
        or starts_ds.dtype.kind not in "iu"
    ):
        raise LabelError(
            f"label group {group.name!r} is malformed: blocks {blocks.shape} {blocks.dtype} and starts "
            f"{starts_ds.shape} {starts_ds.dtype} do not match the block shape {bshape}"
        )
    starts = starts_ds[()].astype(np.int64)
    for k0 in range(0, n, _H5_BATCH):
        batch = blocks[k0 : k0 + _H5_BATCH]
        for j, start in enumerate(starts[k0 : k0 + _H5_BATCH]):
            # blocks at the image edge were zero-padded to the block shape
            size = [min(b, m - s) for b, m, s in zip(bshape, shape, start.tolist())]
            if min(size) < 1 or start.min() < 0:
                raise LabelError(f"label block {k0 + j} of {group.name!r} starts at {start.tolist()}, outside {shape}")
            store.load_dense(batch[(j, *(slice(0, m) for m in size))], offset=start.tolist())
