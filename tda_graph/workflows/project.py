"""Pixel-classification projects: the whole state in one HDF5 file, saved atomically.

Layout of a project file (format ``"tda-graph-project"``, :data:`FORMAT_VERSION`)::

    attrs:     format, format_version, writer
    /input     attrs: path_relative, path_absolute, inner_path, axes, channel   (all optional)
    /features  attrs: in_2d;  datasets: feature_ids (utf-8), sigmas (float64)
    /labels    LabelStore.save_h5 layout (labelled uint8 blocks and their starts, class names and colours)
    /forest    operators.kernels.forest_io layout (plain arrays)
    /enhancer  attrs: name | path_relative + path_absolute, sha256, tta (optional)

Numeric datasets carry HDF5 fletcher32 checksums (a bit flipped on disk is an error
on loading, not a silently changed label or threshold). Everything fletcher32 cannot
cover (attributes such as class names, colours, block positions and paths; string
datasets; the names, shapes and types of all objects) is covered by one SHA-256 digest
in the root attribute ``metadata_sha256``. Only numbers and strings are
stored; nothing is ever pickled, and :func:`load_project`
refuses files holding opaque, object, reference or compound data before reading them.
Saving writes a temporary file in the same folder, fsyncs it and renames it over
the target; a ``<project>.lock`` file (created exclusively) marks a save in progress.
A lock whose process is gone is stale; it is broken by an atomic rename that checks the
renamed file is still the one judged stale, so two savers never both hold the lock.
Loading never needs the lock: the file at the target is always a complete save. A load
that finds a save in progress waits a few seconds for it (to return the newest state),
then reads the previous save and warns.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from operators.enhancer import sha256_of
from operators.features import normalize_selection
from operators.file_sources import FileSource, open_image, validate_axes
from operators.kernels.forest_cpu import ForestArrays
from operators.kernels.forest_io import load_forest, save_forest
from operators.labels import LabelClass, LabelStore
from tda_graph import TdaError
from tda_graph.atomic import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EnhancerRef",
    "ProjectError",
    "ProjectLockedError",
    "ProjectSaveInProgressWarning",
    "ProjectState",
    "import_ilastik_project",
    "load_project",
    "save_project",
]

FORMAT_NAME = "tda-graph-project"
#: Version of the project layout this code writes (and the newest it reads). 2: labels in
#: LabelStore layout 2 (two datasets instead of one per block); version 1 files still load.
FORMAT_VERSION = 2


class ProjectError(TdaError, ValueError):
    """A project file cannot be written or read (corrupt, newer, unsafe, or its input is missing)."""


class ProjectLockedError(ProjectError):
    """Another process is writing the project file right now."""


class ProjectSaveInProgressWarning(UserWarning):
    """A project was loaded while another process was still saving it (the previous save was read)."""


#: Hex SHA-256 digest of a file's contents (the one implementation, in operators.enhancer).
sha256_file = sha256_of


@dataclass(frozen=True)
class EnhancerRef:
    """Which enhancer network the project uses: a bundled model name or a weights file.

    Parameters
    ----------
    name : str, optional
        Name of a bundled model (exclusive with ``path``).
    path : str, optional
        Weights file; stored relative to the project and absolute.
    sha256 : str, optional
        Hex digest of the weights file; checked on load when the file is found.
    tta : bool
        Run the enhancer with test-time augmentation (``Enhancer(tta=True)``).
    """

    name: str | None = None
    path: str | None = None
    sha256: str | None = None
    tta: bool = False

    def __post_init__(self) -> None:
        if (self.name is None) == (self.path is None):
            raise ProjectError("an enhancer reference needs exactly one of name= (bundled model) or path= (file)")
        if not isinstance(self.tta, bool):
            raise ProjectError(f"tta must be True or False, got {self.tta!r}")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ProjectError(f"sha256 must be 64 lower-case hex digits, got {self.sha256!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, tta: bool = False) -> EnhancerRef:
        """A reference to a weights file, with its digest computed now."""
        p = Path(path).resolve()
        if not p.is_file():
            raise ProjectError(f"enhancer weights file {str(p)!r} does not exist")
        return cls(path=str(p), sha256=sha256_file(p), tta=tta)


@dataclass(frozen=True)
class ProjectState:
    """Everything a pixel-classification session needs to resume.

    Parameters
    ----------
    input_path : str, optional
        Image file (or zarr folder); absolute after :func:`load_project`.
    input_inner_path : str, optional
        Dataset / array path inside it (``None`` for TIFF or a single-array file).
    axes : str, optional
        Stored axes of the input (letters of ``"tzyxc"``); ``None``: from metadata.
    selection : tuple of (str, float)
        Feature selection as ``(feature_id, sigma)`` pairs (normalised); empty: none chosen.
    in_2d : bool
        Compute features slice by slice.
    labels : LabelStore, optional
        The user's labels with class names and colours.
    forest : ForestArrays, optional
        The trained forest.
    channel : int, optional
        Label value K whose forest probability feeds the enhancer.
    enhancer : EnhancerRef, optional
        The enhancer network applied to that probability.

    Notes
    -----
    ``labels`` and ``forest`` compare by identity in ``==``; compare their
    contents (``labels.to_dense()``, the forest arrays) to check a round trip.
    """

    input_path: str | None = None
    input_inner_path: str | None = None
    axes: str | None = None
    selection: tuple[tuple[str, float], ...] = ()
    in_2d: bool = False
    labels: LabelStore | None = None
    forest: ForestArrays | None = None
    channel: int | None = None
    enhancer: EnhancerRef | None = None

    def __post_init__(self) -> None:
        if self.input_path is not None:
            object.__setattr__(self, "input_path", os.fspath(self.input_path))
        if self.selection:
            object.__setattr__(self, "selection", normalize_selection(self.selection))
        else:
            object.__setattr__(self, "selection", ())
        object.__setattr__(self, "in_2d", bool(self.in_2d))
        if self.axes is not None:
            validate_axes(self.axes, (1,) * len(self.axes), "the project input")
            object.__setattr__(self, "axes", self.axes.lower())
        if self.channel is not None:
            if isinstance(self.channel, bool) or not isinstance(self.channel, (int, np.integer)) or self.channel < 0:
                raise ProjectError(f"channel must be a non-negative integer or None, got {self.channel!r}")
            object.__setattr__(self, "channel", int(self.channel))
        if self.labels is not None and not isinstance(self.labels, LabelStore):
            raise ProjectError(f"labels must be a LabelStore, got {type(self.labels).__name__}")
        if self.forest is not None and not isinstance(self.forest, ForestArrays):
            raise ProjectError(f"forest must be ForestArrays, got {type(self.forest).__name__}")

    @property
    def input_spec(self) -> str | None:
        """``"file.h5:/dataset"`` style string for :func:`operators.file_sources.open_image`."""
        if self.input_path is None:
            return None
        return self.input_path if self.input_inner_path is None else f"{self.input_path}:{self.input_inner_path}"

    def open_input(self, *, name: str | None = None) -> FileSource:
        """Open the input image as a lazy source."""
        if self.input_spec is None:
            raise ProjectError("the project has no input image; set input_path first")
        return open_image(self.input_spec, axes=self.axes, name=name)


# -- lock -------------------------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _host() -> str:
    return os.uname().nodename if hasattr(os, "uname") else "unknown"


#: An empty lock older than this (seconds) is stale: see :func:`_lock_is_stale`.
EMPTY_LOCK_STALE_S = 10.0


def _lock_is_stale(lock: Path) -> bool:
    """True when the lock names a process of this host that no longer exists, or is empty and old."""
    try:
        raw = lock.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if not raw.strip():
        # Our locks appear with their content in one step, so an empty one was left by a crash
        # that lost the unsynced content (power loss) or by another tool; without the age check
        # a writer of an older layout (create, then write) could be overtaken.
        with contextlib.suppress(OSError):
            return time.time() - lock.stat().st_mtime > EMPTY_LOCK_STALE_S
        return False
    try:
        text = raw.split()
        pid, host = int(text[0]), text[1]
    except (ValueError, IndexError):
        return False
    if host != _host() or host == "unknown":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _locked_message(path: Path, lock: Path) -> str:
    return (
        f"project {str(path)!r} is being written by another process (lock file {str(lock)!r}); "
        "wait for the save to finish, or delete the lock file if no process is writing it"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_dead_lock_temps(lock: Path) -> None:
    # a writer killed between writing its lock temp file and linking it leaves the temp file;
    # one killed while breaking a stale lock leaves the renamed lock (".stale")
    for suffix in (".tmp", ".stale"):
        for tmp in lock.parent.glob(f".{lock.name}.*{suffix}"):
            with contextlib.suppress(ValueError, OSError):
                if not _pid_alive(int(tmp.name[len(lock.name) + 2 : -len(suffix)])):
                    tmp.unlink()


def _remove_dead_save_temps(target: Path) -> None:
    # Called with the write lock held: no other process is saving this project now, so
    # temp files of its earlier saves belong to writers that were killed mid-save.
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        if not tmp.name.startswith(f".{target.name}.lock."):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _identity(path: Path) -> tuple[int, int, str] | None:
    """Inode, device and content of a lock file (``None`` if it is gone or unreadable)."""
    try:
        st = path.stat()
        return st.st_ino, st.st_dev, path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _break_stale_lock(lock: Path, judged: tuple[int, int, str]) -> None:
    """Remove the stale lock file ``judged``, never a live lock that replaced it meanwhile.

    WHY: two savers can find the same stale lock; the first removes it and takes the
    lock, and a plain ``unlink`` by the second would then delete the first one's live
    lock, so both would write. Renaming is atomic, so exactly one saver gets the file;
    if it is not the file judged stale (other content, or another inode: inode numbers
    alone are reused at once), it goes back to where it was.
    """
    grave = lock.with_name(f".{lock.name}.{os.getpid()}.stale")
    try:
        os.replace(lock, grave)
    except FileNotFoundError:
        return  # another saver broke it first
    if _identity(grave) != judged:
        with contextlib.suppress(FileExistsError):
            os.link(grave, lock)  # a live lock: restore it (unless yet another saver holds the slot)
    with contextlib.suppress(FileNotFoundError):
        grave.unlink()


@contextlib.contextmanager
def _write_lock(path: Path) -> Iterator[None]:
    lock = _lock_path(path)
    host = _host()
    # The lock appears with its content in one step (link of a complete temp file), so a
    # writer killed at any moment leaves either no lock or one naming its (dead) process,
    # which the next save detects as stale; an empty lock file would block saving forever.
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()} {host}\n")
    try:
        for attempt in range(2):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                if attempt == 0:
                    judged = _identity(lock)  # taken first: the file judged is the one we may break
                    if judged is not None and _lock_is_stale(lock):
                        _break_stale_lock(lock, judged)
                        continue
                raise ProjectLockedError(_locked_message(path, lock)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _remove_dead_lock_temps(lock)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


# -- paths ------------------------------------------------------------------------------------------


def _relative(target: str, project_dir: Path) -> str | None:
    try:
        return os.path.relpath(Path(target).resolve(), project_dir)
    except ValueError:  # another drive on Windows
        return None


def _resolve(kind: str, rel: str | None, absolute: str | None, project_dir: Path, check: bool) -> str | None:
    """Relative to the project first, then the absolute path, then the same name next to the project."""
    candidates: list[Path] = []
    if rel:
        candidates.append((project_dir / rel).resolve())
    if absolute:
        candidates.append(Path(absolute))
    base = rel or absolute
    if base:
        candidates.append(project_dir / Path(base).name)
    for c in candidates:
        if c.exists():
            return str(c)
    if not candidates:
        return None
    if check:
        tried = ", ".join(repr(str(c)) for c in dict.fromkeys(candidates))
        raise ProjectError(
            f"the project's {kind} was not found (tried {tried}); move it back next to the project "
            f"or load with check_files=False and set a new path"
        )
    if absolute:
        return absolute
    return str((project_dir / rel).resolve()) if rel else None


# -- save -------------------------------------------------------------------------------------------


def save_project(path: str | os.PathLike[str], state: ProjectState) -> None:
    """Write ``state`` to ``path`` atomically (the previous file survives any failure).

    Parameters
    ----------
    path : str or path
        Project file (``.h5`` / ``.tdaproj``); created or replaced.
    state : ProjectState
        What to store.

    Raises
    ------
    ProjectLockedError
        If another process is saving the same project.
    ProjectError
        If the state cannot be written.
    """
    if not isinstance(state, ProjectState):
        raise ProjectError(f"save_project needs a ProjectState, got {type(state).__name__}")
    target = Path(path).absolute()
    project_dir = target.parent
    project_dir.mkdir(parents=True, exist_ok=True)
    with _write_lock(target):
        _remove_dead_save_temps(target)
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
            _write(f, state, project_dir)
            # computed from what h5py reads back, the same way load_project recomputes it
            f.attrs[DIGEST_ATTR] = _metadata_digest(f)
            f.flush()


def _write_path(g: h5py.Group, path: str, project_dir: Path) -> None:
    """Store ``path`` absolute and, when possible, relative to the project folder."""
    absolute = str(Path(path).resolve())
    g.attrs["path_absolute"] = absolute
    rel = _relative(absolute, project_dir)
    if rel is not None:
        g.attrs["path_relative"] = rel


def _write(f: h5py.File, state: ProjectState, project_dir: Path) -> None:
    from tda_graph import __version__

    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["writer"] = f"tda-graph {__version__}"
    g = f.create_group("input")
    if state.input_path is not None:
        _write_path(g, state.input_path, project_dir)
    if state.input_inner_path is not None:
        g.attrs["inner_path"] = state.input_inner_path
    if state.axes is not None:
        g.attrs["axes"] = state.axes
    if state.channel is not None:
        g.attrs["channel"] = np.int64(state.channel)
    g = f.create_group("features")
    g.attrs["in_2d"] = np.uint8(state.in_2d)
    g.create_dataset("feature_ids", data=[fid for fid, _ in state.selection], dtype=h5py.string_dtype("utf-8"))
    g.create_dataset("sigmas", data=np.asarray([s for _, s in state.selection], dtype=np.float64), fletcher32=True)
    if state.labels is not None:
        state.labels.save_h5(f.create_group("labels"))
    if state.forest is not None:
        save_forest(f.create_group("forest"), state.forest)
    if state.enhancer is not None:
        e = state.enhancer
        g = f.create_group("enhancer")
        if e.name is not None:
            g.attrs["name"] = e.name
        if e.path is not None:
            _write_path(g, e.path, project_dir)
        if e.sha256 is not None:
            g.attrs["sha256"] = e.sha256
        if e.tta:  # absent = off, so projects without it read the same in older versions
            g.attrs["tta"] = np.uint8(1)


# -- metadata digest --------------------------------------------------------------------------------

#: Root attribute holding the SHA-256 of everything fletcher32 does not cover.
DIGEST_ATTR = "metadata_sha256"


def _canonical(value: Any) -> bytes:
    """Bytes of an attribute or string-dataset value that do not depend on how h5py returns it."""
    if isinstance(value, (str, bytes)):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return b"t%d:" % len(raw) + raw
    arr = np.asarray(value)
    if arr.dtype.kind in "OSU":
        # strings come back as str or bytes depending on the h5py version and object kind
        return b"a%r:" % (arr.shape,) + b"".join(_canonical(v) for v in arr.ravel().tolist())
    arr = np.ascontiguousarray(arr)
    return b"n%s%r:" % (arr.dtype.str.encode(), arr.shape) + arr.tobytes()


def _metadata_digest(f: h5py.File) -> str:
    """SHA-256 of all names, attributes, dataset shapes and types, and string datasets of ``f``."""
    h = hashlib.sha256()
    names: list[str] = []
    f.visit(names.append)
    for name in ["", *sorted(names)]:
        # low-level handles and reads: the high-level ones cost ~0.5 ms per label block
        oid = h5py.h5o.open(f.id, name.encode("utf-8")) if name else f.id
        h.update(b"\0object\0" + name.encode("utf-8"))
        attrs: dict[str, Any] = {}
        for j in range(h5py.h5a.get_num_attrs(oid)):
            a = h5py.h5a.open(oid, index=j)
            key = a.name.decode("utf-8")
            if not name and key == DIGEST_ATTR:
                continue
            dt, shape = a.dtype, a.shape
            if dt.kind in "biuf" and dt.subdtype is None and shape is not None:
                value = np.empty(shape, dt)
                a.read(value)
                attrs[key] = value
            else:  # strings and the like: h5py's own conversions
                attrs[key] = (f[name] if name else f).attrs[key]
        for key in sorted(attrs):
            h.update(b"\0attr\0" + key.encode("utf-8") + b"\0" + _canonical(attrs[key]))
        if isinstance(oid, h5py.h5d.DatasetID):
            dt = oid.dtype
            h.update(b"\0dataset\0" + dt.str.encode() + repr(oid.shape).encode())
            if h5py.check_string_dtype(dt) is not None:
                h.update(_canonical(f[name][()]))
    return h.hexdigest()


def _verify_metadata(f: h5py.File, target: Path) -> None:
    if DIGEST_ATTR not in f.attrs:
        return  # written before the digest existed
    stored = _text(f.attrs[DIGEST_ATTR])
    if _metadata_digest(f) != stored:
        raise ProjectError(
            f"project {str(target)!r} is corrupt: its metadata (attributes such as class names, colours, "
            "block positions or paths) does not match the stored checksum, so it was damaged on disk or edited "
            "outside tda-graph; restore it from a backup, or pass verify_metadata=False to load_project to "
            "open it anyway"
        )


# -- load -------------------------------------------------------------------------------------------

_ALLOWED_KINDS = "biuf"


def _unsafe(dtype: np.dtype) -> str | None:
    """Why ``dtype`` may not appear in a project file (``None`` if it may)."""
    if h5py.check_string_dtype(dtype) is not None:
        return None
    if dtype.fields is not None:
        return "compound"
    if h5py.check_vlen_dtype(dtype) is not None:
        return "variable-length non-string"
    if h5py.check_ref_dtype(dtype) is not None:
        return "reference"
    if dtype.kind == "V":
        return "opaque (possibly pickled)"
    if dtype.kind == "O":
        return "object"
    if dtype.kind not in _ALLOWED_KINDS and dtype.kind != "S":
        return f"unsupported ({dtype})"
    if dtype.subdtype is not None:
        return "array-typed"
    return None


def _check_safe(f: h5py.File) -> None:
    problems: list[str] = []

    def check_attrs(obj: Any, name: str) -> None:
        for key in obj.attrs:
            why = _unsafe(obj.attrs.get_id(key).dtype)
            if why:
                problems.append(f"attribute {key!r} of {name!r} ({why} data)")

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            why = _unsafe(obj.dtype)
            if why:
                problems.append(f"dataset {'/' + name!r} ({why} data)")
        check_attrs(obj, "/" + name)

    check_attrs(f, "/")
    f.visititems(visit)
    if problems:
        raise ProjectError(
            f"project {f.filename!r} holds data a tda-graph project never contains: {'; '.join(problems[:5])}; "
            "refusing to load it (only numbers and strings are read, nothing is unpickled)"
        )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


def _wait_for_save(target: Path, wait: float) -> bool:
    """Poll the lock of ``target`` for up to ``wait`` seconds; True if a live save still holds it."""
    lock = _lock_path(target)
    deadline = time.monotonic() + max(0.0, wait)
    while lock.exists() and not _lock_is_stale(lock):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


def load_project(
    path: str | os.PathLike[str], *, check_files: bool = True, verify_metadata: bool = True, wait: float = 5.0
) -> ProjectState:
    """Read a project written by :func:`save_project`.

    Parameters
    ----------
    path : str or path
        The project file.
    check_files : bool
        Resolve the input image and enhancer file (relative to the project first,
        then the stored absolute path, then next to the project) and raise if they
        are missing or the enhancer's checksum differs. ``False``: keep the stored
        paths as they are.
    verify_metadata : bool
        Check the attributes, names and string datasets against the file's
        ``metadata_sha256`` digest (files written before the digest existed are
        not checked). ``False`` opens a file edited by hand; numeric datasets are
        always checked (fletcher32).
    wait : float
        If another process is saving the project, wait up to this many seconds
        for the save to finish so that the newest state is read. Saves replace the
        file atomically, so after the wait the previous complete save is read, with
        a :class:`ProjectSaveInProgressWarning`.

    Raises
    ------
    ProjectLockedError
        If the project is being written for the first time (no earlier save to read)
        and the save did not finish within ``wait`` seconds.
    ProjectError
        If the file is missing, corrupt, not a project, written by a newer
        version, holds unsafe (opaque/object) data, or its files are missing.
    """
    target = Path(path).absolute()
    # WHY no refusal: a save renames a complete temp file over the target, so the target is
    # always a whole project; refusing loads during a save only made readers (a batch job, a
    # second viewer) fail whenever an autosave happened to run.
    if _wait_for_save(target, wait):
        lock = _lock_path(target)
        if not target.exists():
            raise ProjectLockedError(
                f"project {str(target)!r} is being saved for the first time by another process "
                f"(lock file {str(lock)!r}) and has no earlier save to read; try again when the save "
                "has finished, or delete the lock file if no process is writing it"
            )
        warnings.warn(
            f"project {str(target)!r} is being saved by another process (lock file {str(lock)!r}); "
            f"read its previous save. Load it again after the save to get the newest state.",
            ProjectSaveInProgressWarning,
            stacklevel=2,
        )
    if not target.is_file():
        raise ProjectError(f"project file {str(target)!r} does not exist; check the path")
    try:
        f = h5py.File(target, "r")
    except OSError as e:
        raise ProjectError(
            f"project file {str(target)!r} is corrupt or truncated (not a readable HDF5 file: {e}); "
            "restore it from a backup"
        ) from e
    try:
        with f:
            return _load_open(f, target, check_files, verify_metadata)
    except ProjectError:
        raise
    except (TdaError, KeyError, ValueError, TypeError, OSError, RuntimeError, IndexError) as e:
        # h5py raises OSError / KeyError / RuntimeError on truncated or damaged internals; damaged
        # attributes reach LabelStore / ProjectState as bad shapes or axes (SpecError, LabelError)
        why = str(e)
        if isinstance(e, OSError) and "filter returned failure" in why:
            # fletcher32 (or the compressor's own check) found data that changed on disk
            why = f"a stored checksum does not match its data, so the file was damaged on disk ({why})"
        raise ProjectError(f"project {str(target)!r} is corrupt: {why}; restore it from a backup") from e


def _load_open(f: h5py.File, target: Path, check_files: bool, verify_metadata: bool = True) -> ProjectState:
    fmt = _text(f.attrs.get("format", ""))
    if fmt != FORMAT_NAME:
        raise ProjectError(f"{str(target)!r} is not a tda-graph project (format attribute {fmt!r})")
    try:
        version = int(f.attrs["format_version"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProjectError(f"project {str(target)!r} lacks a valid format_version attribute") from e
    if version > FORMAT_VERSION:
        raise ProjectError(
            f"project {str(target)!r} was written by a newer tda-graph (format version {version}; "
            f"this version reads up to {FORMAT_VERSION}); upgrade tda-graph to open it"
        )
    if version < 1:
        raise ProjectError(f"project {str(target)!r} has an invalid format version {version}")
    _check_safe(f)
    if verify_metadata:
        _verify_metadata(f, target)
    return _read(f, target.parent, check_files)


def _read(f: h5py.File, project_dir: Path, check_files: bool) -> ProjectState:
    g = f["input"]
    a = g.attrs
    input_path = _resolve(
        "input image",
        _text(a["path_relative"]) if "path_relative" in a else None,
        _text(a["path_absolute"]) if "path_absolute" in a else None,
        project_dir,
        check_files,
    )
    inner = _text(a["inner_path"]) if "inner_path" in a else None
    axes = _text(a["axes"]) if "axes" in a else None
    channel = int(a["channel"]) if "channel" in a else None
    feats = f["features"]
    ids = [_text(v) for v in feats["feature_ids"][()]]
    sigmas = [float(v) for v in feats["sigmas"][()]]
    if len(ids) != len(sigmas):
        raise ProjectError(f"feature_ids ({len(ids)}) and sigmas ({len(sigmas)}) differ in length")
    in_2d = bool(feats.attrs.get("in_2d", 0))
    labels = LabelStore.load_h5(f["labels"]) if "labels" in f else None
    forest = load_forest(f["forest"]) if "forest" in f else None
    enhancer = None
    if "enhancer" in f:
        e = f["enhancer"].attrs
        sha = _text(e["sha256"]) if "sha256" in e else None
        tta = bool(e.get("tta", 0))
        if "name" in e:
            enhancer = EnhancerRef(name=_text(e["name"]), sha256=sha, tta=tta)
        else:
            epath = _resolve(
                "enhancer weights file",
                _text(e["path_relative"]) if "path_relative" in e else None,
                _text(e["path_absolute"]) if "path_absolute" in e else None,
                project_dir,
                check_files,
            )
            if check_files and sha is not None and epath is not None and sha256_file(epath) != sha:
                raise ProjectError(
                    f"enhancer weights file {epath!r} does not match the project's checksum "
                    f"(sha256 {sha}); restore the original file or set the enhancer again"
                )
            enhancer = EnhancerRef(path=epath, sha256=sha, tta=tta)
    return ProjectState(
        input_path=input_path,
        input_inner_path=inner,
        axes=axes,
        selection=tuple(zip(ids, sigmas)),
        in_2d=in_2d,
        labels=labels,
        forest=forest,
        channel=channel,
        enhancer=enhancer,
    )


# -- ilastik ----------------------------------------------------------------------------------------

_BLOCK_SLICE = re.compile(r"^\[(.*)\]$")


def _parse_block_slice(text: str) -> list[tuple[int, int]]:
    m = _BLOCK_SLICE.match(text.strip())
    if m is None:
        raise ProjectError(f"cannot parse ilastik blockSlice {text!r}")
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition(":")
        out.append((int(lo), int(hi)))
    return out


def import_ilastik_project(path: str | os.PathLike[str]) -> ProjectState:
    """Read the input reference, feature selection and labels of an ilastik pixel-classification ``.ilp``.

    The trained vigra forest is not imported (retrain from the labels). Nothing
    is unpickled: only the plain datasets are read.

    Parameters
    ----------
    path : str or path
        The ``.ilp`` file.

    Raises
    ------
    ProjectError
        If the file is not an ilastik pixel-classification project or a part is malformed.
    """
    p = Path(path).absolute()
    if not p.is_file():
        raise ProjectError(f"ilastik project {str(p)!r} does not exist; check the path")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ProjectError(f"{str(p)!r} is not a readable ilastik project (HDF5): {e}") from e
    with f:
        try:
            return _read_ilp(f, p)
        except ProjectError:
            raise
        except (TdaError, KeyError, ValueError, TypeError, OSError, RuntimeError, IndexError) as e:
            # h5py raises OSError / RuntimeError on damaged internals; IndexError on short arrays
            raise ProjectError(f"ilastik project {str(p)!r} is malformed or unsupported: {e}") from e


def _ilp_axes(text: str | None) -> str | None:
    import json

    if text is None:
        return None
    try:
        keys = [a["key"] for a in json.loads(text)["axes"]]
    except (ValueError, KeyError, TypeError):
        return None
    return "".join(keys) if all(k in "tzyxc" for k in keys) else None


def _read_ilp(f: h5py.File, p: Path) -> ProjectState:
    workflow = _text(f["workflowName"][()]) if "workflowName" in f else ""
    if "PixelClassification" not in f or "FeatureSelections" not in f:
        raise ProjectError(f"{str(p)!r} is not an ilastik Pixel Classification project (workflow {workflow!r})")
    fs = f["FeatureSelections"]
    ids = [_text(v) for v in fs["FeatureIds"][()]]
    scales = [float(v) for v in fs["Scales"][()]]
    matrix = np.asarray(fs["SelectionMatrix"][()], bool)
    selected = [(ids[i], scales[j]) for i, j in zip(*np.nonzero(matrix))]
    in_2d = False
    if "ComputeIn2d" in fs:
        flags = np.asarray(fs["ComputeIn2d"][()], bool)
        cols = sorted({int(j) for j in np.nonzero(matrix)[1]})
        in_2d = bool(cols) and bool(flags[cols].all())
    # Input image of lane 0.
    input_path = inner = axes = None
    shape: tuple[int, ...] | None = None
    info_group = f.get("Input Data/infos/lane0000/Raw Data")
    if info_group is not None:
        location = _text(info_group["location"][()]) if "location" in info_group else ""
        file_path = _text(info_group["filePath"][()]) if "filePath" in info_group else None
        axes = _ilp_axes(_text(info_group["axistags"][()]) if "axistags" in info_group else None)
        if "shape" in info_group:
            shape = tuple(int(n) for n in info_group["shape"][()])
        if location == "ProjectInternal":
            input_path = str(p)
            inner = _text(info_group["inner_path"][()]) if "inner_path" in info_group else file_path
        elif file_path is not None:
            m = re.match(r"^(.*?\.(?:h5|hdf5|hdf|n5|zarr|ilp))(/.*)?$", file_path, re.IGNORECASE)
            fp, inner = (m.group(1), m.group(2)) if m else (file_path, None)
            input_path = str((p.parent / fp).resolve()) if not os.path.isabs(fp) else fp
    # Labels.
    pc = f["PixelClassification"]
    names = [_text(v) for v in pc["LabelNames"][()]] if "LabelNames" in pc else []
    colors = np.asarray(pc["LabelColors"][()]).reshape(-1, 3) if "LabelColors" in pc else np.zeros((0, 3))
    labels = None
    if names:
        classes = [
            LabelClass(n, tuple(int(min(max(c, 0), 255)) for c in colors[i]) if i < len(colors) else (255, 0, 0))
            for i, n in enumerate(names)
        ]
        if shape is None or axes is None:
            raise ProjectError("the ilastik project has labels but no input shape/axistags to place them")
        spatial_idx = [i for i, a in enumerate(axes) if a in "zyx"]
        spatial_axes = "".join(axes[i] for i in spatial_idx)
        spatial_shape = tuple(shape[i] for i in spatial_idx)
        labels = LabelStore(spatial_shape, spatial_axes, classes)
        sets = pc.get("LabelSets/labels000")
        for key in sorted(sets) if sets is not None else []:
            ds = sets[key]
            bounds = _parse_block_slice(_text(ds.attrs["blockSlice"]))
            if len(bounds) != len(axes):
                raise ProjectError(f"label block {ds.name!r} has {len(bounds)} axes, the image {len(axes)}")
            data = np.asarray(ds[()])
            # Drop non-spatial axes (ilastik keeps a singleton channel axis).
            index = tuple(slice(None) if a in "zyx" else 0 for a in axes)
            block = data[index]
            start = tuple(bounds[i][0] for i in spatial_idx)
            _merge_labels(labels, block, start)
    return ProjectState(
        input_path=input_path,
        input_inner_path=inner,
        axes=axes,
        selection=tuple(selected),
        in_2d=in_2d,
        labels=labels,
    )


def _merge_labels(store: LabelStore, block: np.ndarray, start: tuple[int, ...]) -> None:
    """Add an ilastik label block (0 = unlabelled) without erasing labels already there."""
    from tda_graph import Roi

    roi = Roi(start, tuple(s + n for s, n in zip(start, block.shape)))
    current = store.compute(roi, {})
    merged = np.where(block > 0, block, current).astype(np.uint8)
    store.load_dense(merged, offset=start)
