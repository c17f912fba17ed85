"""x86 SIMD building blocks for numba kernels: "left-pack" partition steps of 8 and 16 lanes.

The random-forest partition walk (:mod:`operators.kernels.forest_cpu`) spends most of
its time splitting a list of sample indices into those that go left (``x <= t``) and
those that go right.  Scalar code does that one index at a time.  With AVX2, eight
indices are compared at once, the eight comparison bits select a precomputed
permutation (:func:`left_pack_table`), and ``vpermd`` moves the left-goers to the front
of one vector and the right-goers to the back of another; two unaligned stores then
append them to the two ends of the output list.  Nothing here exists in numba itself,
so the steps are written as LLVM IR with :func:`numba.extending.intrinsic`.

With AVX-512 (:func:`avx512_available`), :func:`partition16` takes sixteen indices per
step: the comparison gives a mask register directly and ``vpcompressd`` packs the
left-goers and the right-goers, so no table is read.  Where the CPU numba compiles for
has no AVX-512, the same call compiles to two eight-lane AVX2 steps, so one kernel
source serves both (numba's on-disk cache keys on the CPU's features).

Only call these from kernels compiled when :func:`avx2_available` is true: the
``vpermd`` intrinsic cannot be compiled for a CPU without AVX2.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "avx2_available",
    "avx512_available",
    "left_pack_table",
    "partition8",
    "partition8_iota",
    "partition16",
    "partition16_iota",
]

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(ir.FloatType(), 8)
_V16I = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(ir.FloatType(), 16)
_M16 = ir.VectorType(_I1, 16)


def _target_has(feature: str) -> bool:
    # The features numba compiles for: NUMBA_CPU_FEATURES when set, else the host CPU's.
    import numba
    from llvmlite import binding

    if numba.config.CPU_FEATURES:
        return f"+{feature}" in numba.config.CPU_FEATURES.split(",")
    try:
        return bool(binding.get_host_cpu_features().get(feature, False))
    except RuntimeError:  # llvmlite cannot read the features on some platforms
        return False


@lru_cache(maxsize=1)
def avx2_available() -> bool:
    """Whether numba compiles for an x86-64 CPU with AVX2 (the host CPU, not a generic one).

    Returns
    -------
    bool
        False on other architectures, on x86 CPUs without AVX2, when
        ``NUMBA_CPU_NAME`` asks numba for a portable (non-host) target or
        ``NUMBA_CPU_FEATURES`` leaves AVX2 out, or when ``NUMBA_DISABLE_JIT`` is set.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import numba

    if numba.config.CPU_NAME not in (None, "host") or numba.config.DISABLE_JIT:
        return False  # a portable target cannot take vpermd; without the JIT an intrinsic cannot run
    return _target_has("avx2")


@lru_cache(maxsize=1)
def avx512_available() -> bool:
    """Whether the CPU numba compiles for has AVX-512 (Foundation), on top of AVX2.

    Decides at compile time what :func:`partition16` becomes.  Reads
    ``NUMBA_CPU_FEATURES`` when it is set (numba then compiles for those features),
    else the host CPU's.

    Returns
    -------
    bool
        False wherever :func:`avx2_available` is false.
    """
    return avx2_available() and _target_has("avx512f")


def left_pack_table() -> np.ndarray:
    """Permutations for the left-pack step, one row per 8-bit comparison mask.

    Returns
    -------
    ndarray of int32, shape (256, 16)
        Row ``m``: columns 0-7 bring the lanes whose bit is set to the front, in lane
        order; columns 8-15 bring the other lanes to the back, the first of them last
        (they are stored at the top end of the list, which grows downwards).
    """
    table = np.zeros((256, 16), np.int32)
    for m in range(256):
        left = [k for k in range(8) if m >> k & 1]
        right = [k for k in range(8) if not m >> k & 1]
        table[m, : len(left)] = left
        for q, k in enumerate(right):
            table[m, 15 - q] = k
    return table


def _splat(builder: ir.IRBuilder, value: ir.Value, vtype: ir.VectorType) -> ir.Value:
    v = builder.insert_element(ir.Constant(vtype, None), value, ir.Constant(_I32, 0))
    lanes = ir.VectorType(_I32, vtype.count)
    return builder.shuffle_vector(v, ir.Constant(vtype, None), ir.Constant(lanes, [0] * vtype.count))


def _pack_and_store(
    builder: ir.IRBuilder, idx: ir.Value, xs: ir.Value, th: ir.Value, bufp: ir.Value, lutp: ir.Value, lo: Any, hi: Any
) -> ir.Value:
    # ordered <=: the same branch as the scalar ``x <= t`` (the callers keep NaN out)
    mask = builder.bitcast(builder.fcmp_ordered("<=", xs, _splat(builder, th, _V8F)), _I8)
    ctpop = builder.module.declare_intrinsic("llvm.ctpop", [_I8])
    n_left = builder.zext(builder.call(ctpop, [mask]), _I64)
    row = builder.mul(builder.zext(mask, _I64), ir.Constant(_I64, 16))
    perm_l = builder.load(builder.bitcast(builder.gep(lutp, [row]), _V8I.as_pointer()), align=4)
    row_r = builder.add(row, ir.Constant(_I64, 8))
    perm_r = builder.load(builder.bitcast(builder.gep(lutp, [row_r]), _V8I.as_pointer()), align=4)
    permd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V8I, _V8I]), "llvm.x86.avx2.permd")
    to_left = builder.call(permd, [idx, perm_l])
    to_right = builder.call(permd, [idx, perm_r])
    builder.store(to_left, builder.bitcast(builder.gep(bufp, [lo]), _V8I.as_pointer()), align=4)
    top = builder.sub(hi, ir.Constant(_I64, 7))
    builder.store(to_right, builder.bitcast(builder.gep(bufp, [top]), _V8I.as_pointer()), align=4)
    return n_left


def _compress(builder: ir.IRBuilder, v: ir.Value, mask: ir.Value) -> ir.Value:
    # vpcompressd into a register (the form that writes memory is microcoded on Zen 4)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16I, [_V16I, _V16I, _M16]), "llvm.x86.avx512.mask.compress.v16i32"
    )
    return builder.call(fn, [v, ir.Constant(_V16I, None), mask])


def _pack_and_store16(
    builder: ir.IRBuilder, idx: ir.Value, xs: ir.Value, th: ir.Value, bufp: ir.Value, lo: Any, hi: Any
) -> ir.Value:
    # The AVX-512 form of _pack_and_store: the compare yields a mask register and two
    # compresses pack the lanes; the right-goers are reversed for the downward end.
    mask = builder.fcmp_ordered("<=", xs, _splat(builder, th, _V16F))
    ctpop = builder.module.declare_intrinsic("llvm.ctpop", [_I16])
    n_left = builder.zext(builder.call(ctpop, [builder.bitcast(mask, _I16)]), _I64)
    to_left = _compress(builder, idx, mask)
    to_right = _compress(builder, idx, builder.xor(mask, ir.Constant(_M16, [1] * 16)))
    reverse = ir.Constant(_V16I, list(range(15, -1, -1)))
    to_right = builder.shuffle_vector(to_right, ir.Constant(_V16I, None), reverse)
    builder.store(to_left, builder.bitcast(builder.gep(bufp, [lo]), _V16I.as_pointer()), align=4)
    top = builder.sub(hi, ir.Constant(_I64, 15))
    builder.store(to_right, builder.bitcast(builder.gep(bufp, [top]), _V16I.as_pointer()), align=4)
    return n_left


def _check_args(buf: Any, xb: Any, lut: Any) -> None:
    ok = (
        isinstance(buf, types.Array)
        and buf.dtype == types.uint32
        and buf.layout == "C"
        and isinstance(xb, types.Array)
        and xb.dtype == types.float32
        and xb.layout == "C"
        and isinstance(lut, types.Array)
        and lut.dtype == types.int32
        and lut.layout == "C"
    )
    if not ok:
        raise TypeError("the partition steps need C-contiguous uint32 buf, float32 xb and int32 lut arrays")


def _gather_lanes(builder: ir.IRBuilder, bufp: Any, xbp: Any, i: Any, fo: Any, n: int) -> tuple[ir.Value, ir.Value]:
    # indices buf[i:i+n] (one vector load) and their values xb[fo + j]: n scalar loads,
    # which beat vpgatherdd on Zen 3 (C prototype and numba) and vgatherdps on Zen 4
    # (the viewport about 30 % slower with it)
    vi, vf = ir.VectorType(_I32, n), ir.VectorType(ir.FloatType(), n)
    src = builder.gep(bufp, [i])
    idx = builder.load(builder.bitcast(src, vi.as_pointer()), align=4)
    xs = ir.Constant(vf, None)
    for k in range(n):
        j = builder.load(builder.gep(src, [ir.Constant(_I64, k)]))
        x = builder.load(builder.gep(xbp, [builder.add(fo, builder.zext(j, _I64))]))
        xs = builder.insert_element(xs, x, ir.Constant(_I32, k))
    return idx, xs


def _iota_lanes(builder: ir.IRBuilder, bufp: Any, xbp: Any, i: Any, fo: Any, n: int) -> tuple[ir.Value, ir.Value]:
    # indices i..i+n-1 (not read from buf) and their values, one contiguous load
    vi, vf = ir.VectorType(_I32, n), ir.VectorType(ir.FloatType(), n)
    idx = builder.add(_splat(builder, builder.trunc(i, _I32), vi), ir.Constant(vi, list(range(n))))
    xs = builder.load(builder.bitcast(builder.gep(xbp, [builder.add(fo, i)]), vf.as_pointer()), align=4)
    return idx, xs


def _partition_intrinsic(buf: Any, xb: Any, lut: Any, lanes: Any, width: int) -> Any:
    # ``width`` 8: one AVX2 step.  16: one AVX-512 step where the target has it, else two
    # AVX2 steps, the second appending after the first.
    _check_args(buf, xb, lut)
    sig = types.uint64(buf, types.uint64, xb, types.uint64, types.float32, types.uint64, types.uint64, lut)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        buf_v, i_v, xb_v, fo_v, th_v, lo_v, hi_v, lut_v = args
        bufp = context.make_array(signature.args[0])(context, builder, buf_v).data
        xbp = context.make_array(signature.args[2])(context, builder, xb_v).data
        if width == 16 and avx512_available():
            idx, xs = lanes(builder, bufp, xbp, i_v, fo_v, 16)
            return _pack_and_store16(builder, idx, xs, th_v, bufp, lo_v, hi_v)
        lutp = context.make_array(signature.args[7])(context, builder, lut_v).data
        eight = ir.Constant(_I64, 8)
        total = ir.Constant(_I64, 0)
        for step in range(width // 8):
            idx, xs = lanes(builder, bufp, xbp, builder.add(i_v, ir.Constant(_I64, 8 * step)), fo_v, 8)
            n_left = _pack_and_store(builder, idx, xs, th_v, bufp, lutp, lo_v, hi_v)
            total = builder.add(total, n_left)
            lo_v = builder.add(lo_v, n_left)
            hi_v = builder.sub(hi_v, builder.sub(eight, n_left))
        return total

    return sig, codegen


@intrinsic
def partition8(typingctx: Any, buf: Any, i: Any, xb: Any, fo: Any, th: Any, lo: Any, hi: Any, lut: Any) -> Any:
    """Partition the eight indices ``buf[i:i+8]`` by ``xb[fo + j] <= th``.

    Left-goers are written to ``buf[lo:lo+n]`` in order, right-goers to
    ``buf[hi-(8-n)+1:hi+1]``; returns ``n`` (uint64).  Both stores are eight lanes
    wide, so the caller must leave at least 16 free slots between ``lo`` and ``hi``
    (the junk lanes then land in slots that later lanes overwrite), and the output
    range must not overlap ``buf[i:i+8]``.
    """
    return _partition_intrinsic(buf, xb, lut, _gather_lanes, 8)


@intrinsic
def partition8_iota(typingctx: Any, buf: Any, i: Any, xb: Any, fo: Any, th: Any, lo: Any, hi: Any, lut: Any) -> Any:
    """:func:`partition8` for the indices ``i, i+1, ..., i+7`` (a tree's root).

    The indices are not read from ``buf`` and their values ``xb[fo+i : fo+i+8]``
    are one contiguous load.  Same contract on ``lo``/``hi`` as :func:`partition8`.
    """
    return _partition_intrinsic(buf, xb, lut, _iota_lanes, 8)


@intrinsic
def partition16(typingctx: Any, buf: Any, i: Any, xb: Any, fo: Any, th: Any, lo: Any, hi: Any, lut: Any) -> Any:
    """:func:`partition8` for the sixteen indices ``buf[i:i+16]``.

    One AVX-512 step where :func:`avx512_available`, else two AVX2 steps (``lut`` is
    read only then); the same output either way.  Returns the number of left-goers
    (0-16).  The stores are sixteen lanes wide: leave at least 32 free slots between
    ``lo`` and ``hi``.
    """
    return _partition_intrinsic(buf, xb, lut, _gather_lanes, 16)


@intrinsic
def partition16_iota(typingctx: Any, buf: Any, i: Any, xb: Any, fo: Any, th: Any, lo: Any, hi: Any, lut: Any) -> Any:
    """:func:`partition16` for the indices ``i, ..., i+15`` (a tree's root); see :func:`partition8_iota`."""
    return _partition_intrinsic(buf, xb, lut, _iota_lanes, 16)
