"""Store :class:`ForestArrays` in HDF5 as plain datasets (never pickle).

Layout of a group written by :func:`save_forest`::

    attrs:  format = "tda-forest", format_version = 1, n_features, n_classes, n_trees
    feature          int32   (n_nodes,)
    threshold        float32 (n_nodes,)
    left, right      int32   (n_nodes,)
    missing_go_left  uint8   (n_nodes,)      0/1
    leaf_value       float32 (n_leaves, n_classes)
    node_offsets     int64   (n_trees + 1,)
    leaf_offsets     int64   (n_trees + 1,)
    classes          int64 / float64 / bool / utf-8 string (n_classes,)

:func:`load_forest` checks presence, dtypes, shapes and every index bound before the
arrays reach a kernel (a corrupt child index could otherwise read out of bounds or
loop forever), so a loaded forest predicts without sklearn.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from .forest_cpu import FORMAT_VERSION, ForestArrays

__all__ = ["save_forest", "load_forest", "FORMAT_NAME"]

FORMAT_NAME = "tda-forest"

# dataset name -> (on-disk dtype, ndim)
_DATASETS: dict[str, tuple[np.dtype, int]] = {
    "feature": (np.dtype(np.int32), 1),
    "threshold": (np.dtype(np.float32), 1),
    "left": (np.dtype(np.int32), 1),
    "right": (np.dtype(np.int32), 1),
    "missing_go_left": (np.dtype(np.uint8), 1),
    "leaf_value": (np.dtype(np.float32), 2),
    "node_offsets": (np.dtype(np.int64), 1),
    "leaf_offsets": (np.dtype(np.int64), 1),
}


def save_forest(h5group: h5py.Group, arrays: ForestArrays) -> None:
    """Write ``arrays`` into an (empty) HDF5 group.

    Parameters
    ----------
    h5group : h5py.Group
        Destination group (a ``h5py.File`` is a group too).
    arrays : ForestArrays
        The forest to store.

    Raises
    ------
    ValueError
        If the group already holds forest datasets, or the class labels are not
        numbers, booleans or strings.
    """
    for name in (*_DATASETS, "classes"):
        if name in h5group:
            raise ValueError(f"group {h5group.name!r} already contains {name!r}")
    classes = np.asarray(arrays.classes)
    if classes.dtype.kind in "biuf":
        stored_classes: np.ndarray = classes
    elif classes.dtype.kind in "UO" and all(isinstance(c, str) for c in classes):
        stored_classes = classes.astype(object)
    else:
        raise ValueError(f"classes of dtype {classes.dtype} cannot be stored; use numbers or strings")
    for name in _DATASETS:
        value = getattr(arrays, name)
        if name == "missing_go_left":
            value = value.astype(np.uint8)
        # fletcher32: a flipped threshold or leaf value is caught on reading (bounds checks cannot)
        h5group.create_dataset(name, data=value, dtype=_DATASETS[name][0], fletcher32=True)
    if stored_classes.dtype == object:
        h5group.create_dataset("classes", data=stored_classes, dtype=h5py.string_dtype(encoding="utf-8"))
    else:
        h5group.create_dataset("classes", data=stored_classes, fletcher32=True)
    h5group.attrs["format"] = FORMAT_NAME
    h5group.attrs["format_version"] = FORMAT_VERSION
    h5group.attrs["n_features"] = int(arrays.n_features)
    h5group.attrs["n_classes"] = int(arrays.n_classes)
    h5group.attrs["n_trees"] = int(arrays.n_trees)


def _read(h5group: h5py.Group, name: str) -> np.ndarray:
    if name not in h5group:
        raise ValueError(f"forest dataset {name!r} is missing from group {h5group.name!r}")
    obj: Any = h5group[name]
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"forest dataset {name!r} is not a dataset")
    if name == "classes":
        if h5py.check_string_dtype(obj.dtype) is not None:
            return np.asarray(obj.asstr()[()], dtype=object).astype(str)
        data = np.asarray(obj[()])
        if data.dtype.kind not in "biuf":
            raise ValueError(f"forest dataset 'classes' has unsupported dtype {data.dtype}")
        return data
    dtype, ndim = _DATASETS[name]
    if obj.dtype != dtype:
        raise ValueError(f"forest dataset {name!r} has dtype {obj.dtype}, expected {dtype}")
    if len(obj.shape) != ndim:
        raise ValueError(f"forest dataset {name!r} has shape {obj.shape}, expected {ndim} dimension(s)")
    return np.ascontiguousarray(obj[()])


def _int_attr(h5group: h5py.Group, name: str) -> int:
    if name not in h5group.attrs:
        raise ValueError(f"forest attribute {name!r} is missing from group {h5group.name!r}")
    value = h5group.attrs[name]
    if np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise ValueError(f"forest attribute {name!r} must be an integer, got {value!r}")
    return int(value)


def load_forest(h5group: h5py.Group) -> ForestArrays:
    """Read and validate a forest written by :func:`save_forest`.

    Parameters
    ----------
    h5group : h5py.Group
        Source group.

    Returns
    -------
    ForestArrays
        Ready for :func:`operators.kernels.forest_cpu.predict_proba` (no sklearn needed).

    Raises
    ------
    ValueError
        If the format tag/version is wrong, a dataset is missing or has a wrong dtype
        or shape, or an index is out of range; the message names the dataset.
    """
    fmt = h5group.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise ValueError(f"group {h5group.name!r} is not a {FORMAT_NAME!r} group (format attribute {fmt!r})")
    version = _int_attr(h5group, "format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported forest format_version {version} (this code reads {FORMAT_VERSION})")
    n_features = _int_attr(h5group, "n_features")
    data = {name: _read(h5group, name) for name in (*_DATASETS, "classes")}
    mgl = data.pop("missing_go_left")
    if mgl.size and mgl.max() > 1:
        raise ValueError("forest dataset 'missing_go_left' must hold only 0 and 1")
    n_classes = _int_attr(h5group, "n_classes")
    if data["leaf_value"].shape[1] != n_classes:
        raise ValueError(
            f"forest dataset 'leaf_value' has {data['leaf_value'].shape[1]} "
            f"columns but attribute n_classes is {n_classes}"
        )
    # ForestArrays validates the shapes and every index bound, naming the dataset.
    return ForestArrays(missing_go_left=mgl.astype(bool), n_features=n_features, **data)
