"""Enhancer networks from the BioImage Model Zoo, run in-process and tile by tile.

:func:`load_enhancer_model` reads a bioimage.io model package (a folder, its
``bioimageio.yaml``, a ``.zip``, or a zoo id / URL that is downloaded once into
a cache folder) and digests what tiling needs from its description: input and
output axes, valid input sizes (``min + n * step``), the output halo and the
output channel names. :class:`Enhancer` is a cached operator whose cache block
*is* one tile core: every block is grown by the model's halo, rounded up to a
valid input size, reflect-padded at image borders, run through
bioimageio.core's prediction pipeline (pre- and postprocessing included) and
cropped back to the core. A change of the input therefore re-runs only the
tiles whose core plus halo it touches.

Normalisation statistics
------------------------
Models such as ``unet2d_nuclei_broad`` normalise their input with per-sample
statistics (``zero_mean_unit_variance`` over ``x, y``). Run tile by tile, each
tile is its own sample, so its statistics differ slightly from the whole
image's. :class:`Enhancer` offers both behaviours (setting ``statistics``):

``"tile"`` (default)
    bioimageio.core computes the statistics on each (padded) tile. The
    operator stays purely regional: an input change dirties only the tiles it
    touches. Use it for enhancers whose input is a probability map in
    ``[0, 1]`` (a forest output), where the tile statistics differ little and
    ROI-precise updates matter most during interactive labelling.
``"image"``
    The statistics the model asks for are computed once by bioimageio.core's
    own calculators over the whole input (per z slice for a 2D model on 3D
    data) and handed to every tile's ``Sample``; the normalisation itself still
    runs inside bioimageio.core. Tiled results then equal a whole-image
    prediction away from the image borders, but the input becomes a global
    dependency: any change dirties the whole output. Models whose
    postprocessing needs sample statistics, or that need dataset statistics,
    are rejected in this mode.

Trust
-----
Only ``torchscript`` and ``onnx`` weights are used unless ``allow_code=True``
is given: ``pytorch_state_dict`` weights import Python code shipped in the
package (and the TensorFlow / Keras formats can run code too). Downloads are
verified against the sha256 hashes the package declares before they enter the
cache. See ``docs/safety.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import posixpath
import re
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tda_graph import ArraySpec, InputSlot, Operator, PrepareContext, Roi, SettingsError, SpecError, TdaError, Window

from .kernels import tiling
from .kernels.tta import predict_augmented

__all__ = ["Enhancer", "EnhancerModel", "ModelError", "load_enhancer_model", "default_model_cache"]

_SPATIAL = ("z", "y", "x")


class ModelError(TdaError, ValueError):
    """A model cannot be found, loaded or described, or it failed or misbehaved on a tile."""


def default_model_cache() -> Path:
    """Folder where downloaded zoo models are kept: ``$TDA_GRAPH_MODEL_CACHE`` or ``~/.cache/tda-graph/models``."""
    env = os.environ.get("TDA_GRAPH_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tda-graph" / "models"


# ================================================================== loading
def _looks_local(source: str) -> bool:
    """Whether a source that does not exist was meant as a local path (not a zoo id or URL)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        return False
    return "/" in source or os.sep in source or source.endswith((".zip", ".yaml", ".yml")) or source.startswith("~")


def _cache_name(source: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.rstrip("/").rsplit("/", 1)[-1])[:60] or "model"
    return f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:10]}.zip"


#: Weights formats that run no Python code from the package (loaded without ``allow_code``), in order of preference.
SAFE_WEIGHTS = ("torchscript", "onnx")
#: Every weights format this module knows, in the order tried: safe formats first, so that a package with
#: torchscript *and* ``pytorch_state_dict`` weights never runs its architecture code.
WEIGHTS_ORDER = (
    *SAFE_WEIGHTS,
    "pytorch_state_dict",
    "tensorflow_saved_model_bundle",
    "keras_v3",
    "keras_hdf5",
)


def _download_package(source: str, dest: Path) -> None:
    """Download zoo id or URL ``source`` as a package zip to ``dest`` (bioimageio.spec; network)."""
    from bioimageio.spec import save_bioimageio_package

    save_bioimageio_package(source, output_path=dest)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_yaml(text: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:  # bioimageio.spec brings ruyaml
        from ruyaml import YAML

        return YAML(typ="safe", pure=True).load(text)


def _declared_files(description: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """``(what, source, sha256)`` of every weights file (and architecture source) a raw description declares."""
    out: list[tuple[str, str, str | None]] = []
    weights = description.get("weights") if isinstance(description, Mapping) else None
    if not isinstance(weights, Mapping) or not weights:
        raise ModelError("the package description declares no weights")
    for fmt, entry in weights.items():
        if not isinstance(entry, Mapping):
            continue
        if "source" in entry:
            out.append((f"{fmt} weights", str(entry["source"]), entry.get("sha256")))
        arch = entry.get("architecture")
        if isinstance(arch, Mapping) and "source" in arch:
            out.append((f"{fmt} architecture source", str(arch["source"]), arch.get("sha256")))
    return out


def verify_package_zip(path: str | os.PathLike[str], *, source: str, sha256: str | None = None) -> None:
    """Check a downloaded package zip against the hashes it declares (and ``sha256`` of the zip itself).

    Every weights file (and the architecture source of ``pytorch_state_dict``
    weights) listed under ``weights`` in the package's ``bioimageio.yaml`` /
    ``rdf.yaml`` must be inside the zip and match its declared ``sha256``.

    Raises
    ------
    ModelError
        Naming the file, the expected and the actual hash, on any mismatch; or
        when a file is missing or declares no hash.
    """
    path = Path(path)
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise ModelError(
                f"downloaded package of model {source!r} does not match its sha256: expected {sha256.lower()}, "
                f"got {actual}; the download was corrupted or tampered with, it was deleted"
            )
    if not zipfile.is_zipfile(path):
        raise ModelError(f"downloaded package of model {source!r} is not a valid zip file; it was deleted")
    check_zip_package(path)
    with zipfile.ZipFile(path) as zf:
        names = {posixpath.normpath(n): n for n in zf.namelist()}
        rdf = next((names[n] for n in ("bioimageio.yaml", "rdf.yaml") if n in names), None)
        if rdf is None:
            raise ModelError(f"downloaded package of model {source!r} has no bioimageio.yaml; it was deleted")
        try:
            description = _safe_yaml(zf.read(rdf).decode("utf-8"))
        except Exception as e:
            raise ModelError(f"downloaded package of model {source!r}: unreadable {rdf} ({e}); it was deleted") from e
        for what, src, expected in _declared_files(description):
            if not expected:
                raise ModelError(
                    f"downloaded model {source!r}: its {what} {src!r} declares no sha256, so the download cannot be "
                    "verified; it was deleted (download the package yourself and pass its local path)"
                )
            member = names.get(posixpath.normpath(src.replace("\\", "/")))
            if member is None:
                raise ModelError(f"downloaded package of model {source!r} lacks its {what} {src!r}; it was deleted")
            h = hashlib.sha256()
            with zf.open(member) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != str(expected).lower():
                raise ModelError(
                    f"downloaded model {source!r}: {what} {src!r} does not match the sha256 its description declares "
                    f"(expected {str(expected).lower()}, got {h.hexdigest()}); the download was corrupted or "
                    "tampered with, it was deleted"
                )


def _fetch_to_cache(source: str, cache_dir: Path, offline: bool, sha256: str | None = None) -> Path:
    """A cached package for zoo id or URL ``source``, downloading (and verifying) it when needed.

    The download goes to a uniquely named temporary file in ``cache_dir``; it is
    checked with :func:`verify_package_zip` and only then renamed to its cache
    name, so a partial, corrupt or tampered download never lands in the cache.
    """
    target = cache_dir / _cache_name(source)
    if target.is_file():
        if sha256 is not None and sha256_of(target) != sha256.lower():
            raise ModelError(
                f"cached package {target} of model {source!r} does not match the sha256 given "
                f"(expected {sha256.lower()}, got {sha256_of(target)}); delete it to download again"
            )
        return target
    how = (
        f"download the model package (.zip) on a machine with network access (e.g. from https://bioimage.io) "
        f"and pass its local path, or put it at {target}"
    )
    if offline:
        raise ModelError(f"model {source!r} is not cached in {cache_dir} and downloads are disabled (offline); {how}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".part.zip", dir=cache_dir)
        os.close(fd)
    except OSError as e:
        raise ModelError(f"cannot write to the model cache {cache_dir} ({e}); set $TDA_GRAPH_MODEL_CACHE") from e
    part = Path(tmp_name)
    try:
        try:
            _download_package(source, part)
        except Exception as e:
            raise ModelError(f"could not download model {source!r} ({type(e).__name__}: {e}); {how}") from e
        verify_package_zip(part, source=source, sha256=sha256)
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return target


#: Limits on model package zips (checked before anything is extracted).
MAX_ZIP_BYTES = 4 << 30  # total uncompressed size
MAX_ZIP_RATIO = 200  # uncompressed / compressed, per member (zip bombs reach 1000s)
MAX_ZIP_MEMBERS = 10_000


def check_zip_package(path: str | os.PathLike[str]) -> None:
    """Refuse a model ``.zip`` whose members could escape the extraction folder or that unpacks to huge sizes.

    Raises
    ------
    ModelError
        On absolute paths or ``..`` components ("zip slip"), symbolic links, too
        many members, or sizes / compression ratios above the limits above.
    """
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise ModelError(f"{path} has {len(infos)} members (limit {MAX_ZIP_MEMBERS}); refusing to unpack it")
        total = 0
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p]
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise ModelError(
                    f"{path} contains the member {info.filename!r}, which would be written outside the "
                    "extraction folder (zip slip); refusing this package"
                )
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ModelError(f"{path} contains a symbolic link {info.filename!r}; refusing this package")
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO and info.file_size > 1 << 20:
                raise ModelError(
                    f"{path}: member {info.filename!r} expands {info.file_size / info.compress_size:.0f}-fold "
                    f"(limit {MAX_ZIP_RATIO}); refusing a possible zip bomb"
                )
        if total > MAX_ZIP_BYTES:
            raise ModelError(f"{path} unpacks to {total} bytes (limit {MAX_ZIP_BYTES}); refusing to unpack it")


def load_enhancer_model(
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    allow_code: bool = False,
    sha256: str | None = None,
) -> EnhancerModel:
    """Load and digest a bioimage.io model for use by :class:`Enhancer`.

    Parameters
    ----------
    source : str or path
        A model folder (containing ``bioimageio.yaml`` or ``rdf.yaml``), the yaml
        file itself, a local ``.zip`` package, or a zoo id / URL that is
        downloaded once (weights checked against their declared sha256).
    cache_dir : path, optional
        Where zoo ids and URLs are downloaded once (default
        :func:`default_model_cache`).
    offline : bool, optional
        Never download (default: ``$TDA_GRAPH_OFFLINE`` set to a non-empty value).
    allow_code : bool
        Allow weights that run Python code shipped in the package
        (``pytorch_state_dict``: its architecture source is imported; also the
        TensorFlow / Keras formats). Off by default: only ``torchscript`` and
        ``onnx`` weights are used, and a package with no such weights is
        refused. Only pass ``True`` for packages you trust.
    sha256 : str, optional
        Expected hex SHA-256 of the package ``.zip`` (a download, a cached
        download or a local zip).

    Returns
    -------
    EnhancerModel

    Raises
    ------
    ModelError
        If the file is missing, not a valid package, offline with an uncached
        id, a download does not match its hashes, the package needs
        ``allow_code``, or the model does not fit tiled inference (unsupported
        axes, output resampling, ...).
    """
    src = os.fspath(source)
    path = Path(src).expanduser()
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ModelError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if path.exists():
        if path.is_dir():
            if not any((path / n).is_file() for n in ("bioimageio.yaml", "rdf.yaml")):
                raise ModelError(
                    f"model folder {path} has no bioimageio.yaml (or rdf.yaml); pass the folder of an unpacked "
                    "bioimage.io model package, its yaml file, or the package .zip"
                )
        elif path.suffix.lower() == ".zip":
            if not zipfile.is_zipfile(path):
                raise ModelError(
                    f"{path} is not a valid zip file (truncated or corrupt download?); download the model package again"
                )
            check_zip_package(path)
        if sha256 is not None:
            actual = sha256_of(path) if path.is_file() else None
            if actual != sha256.lower():
                raise ModelError(f"{path} does not match the sha256 given (expected {sha256.lower()}, got {actual})")
        local: Path = path
    elif _looks_local(src):
        raise ModelError(
            f"model file not found: {path}; pass an existing model folder, its bioimageio.yaml, a .zip package, "
            "or a bioimage.io model id"
        )
    else:
        if offline is None:
            offline = bool(os.environ.get("TDA_GRAPH_OFFLINE"))
        local = _fetch_to_cache(src, Path(cache_dir) if cache_dir else default_model_cache(), offline, sha256)
    try:
        from bioimageio.core import load_model_description

        descr = load_model_description(local, format_version="latest")
    except Exception as e:
        raise ModelError(f"could not load a bioimage.io model from {local}: {type(e).__name__}: {e}") from e
    return EnhancerModel(descr, source=str(local), allow_code=allow_code)


def _size_of(size: Any, what: str) -> tuple[int, int]:
    from bioimageio.spec.model import v0_5

    if isinstance(size, int):
        return size, 0
    if isinstance(size, v0_5.ParameterizedSize):
        return int(size.min), int(size.step)
    raise ModelError(f"{what} has a size {size!r} that tiled inference does not support (need fixed or min + n*step)")


class EnhancerModel:
    """A loaded bioimage.io model and the facts tiled inference needs.

    Create with :func:`load_enhancer_model`. Prediction pipelines are created
    lazily, once per device / statistics mode / weights format, and shared by
    all operators using this model.

    Attributes
    ----------
    name, source : str
        Model name and where it was loaded from.
    axes : str
        The model's spatial axes (``"yx"`` or ``"zyx"``).
    in_channels : int
        Input channels the model expects.
    min_size, step, halo : tuple of int
        Per spatial axis: valid input sizes ``min + n * step`` and the output halo.
    channel_names : tuple of str
        Names of the output channels.
    weights_formats : tuple of str
        Weights formats the package declares.
    usable_formats : tuple of str
        Those this model may run, in the order tried: ``torchscript`` and
        ``onnx``, then (only with ``allow_code``) formats that run code from
        the package, such as ``pytorch_state_dict``.
    allow_code : bool
        Whether code-running weights formats may be used.
    """

    def __init__(self, description: Any, *, source: str, allow_code: bool = False) -> None:
        from bioimageio.spec.model import v0_5

        if not isinstance(description, v0_5.ModelDescr):
            raise ModelError(f"model from {source} has format {description.format_version}; need a 0.5 model")
        self.description = description
        self.source = source
        self.name = str(description.name)
        if len(description.inputs) != 1:
            raise ModelError(f"model {self.name!r} has {len(description.inputs)} inputs; an enhancer needs exactly one")
        inp, out = description.inputs[0], description.outputs[0]
        self.input_id, self.output_id = str(inp.id), str(out.id)
        self._in_axes = tuple(str(a.id) for a in inp.axes)
        self._out_axes = tuple(str(a.id) for a in out.axes)
        spatial: list[str] = []
        mins: list[int] = []
        steps: list[int] = []
        self.in_channels = 1
        for a in inp.axes:
            if isinstance(a, v0_5.BatchAxis):
                continue
            if isinstance(a, v0_5.ChannelAxis):
                self.in_channels = len(a.channel_names)
            elif isinstance(a, v0_5.SpaceInputAxis) and str(a.id) in _SPATIAL:
                spatial.append(str(a.id))
                m, s = _size_of(a.size, f"input axis {a.id!r} of model {self.name!r}")
                mins.append(m)
                steps.append(s)
            else:
                raise ModelError(
                    f"model {self.name!r}: input axis {a.id!r} ({a.type}) is not supported (only b, c, z, y, x)"
                )
        self.axes = "".join(sorted(spatial, key=_SPATIAL.index))
        if not self.axes:
            raise ModelError(f"model {self.name!r} has no spatial input axis")
        order = [spatial.index(a) for a in self.axes]
        self.min_size = tuple(mins[i] for i in order)
        self.step = tuple(steps[i] for i in order)
        halo = {a: 0 for a in self.axes}
        self.channel_names: tuple[str, ...] = ("channel 0",)
        for a in out.axes:
            if isinstance(a, v0_5.BatchAxis):
                continue
            if isinstance(a, v0_5.ChannelAxis):
                self.channel_names = tuple(str(n) for n in a.channel_names)
            elif isinstance(a, (v0_5.SpaceOutputAxis, v0_5.SpaceOutputAxisWithHalo)) and str(a.id) in halo:
                if getattr(a, "scale", 1.0) != 1.0:
                    raise ModelError(f"model {self.name!r} rescales axis {a.id!r}; resampling models are not supported")
                size = a.size
                if isinstance(size, v0_5.SizeReference):
                    if str(size.axis_id) != str(a.id) or size.offset != 0:
                        raise ModelError(f"model {self.name!r}: output axis {a.id!r} is not the input size")
                elif not (isinstance(size, int) and self.step[self.axes.index(str(a.id))] == 0):
                    raise ModelError(f"model {self.name!r}: output axis {a.id!r} has size {size!r}, not the input's")
                halo[str(a.id)] = int(getattr(a, "halo", 0) or 0)
            else:
                raise ModelError(f"model {self.name!r}: output axis {a.id!r} ({a.type}) is not supported")
        self.halo = tuple(halo[a] for a in self.axes)
        self.weights_formats = tuple(f for f in WEIGHTS_ORDER if getattr(description.weights, f, None) is not None)
        self.allow_code = bool(allow_code)
        self.usable_formats = tuple(f for f in self.weights_formats if allow_code or f in SAFE_WEIGHTS)
        if not self.usable_formats:
            raise ModelError(
                f"model {self.name!r} has only {' and '.join(self.weights_formats) or 'no'} weights, which run "
                "Python code from the package; pass allow_code=True (command line: --allow-code) if you trust it"
            )
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()  # one tile at a time per model (the backends use all cores)
        self._pipelines: dict[tuple[str, str, str | None], Any] = {}

    def __copy__(self) -> EnhancerModel:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> EnhancerModel:
        """A loaded model is a shared, read-only resource: copies are the same object."""
        return self

    def __repr__(self) -> str:
        return f"EnhancerModel({self.name!r}, axes={self.axes!r}, halo={self.halo}, channels={self.channel_names})"

    # -- geometry ------------------------------------------------------------------------
    def tile_shape(self, tile: Sequence[int] | None = None, halo: Sequence[int] | None = None) -> tuple[int, ...]:
        """A valid input tile shape (per spatial axis) for a requested one.

        ``None`` picks a tile whose core (kept part, the tile minus ``halo``
        on both sides; default the model's halo) is about 256 pixels per axis
        in 2D and 64 in 3D, or the fixed size of fixed-size axes.
        """
        halo = self.halo if halo is None else tuple(halo)
        base = 256 if len(self.axes) == 2 else 64
        want = [base + 2 * h for h in halo] if tile is None else list(tile)
        if len(want) != len(self.axes):
            raise SettingsError(f"tile {tuple(want)} needs one size per model axis {self.axes!r}")
        out = []
        for a, n, m, s, h in zip(self.axes, want, self.min_size, self.step, halo):
            size = tiling.valid_size(int(n), m, s) if s or n <= m else m
            if size - 2 * h < 1:
                raise SettingsError(f"tile size {size} along {a!r} keeps nothing of model {self.name!r} (halo {h})")
            out.append(size)
        return tuple(out)

    # -- statistics -----------------------------------------------------------------------
    def valid_size(self, axis: int, size: int) -> bool:
        """Whether ``size`` is a valid input size along model axis ``axis`` (``min + n * step``)."""
        lo, step = self.min_size[axis], self.step[axis]
        return size >= lo and (size == lo if step == 0 else (size - lo) % step == 0)

    def turnable(self, shape: Sequence[int]) -> bool:
        """Whether an input of spatial ``shape``, turned by 90° in its last two axes, is still valid."""
        n = len(self.axes)
        return n >= 2 and self.valid_size(n - 2, int(shape[-1])) and self.valid_size(n - 1, int(shape[-2]))

    def measures(self) -> tuple[set[Any], set[Any]]:
        """The statistics (bioimageio measures) the model's pre- and postprocessing need."""
        from bioimageio.core.proc_setup import get_requried_measures

        req = get_requried_measures(self.description)
        return set(req.pre), set(req.post)

    def check_image_statistics(self) -> None:
        """Raise :class:`ModelError` if the model cannot use whole-image statistics."""
        pre, post = self.measures()
        bad = [m for m in pre if m.scope != "sample"] + list(post)
        if bad:
            raise ModelError(
                f"model {self.name!r} needs statistics {sorted(str(m) for m in bad)} that whole-image mode cannot "
                "supply (dataset statistics or output statistics); use statistics='tile'"
            )

    def image_statistics(self, image: np.ndarray) -> dict[Any, Any]:
        """The sample statistics of ``image`` (``(c, *axes)``) as bioimageio.core computes them."""
        from bioimageio.core import compute_sample_measures

        pre, _ = self.measures()
        return dict(compute_sample_measures(pre, self._sample(image, {})))

    # -- prediction -------------------------------------------------------------------------
    def check_weights_format(self, weights_format: str | None) -> None:
        """Raise :class:`ModelError` unless ``weights_format`` (``None``: any) may be used with this model."""
        if weights_format is None:
            return
        if weights_format not in self.weights_formats:
            raise ModelError(
                f"model {self.name!r} has no {weights_format!r} weights; it has {list(self.weights_formats)}"
            )
        if weights_format not in self.usable_formats:
            raise ModelError(
                f"model {self.name!r}: {weights_format} weights run Python code from the package; load it with "
                "allow_code=True (command line: --allow-code) if you trust it"
            )

    def pipeline(self, device: str = "cpu", statistics: str = "tile", weights_format: str | None = None) -> Any:
        """The (shared, loaded) bioimageio.core prediction pipeline for these options.

        ``weights_format=None`` tries :attr:`usable_formats` in order (torchscript
        and onnx first), so code from the package runs only when ``allow_code``
        was given and no safe format could be set up.
        """
        self.check_weights_format(weights_format)
        key = (device, statistics, weights_format)
        with self._lock:
            pp = self._pipelines.get(key)
            if pp is not None:
                return pp
            from bioimageio.core import create_prediction_pipeline

            fixed: dict[Any, Any] = {}
            if statistics == "image":
                self.check_image_statistics()
                # Present but dropped by bioimageio.core (sample scope): no per-tile statistics are
                # computed, every tile's Sample carries the whole-image values instead.
                fixed = {m: 0.0 for m in self.measures()[0]}
            errors: list[str] = []
            first: Exception | None = None
            for fmt in (weights_format,) if weights_format else self.usable_formats:
                try:
                    # always one explicit format: bioimageio.core's own default order tries
                    # pytorch_state_dict (architecture code from the package) first
                    pp = create_prediction_pipeline(
                        self.description, devices=[device], weights_format=fmt, fixed_dataset_statistics=fixed
                    )
                    pp.load()
                    break
                except Exception as e:
                    first = first or e
                    errors.append(f"{fmt}: {type(e).__name__}: {e}")
            else:
                raise ModelError(
                    f"could not set up model {self.name!r} ({self.source}) on device {device!r} "
                    f"(weights tried: {'; '.join(errors)})"
                ) from first
            self._pipelines[key] = pp
            return pp

    def _sample(self, image: np.ndarray, stat: Mapping[Any, Any]) -> Any:
        from bioimageio.core import Sample, Tensor

        dims = ["batch", "channel", *self.axes]
        arr = image[None]
        keep = [d for d in dims if d in self._in_axes]
        if "channel" not in self._in_axes:
            arr = arr[:, 0]
        if "batch" not in self._in_axes:
            arr = arr[0]
        perm = [keep.index(d) for d in self._in_axes]
        t = Tensor.from_numpy(np.ascontiguousarray(np.transpose(arr, perm)), dims=self._in_axes)
        return Sample(members={self.input_id: t}, stat=dict(stat), id="tile")

    def predict(
        self,
        image: np.ndarray,
        *,
        device: str = "cpu",
        statistics: str = "tile",
        stat: Mapping[Any, Any] | None = None,
        weights_format: str | None = None,
    ) -> np.ndarray:
        """Run the model with its pre- and postprocessing on one valid-sized input.

        Parameters
        ----------
        image : numpy.ndarray
            ``(c, *axes)``, each spatial size valid for the model.
        stat : mapping, optional
            Precomputed sample statistics (``statistics="image"``).

        Returns
        -------
        numpy.ndarray
            ``(n_output_channels, *axes)`` float32, halo not cropped.
        """
        pp = self.pipeline(device, statistics, weights_format)
        sample = self._sample(np.asarray(image, dtype=np.float32), stat or {})
        with self._run_lock:
            out = pp.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
        t = out.members[self.output_id]
        data = t.data
        order = [d for d in ("batch", "channel", *self.axes) if d in data.dims]
        arr = np.asarray(data.transpose(*order).values)
        if "batch" in order:
            arr = arr[0]
        if "channel" not in order:
            arr = arr[None]
        return arr.astype(np.float32, copy=False)


# ================================================================== operator
@dataclass(frozen=True)
class EnhancerSettings:
    """Settings of :class:`Enhancer`.

    Parameters
    ----------
    model : EnhancerModel or str or path
        The model, or anything :func:`load_enhancer_model` accepts.
    device : str
        ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``. CUDA falls back to
        the CPU with a warning when torch sees no GPU.
    tile : int or tuple of int, optional
        Requested input tile size per model axis (rounded up to a valid size;
        a fixed-size axis always uses its fixed size); default: a core of about
        256² (2D) or 64³ (3D). Keep the core a multiple of the network's
        downsampling factor so all tiles share one pooling grid.
    statistics : {"tile", "image"}
        Where per-sample normalisation statistics come from (module docstring).
    weights_format : str, optional
        Force a weights format (``"torchscript"``, ``"onnx"``, ...).
    margin : int or tuple of int
        Extra context per side beyond the model's declared output halo. The
        declared halo of some networks is smaller than their receptive field;
        a margin makes tiles agree with whole-image predictions more closely
        (keep ``halo + margin`` a multiple of the network's downsampling
        factor). The operator's halo is ``model halo + margin``.
    allow_code : bool
        Passed to :func:`load_enhancer_model` when ``model`` is a path or id:
        allow weights that run Python code from the package
        (``pytorch_state_dict``). Default ``False``.
    tta : bool
        Test-time augmentation: run each tile flipped and turned (8 ways in 2D, 16 in
        3D; flips only, 4 or 8, where the turned tile is not a valid input) and average
        the outputs turned back (:func:`operators.kernels.tta.predict_augmented`).
        That many times slower; on the bundled mitochondria enhancer 0.005-0.025
        higher IoU. Default ``False``.
    """

    model: Any = None
    device: str = "cpu"
    tile: int | tuple[int, ...] | None = None
    statistics: str = "tile"
    weights_format: str | None = None
    margin: int | tuple[int, ...] = 0
    allow_code: bool = False
    tta: bool = False

    def __post_init__(self) -> None:
        if self.model is None:
            raise SettingsError("Enhancer needs a model: Enhancer(model='path/to/model.zip' or an EnhancerModel)")
        if not isinstance(self.model, EnhancerModel):
            object.__setattr__(self, "model", load_enhancer_model(self.model, allow_code=bool(self.allow_code)))
        if not (isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device)):
            raise SettingsError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.tta, bool):
            raise SettingsError(f"tta must be True or False, got {self.tta!r}")
        if self.statistics not in ("tile", "image"):
            raise SettingsError(f"statistics must be 'tile' or 'image', got {self.statistics!r}")
        if self.statistics == "image":
            self.model.check_image_statistics()
        if self.tile is not None:
            tile = (self.tile,) * len(self.model.axes) if isinstance(self.tile, int) else tuple(self.tile)
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in tile):
                raise SettingsError(f"tile must be positive integers, got {self.tile!r}")
            object.__setattr__(self, "tile", tile)
        margin = (self.margin,) * len(self.model.axes) if isinstance(self.margin, int) else tuple(self.margin)
        if len(margin) != len(self.model.axes) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in margin
        ):
            raise SettingsError(f"margin must be one integer >= 0 or one per model axis, got {self.margin!r}")
        object.__setattr__(self, "margin", margin)
        try:
            self.model.check_weights_format(self.weights_format)
        except ModelError as e:
            raise SettingsError(str(e)) from None


def _resolve_device(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            warnings.warn(
                f"device {device!r} requested but torch sees no CUDA device; running on the CPU", stacklevel=3
            )
            return "cpu"
    return device


class Enhancer(Operator):
    """A bioimage.io model applied tile by tile (float32, input spatial axes + ``c``).

    Input ``image``: ``yx``/``yxc`` for 2D models, and also ``zyx``/``zyxc``
    (a 2D model then runs per z slice; a 3D model on the volume). Its channel
    count must match the model's input. The output has the model's output
    channels, named as in the model description.

    The cache grid is the tile core (the valid tile size minus ``halo + margin``
    on both sides; one z slice for 2D models on 3D data). A request or a change
    is aligned to that grid, so each block is computed from exactly one model
    call and an input change dirties exactly the tiles whose core plus context
    it touches (with ``statistics="image"``: everything). A model that raises,
    or returns a wrong shape or non-finite values, raises :class:`ModelError`
    naming the model and the tile; nothing is cached for that tile.

    Parameters
    ----------
    model : EnhancerModel or str or path
        See :class:`EnhancerSettings`; the other keyword settings (``device``,
        ``tile``, ``statistics``, ``weights_format``, ``margin``) are
        documented there.
    name : str, optional
        Label used in messages and statistics.

    Notes
    -----
    Measured with ``unet2d_nuclei_broad`` (fixed 512² input, declared halo 32):
    with ``statistics="image"`` and ``margin=32`` the tiled result equals the
    whole-image prediction bit for bit farther than 64 px from the image
    border; with ``margin=0`` the seams differ by up to 2.4e-3 because the
    U-Net's receptive field exceeds its declared halo. With
    ``statistics="tile"`` this model's per-tile ``zero_mean_unit_variance``
    changes the output substantially on sparse images (up to 0.6); that mode
    is meant for enhancers fed with probability maps.

    Attributes
    ----------
    tiles_run : int
        Number of tiles run (cumulative): one model call each, or one per
        orientation with ``tta``.
    """

    inputs = (InputSlot("image", axes=("yx", "yxc", "zyx", "zyxc"), dtype_kinds="biuf"),)
    Settings = EnhancerSettings
    cached = True

    def __init__(self, model: Any = None, **kw: Any) -> None:
        super().__init__(model=model, **kw)
        self._lock = threading.Lock()
        self._token = 0
        self._stats: dict[int, dict[Any, Any]] | None = None
        self._stats_token = -1
        self.tiles_run = 0

    @property
    def model(self) -> EnhancerModel:
        return self.settings.model

    @property
    def context(self) -> tuple[int, ...]:
        """Context read around each tile core per model axis: the model's halo plus ``margin``."""
        m = self.model
        margin = self.settings.margin
        return tuple(h + margin[i] for i, h in enumerate(m.halo))

    # -- geometry --------------------------------------------------------------------------
    def _core(self, spec: ArraySpec) -> tuple[int, ...]:
        """Tile core per spatial axis of ``spec`` (1 along z for a 2D model on 3D data)."""
        m = self.model
        tile = m.tile_shape(self.settings.tile, self.context)
        core = {a: tiling.core_size(t, h) for a, t, h in zip(m.axes, tile, self.context)}
        return tuple(core.get(a, 1) for a in spec.spatial_axes)

    def output_spec(self, inputs: Mapping[str, ArraySpec]) -> ArraySpec:
        src = inputs["image"]
        m = self.model
        if len(m.axes) > len(src.spatial_axes) or not set(m.axes) <= set(src.spatial_axes):
            raise SpecError(f"model {m.name!r} works on {m.axes!r} data; the input has axes {src.axes!r}")
        if src.n_channels != m.in_channels:
            raise SpecError(
                f"model {m.name!r} expects {m.in_channels} input channel(s), the input has {src.n_channels}"
            )
        spatial = tuple(n for a, n in zip(src.axes, src.shape) if a != "c")
        nc = len(m.channel_names)
        block = self._core(src) + (nc,)
        return ArraySpec(spatial + (nc,), np.float32, src.spatial_axes + "c", m.channel_names, block_shape=block)

    def halo(self, name: str, spec: ArraySpec) -> Mapping[str, int]:
        return dict(zip(self.model.axes, self.context))

    def _align(self, roi: Roi, in_spec: ArraySpec) -> Roi:
        core = self._core(in_spec)
        n = len(core)
        spatial = Roi(roi.start[:n], roi.stop[:n]).align(core, in_spec.shape[:n])
        return Roi(spatial.start + roi.start[n:], spatial.stop + roi.stop[n:])

    def input_roi(self, name: str, roi: Roi, out_spec: ArraySpec, in_spec: ArraySpec) -> Roi:
        """Whole tiles: the request aligned to the tile grid, channels whole."""
        return self._align(super().input_roi(name, roi, out_spec, in_spec), in_spec)

    def output_region(self, name: str, roi: Roi, in_spec: ArraySpec, out_spec: ArraySpec) -> Roi:
        """Whole tiles touched by a (halo-grown) change; everything with whole-image statistics."""
        if self.settings.statistics == "image":
            return Roi.full(out_spec.shape)
        base = super().output_region(name, roi, in_spec, out_spec)
        core = self._core(in_spec) + (out_spec.shape[-1],)
        return base.align(core, out_spec.shape)

    def settings_dirty(self, old: Any, new: Any, spec: ArraySpec) -> Roi | None:
        with self._lock:
            self._token += 1
            self._stats = None
        same_result = (
            old.model is new.model
            and old.tile == new.tile
            and old.statistics == new.statistics
            and old.weights_format == new.weights_format
            and old.margin == new.margin
        )
        return None if same_result else Roi.full(spec.shape)

    # -- whole-image statistics ---------------------------------------------------------------
    def input_changed(self, name: str, rois: tuple[Roi, ...]) -> None:
        with self._lock:
            self._token += 1

    def is_prepared(self) -> bool:
        if self.settings.statistics != "image":
            return True
        with self._lock:
            return self._stats is not None and self._stats_token == self._token

    def prepare(self, context: PrepareContext) -> None:
        if self.settings.statistics != "image":
            return
        with self._lock:
            if self._stats is not None and self._stats_token == self._token:
                return
            token = self._token
        src = self.graph.inputs_of(self)["image"]
        spec = src.spec
        data = np.asarray(context.request(src, Roi.full(spec.shape)), dtype=np.float32)
        if "c" not in spec.axes:
            data = data[..., None]
        data = np.moveaxis(data, -1, 0)  # (c, [z,] y, x)
        m = self.model
        stats: dict[int, dict[Any, Any]] = {}
        if len(m.axes) < len(spec.spatial_axes):  # 2D model on zyx: statistics per slice
            for z in range(data.shape[1]):
                stats[z] = m.image_statistics(data[:, z])
        else:
            stats[0] = m.image_statistics(data)
        with self._lock:
            self._stats = stats
            self._stats_token = token

    # -- compute ----------------------------------------------------------------------------
    def compute(self, roi: Roi, inputs: Mapping[str, Window]) -> np.ndarray:
        w = inputs["image"]
        spec = self.spec
        m = self.model
        s = self.settings
        device = _resolve_device(s.device)
        spatial = spec.spatial_axes
        n = len(spatial)
        shape = spec.shape[:n]
        in_axes = w.axes
        has_c = "c" in in_axes
        core = self._core(spec)
        ctx = self.context
        tile = m.tile_shape(s.tile, ctx)
        slicewise = len(m.axes) < n
        stats = self._stats if s.statistics == "image" else None
        out = np.empty(roi.shape[:n] + (len(m.channel_names),), np.float32)
        grids = [tiling.grid_starts(roi.start[i], roi.stop[i], core[i]) for i in range(n)]
        for starts in itertools.product(*grids):
            block = Roi(starts, tuple(min(a + c, sz) for a, c, sz in zip(starts, core, shape)))
            want0, want1 = [], []
            for i, a in enumerate(spatial):
                if a in m.axes:
                    j = m.axes.index(a)
                    lo, hi = tiling.tile_input_range(block.start[i], block.stop[i], ctx[j], m.min_size[j], m.step[j])
                    if hi - lo < tile[j]:  # keep the chosen tile size (a valid size) for every tile
                        hi = lo + tile[j]
                else:
                    lo, hi = block.start[i], block.stop[i]
                want0.append(lo)
                want1.append(hi)
            nc_in = w.data.shape[-1] if has_c else 0
            data = tiling.read_padded(
                w.data, w.roi.start, want0 + ([0] if has_c else []), want1 + ([nc_in] if has_c else [])
            )
            data = np.moveaxis(data, -1, 0) if has_c else data[None]
            if slicewise:
                data = data[:, 0]
            where = f"tile {block!r} of {self.label} (model input range {list(zip(want0, want1))})"
            key = block.start[0] if slicewise else 0
            stat = None
            if stats is not None:
                if key not in stats:
                    raise ModelError(f"no whole-image statistics for {where}; request again")
                stat = stats[key]
            try:

                def run(x: np.ndarray, stat: Any = stat) -> np.ndarray:
                    return m.predict(
                        x, device=device, statistics=s.statistics, stat=stat, weights_format=s.weights_format
                    )

                if s.tta:
                    res = predict_augmented(run, data, n_spatial=len(m.axes), rotations=m.turnable(data.shape[1:]))
                else:
                    res = run(data)
                with self._lock:
                    self.tiles_run += 1
            except ModelError as e:
                raise ModelError(f"model {m.name!r} failed on {where}: {e}") from e
            except Exception as e:
                raise ModelError(f"model {m.name!r} failed on {where}: {type(e).__name__}: {e}") from e
            expect = (len(m.channel_names),) + data.shape[1:]
            if res.shape != expect:
                raise ModelError(f"model {m.name!r} returned shape {res.shape} on {where}; expected {expect}")
            if not np.all(np.isfinite(res)):
                bad = int(np.size(res) - np.count_nonzero(np.isfinite(res)))
                raise ModelError(f"model {m.name!r} returned {bad} NaN/inf values on {where}")
            # crop the halo: core of this block, in model axes
            sl = []
            for i, a in enumerate(spatial):
                if a in m.axes:
                    h = ctx[m.axes.index(a)]
                    sl.append(slice(h, h + block.shape[i]))
            kept = np.moveaxis(res[(slice(None), *sl)], 0, -1)
            if slicewise:
                kept = kept[None]
            inter = block.intersection(Roi(roi.start[:n], roi.stop[:n]))
            assert inter is not None
            out[inter.relative_to(Roi(roi.start[:n], roi.stop[:n]))] = kept[inter.relative_to(block)]
        return out[..., roi.start[-1] : roi.stop[-1]]
