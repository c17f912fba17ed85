"""Lazy file-backed sources: HDF5, zarr (v2, v3, OME-Zarr) and TIFF.

Each source reads only the region a request asks for. Files are opened per
read (HDF5, TIFF) or through a zarr array handle whose reads are independent
file reads, so the engine's worker threads can read concurrently.

Axes come from the ``axes`` argument, else from the file's metadata (OME-Zarr
``multiscales`` axes, zarr v3 ``dimension_names``, ilastik ``axistags``,
HDF5 ``DIMENSION_LABELS``, TIFF series axes), else from the number of
dimensions (2 → ``"yx"``, 3 → ``"zyx"``). Stored axes may be in any order
(``"cyx"``, ``"tczyx"``); the output uses the canonical order ``"tzyxc"`` and
reads are transposed accordingly.
"""

from __future__ import annotations

import abc
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tda_graph import ArraySpec, Operator, Roi, SpecError, TdaError, Window
from tda_graph.spec import AXES_ORDER

__all__ = [
    "MAX_CHUNK_BYTES",
    "FileSource",
    "Hdf5Source",
    "SourceError",
    "TiffSource",
    "ZarrSource",
    "open_image",
    "parse_image_spec",
    "validate_axes",
]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".ilp")
ZARR_SUFFIXES = (".zarr",)
TIFF_SUFFIXES = (".tif", ".tiff")


class SourceError(TdaError, ValueError):
    """A file-backed source cannot be opened: missing file or dataset, unsupported data or format."""


#: Largest storage chunk (HDF5 chunk, zarr chunk, TIFF strip or tile) a source accepts, in bytes.
#: Reading any region decodes whole chunks, so metadata claiming enormous chunks (damaged or
#: hostile files) would make a tiny request allocate that much; such files are refused at open.
MAX_CHUNK_BYTES = 2 << 30

#: Chunk-aligned cache blocks are grown (by whole chunks) to at least this size, so that
#: files with tiny chunks are not read in tiny pieces.
MIN_BLOCK_BYTES = 256 << 10

#: Chunks larger than this do not become cache blocks (too coarse to cache); the default
#: grid is used for them.
MAX_BLOCK_BYTES = 64 << 20


def _check_chunks(where: str, chunks: Sequence[int] | None, itemsize: int, fix: str) -> None:
    """Refuse storage chunks bigger than :data:`MAX_CHUNK_BYTES` (before anything is read)."""
    if not chunks:
        return
    nbytes = int(np.prod([int(c) for c in chunks], dtype=object)) * int(itemsize)  # object: no overflow
    if nbytes > MAX_CHUNK_BYTES:
        raise SourceError(
            f"{where} is stored in chunks of shape {tuple(int(c) for c in chunks)} ({nbytes / 2**30:.3g} GiB each, "
            f"limit {MAX_CHUNK_BYTES / 2**30:.3g} GiB): reading any region would decode a whole chunk; "
            f"the metadata may be damaged, otherwise {fix}"
        )


# -- axes -------------------------------------------------------------------------------------------


def chunk_block_shape(
    chunks: Sequence[int] | None, shape: Sequence[int], axes: str, itemsize: int
) -> tuple[int, ...] | None:
    """A cache grid aligned to a file's storage chunks (canonical axis order).

    WHY: a read that cuts a chunk decodes all of it. With the engine's default grid
    (64³ in 3D), a volume chunked ``(1, 512, 512)`` was decoded 20 times per block (the
    block spans 20 slices) and again for each of the 64 blocks a chunk touches; a grid of
    whole chunks decodes each chunk once.

    Parameters
    ----------
    chunks, shape : sequence of int
        Storage chunk shape and array shape, both in ``axes`` order.
    axes : str
        Canonical axes (``"tzyxc"`` order).
    itemsize : int
        Bytes per element.

    Returns
    -------
    tuple of int or None
        Whole channels, one time point, and per spatial axis a multiple of the chunk
        (clipped to the axis), grown from the last axis until the block holds at least
        :data:`MIN_BLOCK_BYTES`; ``None`` (engine default) for unchunked storage or
        chunks over :data:`MAX_BLOCK_BYTES`.
    """
    if not chunks or len(chunks) != len(shape):
        return None
    block = []
    for a, c, n in zip(axes, chunks, shape):
        if a == "c":
            block.append(int(n))
        elif a == "t":
            block.append(1)
        else:
            block.append(max(1, min(int(c), int(n))))
    if int(np.prod(block, dtype=object)) * itemsize > MAX_BLOCK_BYTES:
        return None
    spatial = [i for i, a in enumerate(axes) if a in "zyx"]
    base = list(block)
    grown = True
    while int(np.prod(block, dtype=object)) * itemsize < MIN_BLOCK_BYTES and grown:
        grown = False
        for i in reversed(spatial):  # x first, then y, then z: planes before slabs
            if block[i] < shape[i]:
                block[i] = min(int(shape[i]), block[i] + base[i])
                grown = True
                break
    return tuple(block)


def validate_axes(axes: str, shape: Sequence[int], where: str = "the image") -> str:
    """Check an axes string for an array of ``shape`` and return it in lower case.

    Parameters
    ----------
    axes : str
        One letter per stored axis from ``"tzyxc"``, in the order stored (any order).
    shape : sequence of int
        Shape of the stored array.
    where : str
        What is being described, used in error messages.

    Raises
    ------
    SpecError
        If a letter is unknown or repeated, or the length differs from ``len(shape)``;
        the message says how to fix it.
    """
    if not isinstance(axes, str) or not axes:
        raise SpecError(f"axes for {where} must be a non-empty string such as 'zyx', got {axes!r}")
    low = axes.lower()
    bad = sorted(set(low) - set(AXES_ORDER))
    if bad:
        raise SpecError(
            f"axes {axes!r} for {where} contain unknown letter(s) {bad}; use one letter per axis from 'tzyxc'"
        )
    if len(set(low)) != len(low):
        raise SpecError(f"axes {axes!r} for {where} repeat a letter; name every axis once, e.g. 'zyxc'")
    if len(low) != len(shape):
        raise SpecError(
            f"axes {axes!r} name {len(low)} axes but {where} has {len(shape)} (shape {tuple(shape)}); "
            f"pass one letter per axis"
        )
    if not any(a in "zyx" for a in low):
        raise SpecError(f"axes {axes!r} for {where} have no spatial axis; include at least one of 'z', 'y', 'x'")
    return low


def default_axes(shape: Sequence[int], where: str = "the image") -> str:
    """Axes guessed from the number of dimensions (2 → ``"yx"``, 3 → ``"zyx"``).

    Raises
    ------
    SpecError
        When the guess would be ambiguous: other dimensionalities, or a 3-D
        array whose last axis is short enough to be colour channels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3:
        if shape[2] <= 4 < min(shape[0], shape[1]):
            raise SpecError(
                f"cannot tell the axes of {where} with shape {shape}: the last axis may be colour channels; "
                "pass axes='yxc' for a colour image or axes='zyx' for a stack"
            )
        return "zyx"
    raise SpecError(
        f"cannot guess the axes of {where} with {len(shape)} dimensions (shape {shape}); "
        "pass axes=..., e.g. 'zyxc', 'tzyx' or 'tczyx' (letters in the order stored)"
    )


def _axes_from_names(names: Sequence[Any], ndim: int) -> str | None:
    """Axis letters from per-axis names (``"y"``, ``{"name": "y"}``, ``{"key": "y"}``), if all are known."""
    letters = []
    for n in names:
        if isinstance(n, Mapping):
            n = n.get("name", n.get("key"))
        if isinstance(n, bytes):
            n = n.decode()
        if not isinstance(n, str):
            return None
        n = n.strip().lower()
        if n not in AXES_ORDER:
            return None
        letters.append(n)
    out = "".join(letters)
    if len(out) != ndim or len(set(out)) != ndim:
        return None
    return out


def _canonical(stored: str) -> str:
    return "".join(sorted(stored, key=AXES_ORDER.index))


# -- image spec strings -----------------------------------------------------------------------------

_SPEC_RE = re.compile(
    r"^(?P<path>.*?(?P<ext>\.h5|\.hdf5|\.hdf|\.he5|\.ilp|\.zarr|\.tiff?))(?P<rest>:(?P<inner>.*))?$",
    re.IGNORECASE,
)


def parse_image_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``"file.h5:/data"``, ``"file.zarr[:path]"`` or ``"file.tif"`` into parts.

    Returns
    -------
    (path, inner, kind)
        ``kind`` is ``"hdf5"``, ``"zarr"`` or ``"tiff"``; ``inner`` the dataset or
        array path (``None`` when absent).

    Raises
    ------
    SourceError
        If the extension is not one of the supported formats.
    """
    s = str(spec)
    m = _SPEC_RE.match(s)
    if m is None:
        raise SourceError(
            f"cannot tell the format of {s!r}; use 'file.h5:/dataset' (HDF5), 'file.zarr[:array]' (zarr) "
            "or 'file.tif' (TIFF)"
        )
    ext = m.group("ext").lower()
    inner = m.group("inner")
    inner = inner if inner else None
    kind = "hdf5" if ext in HDF5_SUFFIXES else "zarr" if ext in ZARR_SUFFIXES else "tiff"
    if kind == "tiff" and inner is not None:
        raise SourceError(f"{s!r}: a TIFF file has no inner path; give just the file name")
    return m.group("path"), inner, kind


def open_image(spec: str | os.PathLike[str], axes: str | None = None, *, name: str | None = None) -> FileSource:
    """Open an image file as a lazy source, choosing the reader by extension.

    Parameters
    ----------
    spec : str or path
        ``"file.h5:/dataset"`` (the dataset may be omitted when the file holds
        exactly one), ``"file.zarr"`` or ``"file.zarr:path/in/group"``, ``"file.tif"``.
    axes : str, optional
        Stored axes (letters of ``"tzyxc"``, any order); default from metadata or ndim.
    name : str, optional
        Node label.
    """
    path, inner, kind = parse_image_spec(os.fspath(spec))
    if kind == "hdf5":
        return Hdf5Source(path, inner, axes=axes, name=name)
    if kind == "zarr":
        return ZarrSource(path, inner, axes=axes, name=name)
    return TiffSource(path, axes=axes, name=name)


# -- base class -------------------------------------------------------------------------------------


class FileSource(Operator):
    """Base class of the file-backed sources: axes mapping, spec and ROI reads.

    Subclasses implement :meth:`_read` (stored-order slices → numpy array).
    """

    cached = True
    kind = "file"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._path = Path(path)
        if not self._path.exists():
            raise SourceError(f"{self.kind} file {str(self._path)!r} does not exist; check the path")

    def _setup(
        self,
        shape: Sequence[int],
        dtype: Any,
        axes: str | None,
        meta_axes: str | None,
        channel_names: Sequence[str] = (),
        chunks: Sequence[int] | None = None,
    ) -> None:
        where = f"{self.location!r}"
        dt = np.dtype(dtype)
        if dt.kind not in "biuf" or dt.fields is not None:
            raise SourceError(f"{where} has dtype {dt}; only boolean, integer and float images can be read")
        shape = tuple(int(n) for n in shape)
        if axes is not None:
            stored = validate_axes(axes, shape, where)
        elif meta_axes is not None:
            stored = validate_axes(meta_axes, shape, where)
        else:
            stored = default_axes(shape, where)
        canon = _canonical(stored)
        self._stored_axes = stored
        self._perm = tuple(stored.index(a) for a in canon)  # canonical axis i = stored axis perm[i]
        cshape = tuple(shape[j] for j in self._perm)
        names = tuple(channel_names) if "c" in canon and len(channel_names) == cshape[canon.index("c")] else ()
        cchunks = None if not chunks or len(chunks) != len(shape) else tuple(int(chunks[j]) for j in self._perm)
        block = chunk_block_shape(cchunks, cshape, canon, dt.itemsize)
        try:
            self._spec = ArraySpec(cshape, dt.newbyteorder("="), canon, names, block_shape=block)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from e

    # -- properties ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The file (or zarr folder) read."""
        return self._path

    @property
    def inner_path(self) -> str | None:
        """Dataset / array path inside the file (``None`` for TIFF)."""
        return None

    @property
    def location(self) -> str:
        """``"file.h5:/dataset"`` style string that :func:`open_image` accepts."""
        inner = self.inner_path
        return str(self._path) if inner is None else f"{self._path}:{inner}"

    @property
    def stored_axes(self) -> str:
        """Axes in the order stored in the file (the output uses canonical order)."""
        return self._stored_axes

    # -- engine contract ----------------------------------------------------------------------------
    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        return self._spec

    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        canon = roi.to_slices()
        stored: list[slice] = [slice(None)] * len(canon)
        for i, j in enumerate(self._perm):
            stored[j] = canon[i]
        try:
            data = np.asarray(self._read(tuple(stored)))
        except TdaError:
            raise
        except Exception as e:  # readers of damaged files raise many types; name the file and region
            raise SourceError(
                f"cannot read {roi!r} of {self.location!r} ({type(e).__name__}: {e}); "
                "the file may be damaged or truncated: check it or restore it"
            ) from e
        if self._perm != tuple(range(len(self._perm))):
            data = data.transpose(self._perm)
        return np.ascontiguousarray(data, dtype=self._spec.dtype)

    @abc.abstractmethod
    def _read(self, slices: tuple[slice, ...]) -> Any:
        """Read ``slices`` (in stored axis order) from the file."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location!r} {self._spec.describe()}>"


# -- HDF5 -------------------------------------------------------------------------------------------


def _h5_datasets(f: Any) -> list[str]:
    import h5py

    out: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 2:
            out.append("/" + name)

    f.visititems(visit)
    return out


def _attr_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SOU":
        return _attr_text(value[()])
    return None


class Hdf5Source(FileSource):
    """A dataset of an HDF5 file (``.h5``, ``.hdf5``, ilastik ``.ilp``), read lazily.

    Parameters
    ----------
    path : str or path
        The HDF5 file.
    dataset : str, optional
        Dataset path inside the file; may be omitted when the file holds exactly one
        dataset of 2 or more dimensions.
    axes : str, optional
        Stored axes; default from ilastik ``axistags`` or ``DIMENSION_LABELS``, else by ndim.
    name : str, optional
        Node label.

    Notes
    -----
    The file is opened for each read, so reads are thread-safe (h5py serialises
    them internally) and the file is never held open between requests.
    """

    kind = "HDF5"

    def __init__(
        self,
        path: str | os.PathLike[str],
        dataset: str | None = None,
        axes: str | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(path, name=name)
        import h5py

        try:
            f = h5py.File(self._path, "r")
        except OSError as e:
            raise SourceError(
                f"{str(self._path)!r} is not a readable HDF5 file ({e}); check the path and format"
            ) from e
        try:
            with f:
                self._open_dataset(f, dataset, axes)
        except TdaError:
            raise
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
            # h5py's errors for damaged object headers, B-trees or attributes
            raise SourceError(
                f"{str(self._path)!r} is damaged or not a readable HDF5 image ({type(e).__name__}: {e}); "
                "check the file (h5dump / h5py) or restore it"
            ) from e

    def _open_dataset(self, f: Any, dataset: str | None, axes: str | None) -> None:
        import h5py

        available = _h5_datasets(f)
        if dataset is None:
            if len(available) != 1:
                raise SourceError(
                    f"{str(self._path)!r} holds {len(available)} image datasets; name one as "
                    f"'{self._path}:/dataset' (available: {', '.join(available) or 'none'})"
                )
            dataset = available[0]
        obj = f.get(dataset)
        if not isinstance(obj, h5py.Dataset):
            what = "is a group, not a dataset" if obj is not None else "does not exist"
            raise SourceError(
                f"dataset {dataset!r} {what} in {str(self._path)!r}; "
                f"available datasets: {', '.join(available) or 'none'}"
            )
        self._dataset = obj.name
        meta = None
        tags = _attr_text(obj.attrs.get("axistags"))
        if tags is not None:
            try:
                meta = _axes_from_names(json.loads(tags).get("axes", []), obj.ndim)
            except (ValueError, AttributeError):
                meta = None
        if meta is None and "DIMENSION_LABELS" in obj.attrs:
            meta = _axes_from_names(list(np.atleast_1d(obj.attrs["DIMENSION_LABELS"])), obj.ndim)
        self._setup(obj.shape, obj.dtype, axes, meta, chunks=obj.chunks)
        _check_chunks(repr(self.location), obj.chunks, obj.dtype.itemsize, "rewrite it with smaller chunks")

    @property
    def inner_path(self) -> str:
        return self._dataset

    def _read(self, slices: tuple[slice, ...]) -> Any:
        import h5py

        with h5py.File(self._path, "r") as f:
            return f[self._dataset][slices]


# -- zarr -------------------------------------------------------------------------------------------


def _ome_multiscales(attrs: Mapping[str, Any]) -> list[Any] | None:
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), Mapping):  # OME-Zarr 0.5 (zarr v3)
        ms = attrs["ome"].get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _omero_channels(attrs: Mapping[str, Any]) -> list[str]:
    om = attrs.get("omero")
    if om is None and isinstance(attrs.get("ome"), Mapping):
        om = attrs["ome"].get("omero")
    if not isinstance(om, Mapping):
        return []
    chans = om.get("channels", [])
    names = [c.get("label") for c in chans if isinstance(c, Mapping)]
    return [str(n) for n in names] if names and all(n is not None for n in names) else []


class ZarrSource(FileSource):
    """An array of a zarr store (format 2 or 3), including OME-Zarr images, read lazily.

    Parameters
    ----------
    path : str or path
        The ``.zarr`` folder (an array or a group).
    array_path : str, optional
        Array inside a group. Default: scale 0 of an OME-Zarr ``multiscales`` group,
        or the group's only array.
    axes : str, optional
        Stored axes; default from OME-Zarr ``multiscales`` axes or zarr v3
        ``dimension_names``, else by ndim.
    name : str, optional
        Node label.

    Notes
    -----
    The zarr array handle holds no open file; each read opens the chunk files it
    needs, so concurrent reads from worker threads are safe.
    """

    kind = "zarr"

    def __init__(
        self,
        path: str | os.PathLike[str],
        array_path: str | None = None,
        axes: str | None = None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(path, name=name)
        import zarr

        try:
            root = zarr.open(store=str(self._path), mode="r")
        except Exception as e:  # zarr raises several types for unreadable stores
            raise SourceError(f"{str(self._path)!r} is not a readable zarr store ({e}); check the path") from e
        meta_axes: str | None = None
        channel_names: list[str] = []
        inner = array_path.strip("/") if array_path else None
        if isinstance(root, zarr.Array):
            if inner:
                raise SourceError(f"{str(self._path)!r} is a zarr array, not a group; drop the array path {inner!r}")
            arr = root
            meta_axes, channel_names = self._parent_ome_axes(arr.ndim)
        else:
            available = sorted(p for p, _ in root.arrays()) if hasattr(root, "arrays") else []
            multiscales = _ome_multiscales(dict(root.attrs))
            ome_paths: dict[str, Any] = {}
            if multiscales:
                ms0 = multiscales[0]
                ds = [d.get("path") for d in ms0.get("datasets", []) if isinstance(d, Mapping)]
                for p in ds:
                    ome_paths[str(p).strip("/")] = ms0.get("axes")
                if inner is None and ds:
                    inner = str(ds[0]).strip("/")
            if inner is None:
                deep = self._all_arrays(root)
                if len(deep) != 1:
                    raise SourceError(
                        f"zarr group {str(self._path)!r} holds {len(deep)} arrays and no OME-Zarr multiscales; "
                        f"name one as '{self._path}:<array>' (available: {', '.join(deep) or 'none'})"
                    )
                inner = deep[0]
            try:
                arr = root[inner]
            except KeyError:
                arr = None
            if not isinstance(arr, zarr.Array):
                deep = self._all_arrays(root) or available
                raise SourceError(
                    f"array {inner!r} not found in zarr group {str(self._path)!r}; "
                    f"available arrays: {', '.join(deep) or 'none'}"
                )
            ax = ome_paths.get(inner)
            if ax:
                meta_axes = _axes_from_names(ax, arr.ndim)
                channel_names = _omero_channels(dict(root.attrs))
        try:
            if meta_axes is None:
                meta_axes = self._array_axes(arr)
            shape, dtype, chunks = arr.shape, arr.dtype, arr.chunks
        except TdaError:
            raise
        except Exception as e:  # metadata zarr accepted at open but cannot describe (odd dtype, chunk grid)
            raise SourceError(f"zarr array {str(self._path)!r} has unusable metadata ({type(e).__name__}: {e})") from e
        self._array = arr
        self._inner = inner
        self._setup(shape, dtype, axes, meta_axes, channel_names, chunks=chunks)
        _check_chunks(repr(self.location), chunks, self._spec.dtype.itemsize, "rechunk it (zarr chunks of ~1-64 MiB)")

    def _parent_ome_axes(self, ndim: int) -> tuple[str | None, list[str]]:
        """Axes of an array opened directly inside an OME-Zarr image (``image.zarr/0``)."""
        import zarr

        parent = self._path.resolve().parent
        if not any((parent / m).is_file() for m in (".zattrs", "zarr.json")):
            return None, []
        try:
            attrs = dict(zarr.open_group(str(parent), mode="r").attrs)
        except Exception:  # not a readable group: no metadata to use
            return None, []
        for ms in _ome_multiscales(attrs) or []:
            paths = {str(d.get("path", "")).strip("/") for d in ms.get("datasets", []) if isinstance(d, Mapping)}
            if self._path.name in paths and ms.get("axes"):
                return _axes_from_names(ms["axes"], ndim), _omero_channels(attrs)
        return None, []

    @staticmethod
    def _all_arrays(group: Any) -> list[str]:
        out: list[str] = []

        def walk(g: Any, prefix: str) -> None:
            for key, member in sorted(g.members()):
                full = f"{prefix}{key}"
                if hasattr(member, "members"):
                    walk(member, full + "/")
                else:
                    out.append(full)

        walk(group, "")
        return out

    @staticmethod
    def _array_axes(arr: Any) -> str | None:
        names = getattr(arr.metadata, "dimension_names", None)
        if names and all(n is not None for n in names):
            return _axes_from_names(list(names), arr.ndim)
        dims = dict(arr.attrs).get("_ARRAY_DIMENSIONS")
        if isinstance(dims, list):
            return _axes_from_names(dims, arr.ndim)
        return None

    @property
    def inner_path(self) -> str | None:
        return self._inner

    def _read(self, slices: tuple[slice, ...]) -> Any:
        return self._array[slices]


# -- TIFF -------------------------------------------------------------------------------------------

_TIFF_AXES = {"T": "t", "Z": "z", "Y": "y", "X": "x", "C": "c", "S": "c"}


def _check_extents(path: str, page: Any, file_size: int) -> None:
    """Refuse a TIFF page whose strips/tiles point past the end of the file.

    WHY: tifffile reads a strip with ``read(bytecount)``, which allocates the claimed
    size first: one flipped bit in a byte-count tag made a 2 kB file ask for 3.9 GB.
    """
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    counts = np.asarray(page.databytecounts, dtype=np.uint64)
    if offsets.shape != counts.shape:
        raise SourceError(
            f"{path!r} is a damaged TIFF: page {page.index} lists {offsets.size} strip/tile offsets but "
            f"{counts.size} byte counts; restore the file or re-save it"
        )
    ends = offsets + counts
    bad = np.flatnonzero((ends > file_size) | (ends < offsets))
    if bad.size:
        k = int(bad[0])
        raise SourceError(
            f"{path!r} is a damaged TIFF: strip/tile {k} of page {page.index} claims bytes {int(offsets[k])}.."
            f"{int(offsets[k]) + int(counts[k])} but the file has {file_size} bytes; restore the file or re-save it"
        )


class TiffSource(FileSource):
    """The first image series of a TIFF file (also OME-TIFF, BigTIFF), read lazily.

    Parameters
    ----------
    path : str or path
        The TIFF file.
    axes : str, optional
        Stored axes; default from the series axes tifffile reports (when they are all
        of ``TZCYXS``), else by ndim.
    name : str, optional
        Node label.

    Notes
    -----
    Reads go through tifffile's zarr view of the series (``aszarr``), which reads
    only the pages and strips/tiles a region touches. The file is opened per read.
    """

    kind = "TIFF"

    def __init__(self, path: str | os.PathLike[str], axes: str | None = None, *, name: str | None = None) -> None:
        super().__init__(path, name=name)
        import tifffile

        try:
            with tifffile.TiffFile(self._path) as tif:
                series = tif.series[0]
                shape, dtype, tif_axes = series.shape, series.dtype, series.axes
                page = series.keyframe
                chunks, n_chunks, n_stored = page.chunks, page.chunked, len(page.dataoffsets)
                page_shape = tuple(page.shape)
        except Exception as e:  # tifffile raises many types (RuntimeError, ZeroDivisionError, ...) on damaged files
            raise SourceError(
                f"{str(self._path)!r} is not a readable TIFF file ({type(e).__name__}: {e}); check the path, "
                "or whether the file is damaged"
            ) from e
        expected = int(np.prod([int(n) for n in n_chunks], dtype=object))
        if n_stored != expected:
            # a header whose size tags disagree with its strip/tile tables (damaged, or claiming a huge image)
            raise SourceError(
                f"{str(self._path)!r} is a damaged TIFF: its header describes an image of shape {tuple(page.shape)} "
                f"in {expected} strips/tiles but the file lists {n_stored}; restore the file or re-save it"
            )
        _check_chunks(repr(str(self._path)), chunks, np.dtype(dtype).itemsize, "re-save it tiled (e.g. 256x256 tiles)")
        self._file_size = os.path.getsize(self._path)
        _check_extents(str(self._path), page, self._file_size)
        meta = None
        if tif_axes and all(a in _TIFF_AXES for a in tif_axes):
            meta = _axes_from_names([_TIFF_AXES[a] for a in tif_axes], len(shape))
        # pages (and their strips or tiles) are the storage chunks of a stack
        lead = len(shape) - len(page_shape)
        whole = lead >= 0 and tuple(shape[lead:]) == page_shape and len(chunks) == len(page_shape)
        self._page_dims = tuple(int(n) for n in shape[:lead]) if whole else None
        self._all_pages_checked = False
        self._setup(shape, dtype, axes, meta, chunks=(1,) * lead + tuple(chunks) if whole else None)

    def _pages_touched(self, series: Any, slices: tuple[slice, ...]) -> Iterator[Any]:
        dims = self._page_dims
        if dims is None:  # pages do not map onto leading axes: check them all, once
            if not self._all_pages_checked:
                yield from (page for page in series.pages if page is not None)
                self._all_pages_checked = True
            return
        if not dims:
            yield series.keyframe
            return
        ranges = [range(*sl.indices(n)) for sl, n in zip(slices, dims)]
        for idx in itertools.product(*ranges):
            page = series.pages[int(np.ravel_multi_index(idx, dims))]
            if page is not None:
                yield page

    def _read(self, slices: tuple[slice, ...]) -> Any:
        import tifffile
        import zarr

        with tifffile.TiffFile(self._path) as tif:
            series = tif.series[0]
            for page in self._pages_touched(series, slices):  # before tifffile allocates their strips
                _check_extents(str(self._path), page, self._file_size)
            store = series.aszarr()
            try:
                return zarr.open_array(store, mode="r")[slices]
            finally:
                store.close()
