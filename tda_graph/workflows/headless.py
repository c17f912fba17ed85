"""Headless training and blockwise, resumable batch prediction (``tda train`` / ``tda predict``).

Prediction writes each finished block as its own file (temp file + rename)
into ``<output>.tda-partial/``; a re-run skips the blocks already there, so a
killed run resumes and never takes a half-written block as finished. When
every block is done, the result is assembled block by block into the final
file, again via a temporary file and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators import ClassifierNotReady
from operators.file_sources import open_image, parse_image_spec
from tda_graph import Operator, Roi, SpecError, TdaError
from tda_graph.atomic import atomic_path
from tda_graph.roi import block_roi

from .pixel_classification import TrainableDomainAdaptation
from .project import EnhancerRef, ProjectState, load_project, save_project


def enhancer_ref(model: str, *, allow_code: bool = False, tta: bool = False) -> EnhancerRef:
    """A project reference to a bundled enhancer name, a package folder, a yaml or a ``.zip``; checked by loading.

    ``allow_code`` permits packages whose weights run Python code from the package
    (``pytorch_state_dict``). The permission is not stored in the project: every
    ``predict`` has to be given it again. ``tta`` (test-time augmentation) is stored.
    """
    return _load_enhancer(model, allow_code=allow_code, tta=tta)[0]


def _load_enhancer(model: str, *, allow_code: bool, tta: bool) -> tuple[EnhancerRef, Any]:
    """:func:`enhancer_ref` and the loaded :class:`~operators.enhancer.EnhancerModel` it was checked with."""
    from operators.enhancer import load_enhancer_model
    from tda_graph.models import bundled_enhancers

    bundled = bundled_enhancers()
    if model in bundled:
        return EnhancerRef(name=model, tta=tta), load_enhancer_model(str(bundled[model]), allow_code=allow_code)
    p = Path(model)
    if not p.exists():
        names = ", ".join(bundled) or "none"
        raise BatchError(
            f"enhancer {model!r} is neither a bundled enhancer ({names}) nor an existing package folder, yaml or .zip"
        )
    loaded = load_enhancer_model(str(p), allow_code=allow_code)  # a package that fails to load fails now
    return EnhancerRef.from_file(p / "bioimageio.yaml" if p.is_dir() else p, tta=tta), loaded


def enhancer_source(ref: EnhancerRef) -> str:
    """What :func:`operators.enhancer.load_enhancer_model` should open for a project's enhancer.

    A project names a bundled enhancer or an existing local file; anything else
    (a zoo id or URL written into a crafted project) is refused, so opening a
    project never downloads a model.
    """
    from tda_graph.models import bundled_enhancer

    if ref.name is not None:
        try:
            return str(bundled_enhancer(ref.name))
        except KeyError as e:
            raise BatchError(f"the project's enhancer: {e.args[0]}; set the enhancer again with --enhancer") from None
    if ref.path is None or not Path(ref.path).is_file():
        raise BatchError(
            f"the project's enhancer file {ref.path!r} does not exist; a project refers to local model files only "
            "(move the package back or train again with --enhancer)"
        )
    return str(ref.path)


def check_output_location(out_path: str | os.PathLike[str], inner: str | None, *work: Path) -> None:
    """Refuse outputs that would make writes land outside the location the user gave.

    ``inner`` (the dataset / array name inside the output) may not contain
    ``.`` / ``..`` parts or a drive letter; the output itself and the work folders next
    to it (``<output>.tda-partial``, ``<output>.tda-done``) may not be symbolic
    links, whose targets could lie anywhere.

    Raises
    ------
    BatchError
        Naming the offending path and what to give instead.
    """
    if inner is not None:
        parts = inner.replace("\\", "/").split("/")
        if inner.startswith("\\") or any(p in (".", "..") for p in parts) or re.match(r"^[A-Za-z]:", inner):
            raise BatchError(
                f"output dataset name {inner!r} has '.' or '..' parts; give a plain name such as 'data' or '/probs'"
            )
    for p in (Path(out_path), *work):
        if p.is_symlink():
            raise BatchError(
                f"{str(p)!r} is a symbolic link; refusing to write through it (its target could be anywhere); "
                "remove the link or choose another output path"
            )


EXPORTS = ("probabilities", "segmentation", "uncertainty", "features", "enhanced")


class BatchError(TdaError, ValueError):
    """Headless training or batch prediction cannot proceed (bad input, mismatch)."""


# -- training -----------------------------------------------------------------------------------
def _sparse_label_blocks(lab_src: Operator, labels: str) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Read a label image block by block, keeping only blocks that hold labels.

    Returns ``(spatial start, uint8 block)`` pairs. Sparse labels of a large volume
    then cost memory for the labelled blocks only, not for the whole image.
    """
    spec = lab_src.output_spec({})
    grid = spec.default_block_shape()
    spatial = [i for i, a in enumerate(spec.axes) if a != "c"]
    parts: list[tuple[tuple[int, ...], np.ndarray]] = []
    for idx in Roi.full(spec.shape).block_indices(grid):
        broi = block_roi(idx, grid, spec.shape)
        blk = np.asarray(lab_src.compute(broi, {}))
        if not np.issubdtype(blk.dtype, np.integer):
            raise BatchError(f"labels {labels!r} must hold integers 0..255 (0 = unlabelled), got {blk.dtype}")
        if not blk.any():
            continue
        lo, hi = int(blk.min()), int(blk.max())
        if lo < 0 or hi > 255:
            raise BatchError(
                f"labels {labels!r} must hold integers 0..255 (0 = unlabelled), found {lo if lo < 0 else hi} "
                f"in block {broi}"
            )
        shape = tuple(broi.shape[i] for i in spatial)
        parts.append((tuple(broi.start[i] for i in spatial), blk.reshape(shape).astype(np.uint8)))
    return parts


def train_project(
    image: str,
    labels: str,
    project: str | os.PathLike[str],
    *,
    axes: str | None = None,
    features: str = "default",
    in_2d: bool = False,
    channel: int | None = None,
    n_trees: int = 100,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    enhancer: str | None = None,
    allow_code: bool = False,
    tta: bool = False,
) -> ProjectState:
    """Train a forest from an image and a sparse label image and save a project.

    Parameters
    ----------
    image, labels : str
        ``"file.h5:/dataset"``, ``"file.zarr[:array]"`` or ``"file.tif"``. Labels:
        0 = unlabelled, 1..K = classes, same spatial shape as the image.
    project : path
        Project file to write (atomically).
    channel : int, optional
        Label value whose probability feeds the enhancer (default: K).
    enhancer : str, optional
        Bundled enhancer name, package folder, ``bioimageio.yaml`` or ``.zip``.
    allow_code : bool
        Accept an enhancer package whose only weights run Python code from the
        package (``pytorch_state_dict``); not stored in the project.
    tta : bool
        Run the enhancer with test-time augmentation (8x slower, slightly better);
        stored in the project, used by ``predict``.
    """
    from operators import LabelStore

    if tta and not enhancer:
        raise BatchError("tta needs an enhancer: add --enhancer NAME_OR_PATH (or drop --tta)")
    ref, model = _load_enhancer(enhancer, allow_code=allow_code, tta=tta) if enhancer else (None, None)
    src = open_image(image, axes=axes, name="raw")
    lab_src = open_image(labels, name="labels")
    img_spec, lab_spec = src.output_spec({}), lab_src.output_spec({})
    spatial = img_spec.spatial_shape
    lab_shape = lab_spec.spatial_shape
    if lab_spec.n_channels != 1:
        raise BatchError(f"the label image {labels!r} has {lab_spec.n_channels} channels; give a single-channel image")
    if lab_shape != spatial:
        raise BatchError(
            f"the label image {labels!r} has shape {lab_shape} but the image {image!r} has spatial shape {spatial}; "
            "give labels of the same size as the image"
        )
    parts = _sparse_label_blocks(lab_src, labels)
    k = max((int(blk.max()) for _, blk in parts), default=0)
    if k == 0:
        raise BatchError(f"the label image {labels!r} is empty (all 0); paint at least two classes (values 1 and 2)")
    names = tuple(class_names) if class_names else tuple(f"class {i}" for i in range(1, max(k, 2) + 1))
    if len(names) < k:
        raise BatchError(f"labels use value {k} but only {len(names)} class names were given")
    wf = TrainableDomainAdaptation(
        src, selection=features, in_2d=in_2d, class_names=names, n_trees=n_trees, seed=seed, channel=channel
    )
    try:
        store: LabelStore = wf.labels
        with wf.graph.batch():  # one dirty event for all blocks
            for start, blk in parts:
                store.load_dense(blk, offset=start)
        try:
            wf.graph.request(wf.probabilities, Roi((0,) * (len(spatial) + 1), (1,) * (len(spatial) + 1)))
        except ClassifierNotReady as e:
            raise BatchError(f"cannot train from {labels!r}: {e}") from None
        # an enhancer that cannot take this image (a 3D model on 2D data) fails now, not at predict time
        if model is not None:
            try:
                wf.set_enhancer(model, allow_code=allow_code, tta=tta)
            except SpecError as e:
                raise BatchError(f"enhancer {enhancer!r} does not fit the image {image!r}: {e}") from None
        path, inner, _ = parse_image_spec(image)
        state = ProjectState(
            input_path=str(Path(path).resolve()),
            input_inner_path=inner,
            axes=axes,
            selection=wf.features.settings.selection,
            in_2d=in_2d,
            labels=store,
            forest=wf.probabilities.forest,
            channel=wf.channel,
            enhancer=ref,
        )
        save_project(project, state)
        return state
    finally:
        wf.close()


# -- prediction -----------------------------------------------------------------------------------
def parse_roi(text: str | None, shape: Sequence[int]) -> Roi:
    """``"0:10,100:612,100:612"`` (spatial axes, numpy slice syntax; empty parts = whole axis) → Roi."""
    if not text:
        return Roi.full(tuple(shape))
    parts = text.split(",")
    if len(parts) != len(shape):
        raise BatchError(f"--roi {text!r} has {len(parts)} parts but the input has {len(shape)} spatial axes")
    start, stop = [], []
    for p, n in zip(parts, shape):
        sl = p.strip().split(":")
        try:
            a = int(sl[0]) if sl[0] else 0
            b = int(sl[1]) if len(sl) > 1 and sl[1] else n
        except ValueError:
            raise BatchError(f"--roi {text!r}: {p!r} is not 'start:stop'") from None
        a, b = a + n if a < 0 else a, b + n if b < 0 else b
        if not 0 <= a < b <= n:
            raise BatchError(f"--roi {text!r}: {p!r} is empty or outside 0:{n}")
        start.append(a)
        stop.append(b)
    return Roi(tuple(start), tuple(stop))


def feature_halo(wf: TrainableDomainAdaptation) -> int:
    """Context the features read around a block: ceil(3.5·σ_max) plus the structure tensor's margin."""
    return int(np.ceil(3.5 * max(s for _, s in wf.features.settings.selection))) + 2


def choose_block(ndim: int, n_channels: int, halo: int, memory: int | None, *, in_2d: bool = False) -> tuple[int, ...]:
    """Largest block whose working set fits ``memory``.

    2D: a square side, power of two ≤ 512. 3D: a cube side ≤ 128. 3D with features
    computed per slice (``in_2d``): a side ≤ 256 in y and x, which the per-slice feature
    blocks (256²) tile exactly, so no two batch blocks compute the same feature block
    (WHY: with cubic 128³ blocks, neighbouring blocks on different workers both computed
    the 256² feature tiles they share); z as deep as memory allows, at most 2·64³ voxels
    (small enough that the last blocks of a run keep every worker busy).
    """
    budget = memory if memory else 1 << 30
    per_voxel = (n_channels + 8) * 4 * 3  # features + temporaries + probabilities, with slack
    if in_2d and ndim == 3:
        for s in (256, 128, 64, 32, 16):
            plane = (s + 2 * halo) ** 2 * per_voxel
            if plane <= budget:
                return (max(1, min(budget // plane, 2 * 64**3 // s**2)), s, s)
        raise BatchError(f"--memory {budget} bytes is too small for even 16x16-pixel blocks; allow more memory")
    sides = (512, 256, 128, 64, 32) if ndim == 2 else (128, 96, 64, 48, 32, 16)
    for s in sides:
        if (s + 2 * halo) ** ndim * per_voxel <= budget:
            return (s,) * ndim
    raise BatchError(f"--memory {budget} bytes is too small for even {sides[-1]}-voxel blocks; allow more memory")


@dataclass
class _Job:
    wf: TrainableDomainAdaptation
    op: Operator
    n_out: int | None  # channels of the output, None for no channel axis
    dtype: np.dtype


def _build(
    state: ProjectState,
    input_spec: str,
    axes: str | None,
    export: str,
    workers: int | None,
    *,
    allow_code: bool = False,
) -> _Job:
    if export not in EXPORTS:
        raise BatchError(f"unknown --export {export!r}; choose one of {', '.join(EXPORTS)}")
    if state.forest is None or state.labels is None:
        raise BatchError("the project holds no trained forest; run 'tda train' first")
    src = open_image(input_spec, axes=axes, name="raw")
    spatial_axes = src.output_spec({}).spatial_axes
    trained = state.labels.output_spec({}).axes
    if len(spatial_axes) != len(trained):
        raise BatchError(
            f"the project was trained on {len(trained)}D data (axes {trained!r}) but {input_spec!r} has spatial "
            f"axes {spatial_axes!r}; use a project trained on {len(spatial_axes)}D data"
        )
    wf = TrainableDomainAdaptation(
        src,
        selection=state.selection or "default",
        in_2d=state.in_2d,
        class_names=state.labels.class_names,
        workers=workers,
    )
    if wf.features.spec.n_channels != state.forest.n_features:
        wf.close()
        raise BatchError(
            f"the project's forest expects {state.forest.n_features} features but the input gives "
            f"{wf.features.spec.n_channels}; the input must have as many channels as the training image"
        )
    wf.probabilities.set_forest(state.forest)
    if state.channel is not None:
        wf.set_channel(state.channel)
    if export == "enhanced":
        if state.enhancer is None:
            wf.close()
            raise BatchError("the project has no enhancer; train it with 'tda train ... --enhancer NAME_OR_PATH'")
        try:
            wf.set_enhancer(enhancer_source(state.enhancer), allow_code=allow_code, tta=state.enhancer.tta)
        except TdaError:
            wf.close()
            raise
    op = wf.output(export)
    spec = op.spec
    n_out = spec.shape[-1] if spec.axes.endswith("c") else None
    return _Job(wf, op, n_out, spec.dtype)


def _blocks(roi: Roi, block: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], Roi]]:
    grid = [range(0, n, b) for n, b in zip(roi.shape, block)]
    for idx in np.ndindex(*[len(g) for g in grid]):
        start = tuple(roi.start[d] + grid[d][i] for d, i in enumerate(idx))
        stop = tuple(min(s + b, e) for s, b, e in zip(start, block, roi.stop))
        yield idx, Roi(start, stop)


def _save_npy_atomic(path: Path, data: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, data)


def predict_to_file(
    project: str | os.PathLike[str],
    input_spec: str,
    output_spec: str,
    export: str = "probabilities",
    *,
    roi: str | None = None,
    axes: str | None = None,
    memory: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
    stop_after: int | None = None,
    allow_code: bool = False,
) -> dict[str, Any]:
    """Predict ``export`` for ``input_spec`` with a saved project and write ``output_spec``.

    Output axes: the input's spatial axes, plus a trailing channel axis for
    probabilities and features. Blockwise with bounded memory and resumable
    (see the module docstring). ``stop_after`` stops after that many newly
    computed blocks (for tests of resumption); the output is then not written.
    ``allow_code`` lets ``export="enhanced"`` use an enhancer package whose only
    weights run Python code from the package (never taken from the project).

    Returns a summary: blocks total, computed now, skipped (done before).
    """
    state = load_project(project)
    job = _build(state, input_spec, axes, export, workers, allow_code=allow_code)
    wf = job.wf
    try:
        full = Roi.full(wf.raw.spec.spatial_shape)
        out_roi = parse_roi(roi, full.shape)
        block = choose_block(
            len(full.shape),
            wf.features.spec.n_channels,
            feature_halo(wf),
            memory,
            in_2d=wf.features.settings.in_2d,
        )
        if memory:
            wf.graph.set_cache_budget(max(memory // 4, 1 << 20))
        out_path, inner, kind = parse_image_spec(output_spec)
        partial = Path(out_path + ".tda-partial")
        check_output_location(out_path, inner, partial)
        meta = {
            "project_sha": hashlib.sha256(Path(project).read_bytes()).hexdigest(),
            "input": os.path.abspath(input_spec),
            "export": export,
            "roi": [list(out_roi.start), list(out_roi.stop)],
            "block": list(block),
        }
        meta_file = partial / "job.json"
        if partial.exists() and (not meta_file.exists() or json.loads(meta_file.read_text()) != meta):
            shutil.rmtree(partial)  # a different job left these blocks: start over
        partial.mkdir(parents=True, exist_ok=True)
        if not meta_file.exists():
            with atomic_path(meta_file) as tmp:
                tmp.write_text(json.dumps(meta))
        blocks = list(_blocks(out_roi, block))
        done = computed = 0
        for idx, r in blocks:
            f = partial / ("block_" + "_".join(map(str, idx)) + ".npy")
            if f.exists():
                done += 1
            else:
                if stop_after is not None and computed >= stop_after:
                    return {"blocks": len(blocks), "computed": computed, "skipped": done, "finished": False}
                req = r if job.n_out is None else Roi(r.start + (0,), r.stop + (job.n_out,))
                _save_npy_atomic(f, np.ascontiguousarray(wf.graph.request(job.op, req)))
                computed += 1
            if progress is not None:
                progress(done + computed, len(blocks))
        shape = out_roi.shape + (() if job.n_out is None else (job.n_out,))
        _assemble(partial, blocks, out_roi, out_path, inner, kind, shape, job.dtype)
        shutil.rmtree(partial)
        return {"blocks": len(blocks), "computed": computed, "skipped": done, "finished": True, "shape": shape}
    finally:
        wf.close()


def _assemble(
    partial: Path,
    blocks: list[tuple[tuple[int, ...], Roi]],
    roi: Roi,
    out_path: str,
    inner: str | None,
    kind: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
) -> None:
    target = Path(out_path)
    tmp = target.with_name(target.name + ".tmp-write")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()  # a link itself, never what it points to
    elif tmp.exists():
        shutil.rmtree(tmp)

    def pieces() -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        for idx, r in blocks:
            data = np.load(partial / ("block_" + "_".join(map(str, idx)) + ".npy"))
            local = tuple(slice(a - o, b - o) for a, b, o in zip(r.start, r.stop, roi.start))
            yield local, data

    if kind == "hdf5":
        import h5py

        if target.exists():
            shutil.copy2(target, tmp)  # keep the file's other datasets
        with h5py.File(tmp, "a") as f:
            name = inner or "data"
            if name in f:
                del f[name]
            ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=True)
            for local, data in pieces():
                ds[local] = data
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    elif kind == "zarr":
        import zarr

        chunks = tuple(min(b, n) for b, n in zip(blocks[0][1].shape, shape)) + shape[len(roi.shape) :]
        root = zarr.open_group(str(tmp), mode="w")
        arr = root.create_array(inner or "data", shape=shape, dtype=dtype, chunks=chunks)
        for local, data in pieces():
            arr[local] = data
    else:
        import tifffile

        mm = tifffile.memmap(str(tmp), shape=shape, dtype=dtype)
        for local, data in pieces():
            mm[local] = data
        mm.flush()
        del mm
    if target.exists() and target.is_dir():
        old = target.with_name(target.name + ".tmp-old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
