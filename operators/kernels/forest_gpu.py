"""Random-forest inference on an NVIDIA GPU with a cupy ``RawKernel``.

Importing this module never imports cupy; cupy is imported on first use, so CPU-only
installations can import it (``is_available()`` tells whether it can run).

One CUDA thread evaluates one sample over all trees (the forest is small and read
through the read-only cache; a warp's samples mostly share the top levels of each
tree), accumulating in float64 like sklearn and writing float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .forest_cpu import ForestArrays

__all__ = ["DeviceForest", "is_available", "to_device", "predict_proba"]

_THREADS = 256

_SOURCE = r"""
extern "C" __global__ void forest_predict_proba(
    const float* __restrict__ X,          // (n, n_features) C-order
    const long long n,
    const int n_features,
    const int4* __restrict__ nodes,       // [feature | mgl << 31, thr bits, left, right]
    const int* __restrict__ roots,        // (n_trees,) node index or ~leaf
    const int n_trees,
    const float* __restrict__ leaf_value, // (n_leaves, NCLASSES)
    float* __restrict__ out)              // (n, NCLASSES)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* x = X + i * (long long)n_features;
    double acc[NCLASSES];
    #pragma unroll
    for (int c = 0; c < NCLASSES; ++c) acc[c] = 0.0;
    for (int t = 0; t < n_trees; ++t) {
        int nd = roots[t];
        while (nd >= 0) {  // children always follow their parent: terminates
            const int4 rec = __ldg(nodes + nd);
            const float v = __ldg(x + (rec.x & 0x7fffffff));
            // NaN fails <=; then the sign bit (sklearn's missing_go_to_left) decides.
            const bool go_left = (v <= __int_as_float(rec.y)) || ((v != v) && (rec.x < 0));
            nd = go_left ? rec.z : rec.w;
        }
        const float* lv = leaf_value + (long long)(~nd) * NCLASSES;
        #pragma unroll
        for (int c = 0; c < NCLASSES; ++c) acc[c] += (double)__ldg(lv + c);
    }
    float* o = out + i * NCLASSES;
    #pragma unroll
    for (int c = 0; c < NCLASSES; ++c) o[c] = (float)(acc[c] / (double)n_trees);
}
"""

_kernels: dict[int, Any] = {}


def _cupy() -> Any:
    import cupy  # noqa: PLC0415 - lazy on purpose: cupy is optional

    return cupy


def is_available() -> bool:
    """Return True if cupy is importable and at least one CUDA device is visible."""
    try:
        cp = _cupy()
        return int(cp.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return False


def _kernel(n_classes: int) -> Any:
    # WHY one kernel per class count: a compile-time NCLASSES keeps the accumulator
    # in registers (cupy also caches the compiled binary on disk).
    k = _kernels.get(n_classes)
    if k is None:
        cp = _cupy()
        k = cp.RawKernel(_SOURCE, "forest_predict_proba", options=(f"-DNCLASSES={n_classes}",))
        _kernels[n_classes] = k
    return k


@dataclass(frozen=True, eq=False)
class DeviceForest:
    """A :class:`ForestArrays` uploaded to the current CUDA device.

    Attributes
    ----------
    nodes : cupy.ndarray of int32, shape (max(n_nodes, 1), 4)
    roots : cupy.ndarray of int32, shape (n_trees,)
    leaf_value : cupy.ndarray of float32, shape (n_leaves, n_classes)
    n_features, n_classes, n_trees : int
    classes : numpy.ndarray
    """

    nodes: Any
    roots: Any
    leaf_value: Any
    n_features: int
    n_classes: int
    n_trees: int
    classes: np.ndarray


def to_device(arrays: ForestArrays) -> DeviceForest:
    """Upload a forest once, for repeated :func:`predict_proba` calls.

    Parameters
    ----------
    arrays : ForestArrays

    Returns
    -------
    DeviceForest
    """
    cp = _cupy()
    packed = arrays.packed_nodes
    if packed.shape[0] == 0:  # all trees are single leaves; keep a valid pointer
        packed = np.zeros((1, 4), np.int32)
    return DeviceForest(
        nodes=cp.asarray(np.ascontiguousarray(packed)),
        roots=cp.asarray(arrays.roots),
        leaf_value=cp.asarray(np.ascontiguousarray(arrays.leaf_value)),
        n_features=arrays.n_features,
        n_classes=arrays.n_classes,
        n_trees=arrays.n_trees,
        classes=arrays.classes,
    )


def predict_proba(arrays: ForestArrays | DeviceForest, X: Any, *, out: Any = None) -> Any:
    """Class probabilities on the GPU, equal to sklearn's ``predict_proba``.

    Parameters
    ----------
    arrays : ForestArrays or DeviceForest
        The forest (a ``ForestArrays`` is uploaded on every call; use
        :func:`to_device` to upload once).
    X : cupy.ndarray or array_like, shape (n_samples, n_features)
        Converted to C-contiguous float32 on the device, as sklearn does.
    out : cupy.ndarray of float32, shape (n_samples, n_classes), optional
        C-contiguous device array to write into.

    Returns
    -------
    cupy.ndarray of float32, shape (n_samples, n_classes)

    Raises
    ------
    ValueError
        On wrong shapes or an unusable ``out``.
    """
    cp = _cupy()
    dev = arrays if isinstance(arrays, DeviceForest) else to_device(arrays)
    X = cp.ascontiguousarray(cp.asarray(X), dtype=cp.float32)
    if X.ndim != 2 or X.shape[1] != dev.n_features:
        raise ValueError(f"X must have shape (n_samples, {dev.n_features}), got {X.shape}")
    shape = (X.shape[0], dev.n_classes)
    if out is None:
        out = cp.empty(shape, dtype=cp.float32)
    elif not isinstance(out, cp.ndarray) or out.shape != shape or out.dtype != cp.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 cupy array of shape {shape}")
    n = X.shape[0]
    if n == 0:
        return out
    blocks = (n + _THREADS - 1) // _THREADS
    _kernel(dev.n_classes)(
        (blocks,),
        (_THREADS,),
        (X, np.int64(n), np.int32(dev.n_features), dev.nodes, dev.roots, np.int32(dev.n_trees), dev.leaf_value, out),
    )
    return out
