"""napari dock widget (npe2 plugin ``tda-graph``): paint strokes, see probabilities and the enhancer live.

The widget is a thin view over :class:`~tda_graph.workflows.pixel_classification.TrainableDomainAdaptation`:
strokes painted into a napari Labels layer go to the workflow's label store
(``paint`` / ``erase``), and the probability and enhanced layers are filled
with ``request(output, roi)`` for the *visible* region only, whenever the
workflow reports a dirty region (``subscribe``) or the view moves. Every
request, model load and project file operation runs in a worker thread
(:func:`napari.qt.threading.create_worker`); results are applied on the GUI
thread, so the viewer stays responsive while painting.

This is the only module of ``tda_graph`` that imports napari or Qt; nothing
imports it except napari (through ``napari.yaml``).
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from operators import ClassifierNotReady
from operators.kernels import feature_table as ft
from tda_graph import OperatorError, Roi, SettingsError, TdaError
from tda_graph.spec import ArraySpec
from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

if TYPE_CHECKING:  # napari.Viewer at run time; tests may pass a GUI-less ViewerModel
    from napari.components import ViewerModel

__all__ = ["TdaWidget", "make_sample_data", "output_roi", "visible_roi"]

NO_MODEL = "(no enhancer)"
LABELS_NAME = "tda labels"
ENHANCED_NAME = "tda enhanced"
PROB_PREFIX = "tda probability: "
#: A smaller default than ilastik's 24 features: enough for EM, and quick to compute live.
DEFAULT_WIDGET_SELECTION: dict[str, list[float]] = {
    "GaussianSmoothing": [0.7, 1.6, 3.5],
    "LaplacianOfGaussian": [1.6, 3.5],
    "GaussianGradientMagnitude": [1.6, 3.5],
    "HessianOfGaussianEigenvalues": [1.6, 3.5],
}
_CLASS_COLORMAPS = ("gray", "green", "magenta", "cyan", "yellow", "blue", "red")


# -- pure helpers (no Qt) ------------------------------------------------------------------------


def make_sample_data() -> list[tuple[np.ndarray, dict[str, Any]]]:
    """npe2 sample data: a 512×512 synthetic EM-like image (membranes, mitochondria)."""
    from operators.kernels.synthetic import em_like

    return [(em_like((512, 512), seed=0).raw, {"name": "synthetic EM"})]


def _axes_of(layer: Image) -> str:
    """Axes of an image layer's data as the engine names them."""
    ndim = layer.ndim
    if layer.rgb:
        if ndim != 2:
            raise SettingsError(f"RGB images must be 2D, layer {layer.name!r} has {ndim} spatial axes")
        return "yxc"
    axes = {2: "yx", 3: "zyx"}.get(ndim)
    if axes is None:
        raise SettingsError(f"layer {layer.name!r} has {ndim} axes; the widget handles 2D (yx) and 3D (zyx) images")
    return axes


def visible_roi(layer: Image | Labels, viewer: ViewerModel, shape: Sequence[int]) -> Roi:
    """The region of ``layer`` the viewer shows now, in data coordinates (spatial axes only).

    Displayed axes come from ``layer.corner_pixels`` (set by the canvas on each
    draw); an axis whose corners were never set (no canvas yet, or a GUI-less
    viewer model) counts as wholly visible. Axes not displayed are the current
    slice; in 3D display the whole volume is visible.
    """
    ndim = len(shape)
    if viewer.dims.ndisplay == 3:
        return Roi((0,) * ndim, tuple(shape))
    corners = np.asarray(layer.corner_pixels, dtype=np.int64)[:, :ndim]
    displayed = {d - (viewer.dims.ndim - ndim) for d in viewer.dims.displayed}
    point = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)[-ndim:]
    start, stop = [], []
    for d, n in enumerate(shape):
        if d in displayed:
            lo, hi = int(corners[0, d]), int(corners[1, d]) + 1
            if hi - lo <= 1:  # never drawn: corners are still zero
                lo, hi = 0, n
        else:
            lo = int(np.clip(np.round(point[d]), 0, n - 1))
            hi = lo + 1
        lo = int(np.clip(lo, 0, n - 1))
        stop.append(int(np.clip(hi, lo + 1, n)))
        start.append(lo)
    return Roi(tuple(start), tuple(stop))


def output_roi(spec: ArraySpec, view: Roi) -> Roi:
    """``view`` (spatial) extended to an output's axes: whole channel axis."""
    start, stop, k = [], [], 0
    for a, n in zip(spec.axes, spec.shape):
        if a == "c":
            start.append(0)
            stop.append(n)
        else:
            start.append(view.start[k])
            stop.append(view.stop[k])
            k += 1
    return Roi(tuple(start), tuple(stop))


def _slices_to_roi(key: Sequence[slice], shape: Sequence[int]) -> Roi:
    start = [0 if s.start is None else int(s.start) for s in key]
    stop = [n if s.stop is None else int(s.stop) for s, n in zip(key, shape)]
    return Roi(tuple(start), tuple(stop))


def stroke_regions(atoms: Iterable[Any], shape: Sequence[int]) -> list[tuple[Roi, np.ndarray]]:
    """The regions a napari ``Labels.events.paint`` payload changed: ``[(roi, mask), ...]``.

    Handles both history atom kinds: napari's mask-based ``_MaskedPaintAtom``
    (``slice_key``, ``mask``, ...; brush, fill, polygon) and the fancy-index
    ``(indices, old_values, new_values)`` tuple of ``Labels.data_setitem``.
    """
    regions = []
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            roi = _slices_to_roi(atom.slice_key, shape)
            mask = np.ones(roi.shape, bool) if atom.mask is None else np.asarray(atom.mask, bool)
        else:
            idx = tuple(np.asarray(i, dtype=np.int64).ravel() for i in atom[0])
            if not idx or idx[0].size == 0:
                continue
            lo = tuple(int(i.min()) for i in idx)
            roi = Roi(lo, tuple(int(i.max()) + 1 for i in idx))
            mask = np.zeros(roi.shape, bool)
            mask[tuple(i - o for i, o in zip(idx, lo))] = True
        if mask.any():
            regions.append((roi, mask))
    return regions


def follow_history(
    layer: Labels, on_atoms: Callable[[list[Any]], None], on_unknown: Callable[[], None]
) -> Callable[[], None]:
    """Report the regions napari's undo / redo of ``layer`` rewrite; returns an unhook function.

    WHY: ``Labels.undo``/``redo`` rewrite the layer's data without a paint event, so the
    label store (and the forest) would keep the undone stroke. The history item about to
    be replayed is read before napari applies it and handed to ``on_atoms`` afterwards,
    in the same form as a paint event's value. Should napari's private history queues
    ever be missing, ``on_unknown`` (a whole-layer copy) is called instead.
    Keyboard shortcuts call ``layer.undo()``, so the instance attributes catch them too.
    """
    for name, queue in (("undo", "_undo_history"), ("redo", "_redo_history")):
        original = getattr(layer, name)

        def replay(original: Callable[[], None] = original, queue: str = queue) -> None:
            pending = getattr(layer, queue, None)
            item = list(pending[-1]) if pending else []
            original()
            if pending is None:
                on_unknown()
            elif item:
                on_atoms(item)

        setattr(layer, name, replay)

    def unhook() -> None:
        for name in ("undo", "redo"):
            layer.__dict__.pop(name, None)  # the class's own method again

    return unhook


def _weak(method: Callable[..., None]) -> Callable[..., None]:
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


def _camera(viewer: ViewerModel) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _not_ready(e: BaseException) -> ClassifierNotReady | None:
    """The ClassifierNotReady behind ``e`` (requests may wrap it), else None."""
    while e is not None:
        if isinstance(e, ClassifierNotReady):
            return e
        e = e.__cause__  # type: ignore[assignment]
    return None


# -- the widget --------------------------------------------------------------------------------------


class TdaWidget(QWidget):
    """Dock widget: trainable domain adaptation on an image layer of a napari viewer.

    Parameters
    ----------
    napari_viewer : napari.Viewer or napari.components.ViewerModel
        Injected by napari (the parameter name is what napari looks for).
    n_trees : int
        Trees of the random forest.
    workers : int, optional
        Engine worker threads (default: CPU count).
    debounce_ms : int
        Dirty events and view changes within this time make one update.

    Notes
    -----
    Typical use from a script (a person clicks the same buttons)::

        w = TdaWidget(viewer)
        w.start()                       # workflow on the selected image layer
        # paint with the brush in the "tda labels" layer ...
        w.set_channel(2); w.set_model("mitochondria_em2d"); w.set_live(False)
        w.save_project("my.tdap")
    """

    #: Emitted from any thread by the workflow's dirty callbacks; handled on the GUI thread.
    _dirty = Signal()
    #: A message for the status line (also for tests: the last one is ``status``).
    status_changed = Signal(str)

    def __init__(
        self,
        napari_viewer: ViewerModel,
        *,
        n_trees: int = 64,
        workers: int | None = None,
        debounce_ms: int = 60,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.n_trees = n_trees
        self.workers = workers
        self.wf: TrainableDomainAdaptation | None = None
        self.image_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.prob_layers: list[Image] = []
        self.enhanced_layer: Image | None = None
        self.model_source: str | None = None  # what set_model was given (bundled name, path or zoo id)
        self.updates = 0  # applied view updates (tests and benchmarks wait on it)
        self.status = ""
        self._generation = 0  # bumped per workflow; results of an older one are dropped
        self._subs: list[Any] = []
        self._unhook_history: Callable[[], None] | None = None
        self._jobs: deque[tuple[str, Callable[[], tuple[Callable[..., Any], tuple[Any, ...]] | None], Any]] = deque()
        self._worker: Any = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(debounce_ms)
        self._timer.timeout.connect(self.request_update)
        self._dirty.connect(lambda: self._timer.start())
        self._build_ui()
        self._connect_viewer()

    # -- UI ---------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("image", self.image_combo)
        self.classes_edit = QLineEdit("background, foreground")
        self.classes_edit.setToolTip("label classes, comma separated: label 1, label 2, ...")
        form.addRow("classes", self.classes_edit)
        self.in_2d_check = QCheckBox("features per z slice (3D images)")
        form.addRow("", self.in_2d_check)
        lay.addLayout(form)

        row = QHBoxLayout()
        self.start_button = QPushButton("Start / reset")
        self.start_button.setToolTip("build the workflow on the chosen image and add a 'tda labels' layer to paint in")
        self.start_button.clicked.connect(lambda: self._guarded(self.start))
        row.addWidget(self.start_button)
        self.live_check = QCheckBox("live update")
        self.live_check.setChecked(True)
        self.live_check.setToolTip("off: freeze the forest and the shown predictions (paint without retraining)")
        self.live_check.toggled.connect(self.set_live)
        row.addWidget(self.live_check)
        lay.addLayout(row)

        # feature × scale grid, as in ilastik
        box = QGroupBox("features (σ)")
        grid = QGridLayout(box)
        self.feature_checks: dict[tuple[str, float], QCheckBox] = {}
        for j, s in enumerate(ft.SCALES):
            grid.addWidget(QLabel(f"{s:g}"), 0, j + 1)
        for i, fid in enumerate(ft.FEATURE_IDS):
            grid.addWidget(QLabel(ft.FEATURE_NAMES[fid]), i + 1, 0)
            for j, s in enumerate(ft.SCALES):
                cb = QCheckBox()
                cb.setEnabled(s in ft.valid_sigmas(fid))
                cb.setChecked(s in DEFAULT_WIDGET_SELECTION.get(fid, ()))
                cb.toggled.connect(self._features_toggled)
                grid.addWidget(cb, i + 1, j + 1)
                self.feature_checks[(fid, s)] = cb
        lay.addWidget(box)

        form = QFormLayout()
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip("class whose probability feeds the enhancer")
        self.channel_combo.currentIndexChanged.connect(self._channel_chosen)
        form.addRow("enhancer input", self.channel_combo)
        mrow = QHBoxLayout()
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)  # a typed path or bioimage.io zoo id works too
        self.model_combo.addItem(NO_MODEL)
        self.model_combo.addItems(self._bundled())
        self.model_combo.setToolTip("bundled enhancer, a model package folder / .zip / bioimageio.yaml, or a zoo id")
        mrow.addWidget(self.model_combo, 1)
        browse = QPushButton("…")
        browse.setToolTip("choose a local model package (.zip or bioimageio.yaml)")
        browse.clicked.connect(self._browse_model)
        mrow.addWidget(browse)
        self.tta_check = QCheckBox("TTA")
        self.tta_check.setToolTip("test-time augmentation: average the enhancer over 8 orientations (8x slower)")
        self.tta_check.toggled.connect(self._tta_toggled)
        mrow.addWidget(self.tta_check)
        apply = QPushButton("Apply")
        apply.clicked.connect(lambda: self._guarded(self.set_model, self.model_combo.currentText()))
        mrow.addWidget(apply)
        form.addRow("enhancer", mrow)
        lay.addLayout(form)

        row = QHBoxLayout()
        save = QPushButton("Save project…")
        save.clicked.connect(self._save_dialog)
        load = QPushButton("Load project…")
        load.clicked.connect(self._load_dialog)
        row.addWidget(save)
        row.addWidget(load)
        lay.addLayout(row)
        self.status_label = QLabel("choose an image layer and press Start")
        self.status_label.setWordWrap(True)
        lay.addWidget(self.status_label)
        lay.addStretch(1)
        self._refresh_image_choices()

    @staticmethod
    def _bundled() -> list[str]:
        from tda_graph.models import bundled_enhancers

        return list(bundled_enhancers())

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        # a button click: report a user error in the status line instead of raising into Qt
        try:
            fn(*args)
        except TdaError as e:
            self._set_status(f"error: {e}")

    def _set_status(self, text: str) -> None:
        self.status = text
        self.status_label.setText(text)
        self.status_changed.emit(text)

    def _connect_viewer(self) -> None:
        v = self.viewer
        v.layers.events.inserted.connect(self._refresh_image_choices)
        v.layers.events.removed.connect(self._layer_removed)
        # the visible region changes: fetch it (cached blocks make this cheap)
        camera = _camera(v)
        camera.events.center.connect(self._view_changed)
        camera.events.zoom.connect(self._view_changed)
        v.dims.events.current_step.connect(self._view_changed)
        v.dims.events.ndisplay.connect(self._view_changed)

    def _refresh_image_choices(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer not in self._ours()]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def _ours(self) -> list[Any]:
        return [*self.prob_layers, self.enhanced_layer]

    def _layer_removed(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        if layer is self.enhanced_layer:
            self.enhanced_layer = None
        if layer in self.prob_layers:
            self.prob_layers.remove(layer)
        self._refresh_image_choices()

    def _view_changed(self, event: Any = None) -> None:
        if self.wf is not None:
            self._timer.start()

    # -- workflow ---------------------------------------------------------------------------------
    def selection(self) -> tuple[tuple[str, float], ...]:
        """The ticked features as ``((feature_id, sigma), ...)``."""
        return tuple(k for k, cb in self.feature_checks.items() if cb.isChecked())

    def set_selection(self, selection: Mapping[str, Sequence[float]] | Iterable[tuple[str, float]]) -> None:
        """Tick exactly ``selection`` and apply it to the workflow (one retraining)."""
        from operators.features import normalize_selection

        pairs = set(normalize_selection(selection))
        for key, cb in self.feature_checks.items():
            cb.blockSignals(True)
            cb.setChecked(key in pairs)
            cb.blockSignals(False)
        self._features_toggled()

    def _features_toggled(self, *args: Any) -> None:
        if self.wf is None:
            return
        sel = self.selection()
        if not sel:
            self._set_status("select at least one feature")
            return
        # cheap: only dirties features and everything below; the retraining happens in the next update
        self.wf.set_features(sel, in_2d=self.in_2d_check.isChecked())

    def class_names(self) -> tuple[str, ...]:
        names = tuple(n.strip() for n in self.classes_edit.text().split(",") if n.strip())
        return names if len(names) >= 2 else ("background", "foreground")

    def start(self, layer: Image | str | None = None) -> TrainableDomainAdaptation:
        """Build a fresh workflow on ``layer`` (default: the chosen image) and add the labels layer.

        An existing ``"tda labels"`` layer of the same shape is reused and its
        labels go to the new workflow's label store.
        """
        if isinstance(layer, str):
            layer = self.viewer.layers[layer]
        if layer is None:
            name = self.image_combo.currentText()
            if not name:
                raise SettingsError("add an image layer first (File → Open, or File → Open Sample → tda-graph)")
            layer = self.viewer.layers[name]
        if not isinstance(layer, Image):
            raise SettingsError(f"layer {layer.name!r} is not an image layer")
        return self._build(layer, self.class_names(), self.selection() or "default", self.in_2d_check.isChecked())

    def _build(
        self,
        layer: Image,
        class_names: Sequence[str],
        selection: Any,
        in_2d: bool,
        labels: np.ndarray | None = None,
    ) -> TrainableDomainAdaptation:
        self.close_workflow()
        data = layer.data[0] if layer.multiscale else layer.data
        wf = TrainableDomainAdaptation(
            np.asarray(data),
            axes=_axes_of(layer),
            selection=selection,
            in_2d=in_2d,
            class_names=tuple(class_names),
            n_trees=self.n_trees,
            workers=self.workers,
        )
        self.wf, self.image_layer = wf, layer
        self._generation += 1
        shape = wf.labels.spec.shape
        self.classes_edit.setText(", ".join(class_names))
        self.in_2d_check.setChecked(bool(in_2d))
        # the Labels layer is the view of the label store; strokes in it go to the store
        lab = self._find(LABELS_NAME, Labels)
        if lab is None or lab.data.shape != shape:
            if lab is not None:
                self.viewer.layers.remove(lab)
            lab = self.viewer.add_labels(np.zeros(shape, np.uint8), name=LABELS_NAME, opacity=0.8)
        if labels is not None:
            lab.data = np.asarray(labels, np.uint8)
        self._color_labels(lab, wf)
        self.labels_layer = lab
        lab.events.paint.connect(self._on_paint)
        self._unhook_history = follow_history(lab, _weak(self.apply_stroke), _weak(self.sync_labels))
        existing = np.asarray(lab.data)
        if existing.any():
            if existing.max() > len(class_names):
                existing = np.where(existing <= len(class_names), existing, 0)
            wf.labels.load_dense(existing.astype(np.uint8))
        self.prob_layers = []
        for k, cname in enumerate(class_names):
            self.prob_layers.append(self._output_layer(PROB_PREFIX + cname, shape, _CLASS_COLORMAPS[k % 7], k > 0))
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        self.channel_combo.addItems([f"{k + 1}: {n}" for k, n in enumerate(class_names)])
        self.channel_combo.setCurrentIndex(wf.channel - 1)
        self.channel_combo.blockSignals(False)
        self._subs = [wf.subscribe("probabilities", self._on_dirty), wf.subscribe("enhancer_input", self._on_dirty)]
        if not self.live_check.isChecked():
            wf.freeze()
        self.viewer.layers.selection.active = lab
        self._refresh_image_choices()
        self._set_status(f"paint classes 1..{len(class_names)} in '{LABELS_NAME}' ({', '.join(class_names)})")
        return wf

    def _find(self, name: str, kind: type) -> Any:
        for layer in self.viewer.layers:
            if layer.name == name and isinstance(layer, kind):
                return layer
        return None

    def _output_layer(self, name: str, shape: tuple[int, ...], colormap: str, visible: bool) -> Image:
        # a full-size buffer: the widget writes each computed visible region into it
        layer = self._find(name, Image)
        if layer is not None and layer.data.shape == shape and layer.data.dtype == np.float32:
            layer.data[...] = 0
            layer.refresh()
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        return self.viewer.add_image(
            np.zeros(shape, np.float32),
            name=name,
            colormap=colormap,
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.6,
            visible=visible,
        )

    @staticmethod
    def _color_labels(layer: Labels, wf: TrainableDomainAdaptation) -> None:
        """Colour the Labels layer like the label store's classes (cosmetic; skipped where unsupported)."""
        try:
            from napari.utils.colormaps import DirectLabelColormap

            colors: dict[Any, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
            for k, c in enumerate(wf.labels.classes, start=1):
                colors[k] = tuple(v / 255 for v in c.color) + (1.0,)
            layer.colormap = DirectLabelColormap(color_dict=colors)
        except Exception:  # older napari: keep its default colours
            pass

    def close_workflow(self) -> None:
        """Drop the current workflow (stop its threads); layers stay."""
        for s in self._subs:
            s.disconnect()
        self._subs = []
        if self.labels_layer is not None:
            self.labels_layer.events.paint.disconnect(self._on_paint)
        if self._unhook_history is not None:
            self._unhook_history()
            self._unhook_history = None
        self._jobs.clear()
        self._generation += 1
        if self.wf is not None:
            wf, self.wf = self.wf, None
            # a running job may still use it: close when that finishes
            if self._worker is not None:
                self._worker.finished.connect(wf.close)
            else:
                wf.close()

    # -- strokes ---------------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        """``Labels.events.paint``: one finished stroke (or fill); mirror it into the label store."""
        self.apply_stroke(getattr(event, "value", None) or [])

    def apply_stroke(self, atoms: Iterable[Any]) -> None:
        """Send the regions of napari history ``atoms`` to the label store (paint or erase, one batch)."""
        wf, lab = self.wf, self.labels_layer
        if wf is None or lab is None:
            return
        shape = wf.labels.spec.shape
        k = len(wf.labels.classes)
        refused: set[int] = set()
        with wf.strokes():  # one dirty event, one retraining for the whole stroke
            for roi, mask in stroke_regions(atoms, shape):
                # the layer already holds the stroke's values; read them back inside the changed mask
                values = np.asarray(lab.data[roi.to_slices()])
                for v in np.unique(values[mask]).tolist():
                    where = mask & (values == v)
                    if v == 0:
                        wf.erase(roi, where)
                    elif v <= k:
                        wf.paint(roi, where, int(v))
                    else:
                        refused.add(int(v))
        if refused:
            self._set_status(f"label(s) {sorted(refused)} are not classes (1..{k}); they are not used for training")

    def sync_labels(self) -> None:
        """Copy the whole Labels layer into the label store (after edits napari reports no region for)."""
        if self.wf is None or self.labels_layer is None:
            return
        data = np.asarray(self.labels_layer.data)
        k = len(self.wf.labels.classes)
        self.wf.labels.load_dense(np.where(data <= k, data, 0).astype(np.uint8))

    # -- settings ------------------------------------------------------------------------------------
    def set_live(self, live: bool) -> None:
        """Live update on (``True``) or frozen: strokes are stored but the forest is not retrained."""
        if self.live_check.isChecked() != bool(live):
            self.live_check.blockSignals(True)
            self.live_check.setChecked(bool(live))
            self.live_check.blockSignals(False)
        if self.wf is None:
            return
        if live:
            self.wf.unfreeze()  # what changed meanwhile propagates now (→ dirty events → update)
            self._timer.start()
        else:
            self.wf.freeze()
        self._set_status("live update on" if live else "frozen: strokes are kept, predictions are not updated")

    def _channel_chosen(self, index: int) -> None:
        if self.wf is not None and index >= 0:
            self._guarded(self.set_channel, index + 1)

    def set_channel(self, channel: int) -> None:
        """Feed the probability of label value ``channel`` (1..K) to the enhancer."""
        if self.wf is None:
            raise SettingsError("press Start first")
        self.wf.set_channel(channel)  # dirties enhancer input → update
        if self.channel_combo.currentIndex() != channel - 1:
            self.channel_combo.blockSignals(True)
            self.channel_combo.setCurrentIndex(channel - 1)
            self.channel_combo.blockSignals(False)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Model package", "", "bioimage.io package (*.zip bioimageio.yaml rdf.yaml *.yaml)"
        )
        if path:
            self.model_combo.setCurrentText(path)

    def set_model(self, source: str | None, tta: bool | None = None) -> Any:
        """Load an enhancer in a worker thread: bundled name, package folder / ``.zip`` / yaml, or zoo id.

        ``None`` or ``"(no enhancer)"`` removes the enhancer. ``tta``: test-time
        augmentation (default: the TTA check box). Returns the queued job's handle.
        """
        if self.wf is None:
            raise SettingsError("press Start first")
        source = None if source in (None, "", NO_MODEL) else os.path.expanduser(str(source))
        if self.model_combo.currentText() != (source or NO_MODEL):
            self.model_combo.setCurrentText(source or NO_MODEL)
        if tta is not None and self.tta_check.isChecked() != bool(tta):
            self.tta_check.blockSignals(True)
            self.tta_check.setChecked(bool(tta))
            self.tta_check.blockSignals(False)
        tta = self.tta_check.isChecked()
        self._set_status("loading enhancer …" if source else "enhancer removed")
        return self._submit("model", lambda: (self._load_model, (self.wf, source, tta)), self._model_loaded)

    def _tta_toggled(self, on: bool) -> None:
        if self.wf is not None and self.model_source is not None:
            self._guarded(self.set_model, self.model_source)

    @staticmethod
    def _load_model(
        wf: TrainableDomainAdaptation, source: str | None, tta: bool = False
    ) -> tuple[TrainableDomainAdaptation, str | None]:
        # worker thread: loading a bioimage.io package takes seconds
        if source is None:
            wf.remove_enhancer()
        else:
            wf.set_enhancer(source, tta=tta)
        return wf, source

    def _model_loaded(self, result: tuple[TrainableDomainAdaptation, str | None]) -> None:
        wf, source = result
        if wf is not self.wf:
            return
        self.model_source = source
        if source is None:
            if self.enhanced_layer is not None:
                self.viewer.layers.remove(self.enhanced_layer)
                self.enhanced_layer = None
            return
        shape = wf.labels.spec.shape
        if self.enhanced_layer is None or self.enhanced_layer not in self.viewer.layers:
            self.enhanced_layer = self._output_layer(ENHANCED_NAME, shape, "magma", True)
        else:
            self.enhanced_layer.data[...] = 0
        self._subs.append(wf.subscribe("enhanced", self._on_dirty))
        self._set_status(f"enhancer {wf.enhanced.model.name!r} on class {wf.channel}")
        self.request_update()

    # -- updates ---------------------------------------------------------------------------------------
    def _on_dirty(self, event: Any) -> None:
        # any thread: hand over to the GUI thread (queued signal), which debounces
        try:
            self._dirty.emit()
        except RuntimeError:  # the widget was deleted
            pass

    @property
    def busy(self) -> bool:
        """Whether an update or a job is pending or running."""
        return self._timer.isActive() or self._worker is not None or bool(self._jobs)

    def request_update(self) -> None:
        """Fetch the visible region of every shown output (coalesced: at most one update queued)."""
        if self.wf is None:
            return
        if any(kind == "update" for kind, _, _ in self._jobs):
            return  # the queued one reads the view when it starts, so it covers this request
        self._submit("update", self._update_job, self._apply_update)

    def _update_job(self) -> tuple[Callable[..., Any], tuple[Any, ...]] | None:
        # GUI thread, when the job starts: read the view now
        wf, layer = self.wf, self.image_layer
        if wf is None or layer is None:
            return None
        view = visible_roi(layer, self.viewer, wf.labels.spec.shape)
        names = ["probabilities"] + (["enhanced"] if wf.enhanced is not None and self.enhanced_layer else [])
        return self._compute, (wf, self._generation, view, names)

    @staticmethod
    def _compute(wf: TrainableDomainAdaptation, generation: int, view: Roi, names: list[str]) -> dict[str, Any]:
        # worker thread: all the work (training, features, forest, network) happens in these requests
        out: dict[str, Any] = {"generation": generation, "view": view}
        for name in names:
            try:
                out[name] = wf.request(name, output_roi(wf.output(name).spec, view))
            except (ClassifierNotReady, OperatorError) as e:
                why = _not_ready(e)
                if why is None:
                    raise
                out["message"] = str(why)
                break
        return out

    def _apply_update(self, result: dict[str, Any]) -> None:
        # GUI thread: write the computed region into the layer buffers
        if result["generation"] != self._generation:
            return
        sl = result["view"].to_slices()
        if "message" in result:
            self._set_status(result["message"])
        probs = result.get("probabilities")
        if probs is not None:
            for k, layer in enumerate(self.prob_layers):
                layer.data[sl] = probs[..., k]
                layer.refresh()
        enh = result.get("enhanced")
        if enh is not None and self.enhanced_layer is not None:
            self.enhanced_layer.data[sl] = enh[..., 0]
            self.enhanced_layer.refresh()
        if probs is not None:
            self.updates += 1
            if "message" not in result and not self.status.startswith(("saved", "loaded")):
                state = self.wf.probabilities.state if self.wf is not None else ""
                self._set_status(f"forest {state}; updated {result['view']}")

    # -- job queue (one worker at a time, so graph edits and requests never interleave) ----------
    def _submit(
        self,
        kind: str,
        prepare: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]] | None],
        on_done: Callable[[Any], None],
    ) -> tuple[str, Any]:
        job = (kind, prepare, on_done)
        self._jobs.append(job)
        self._pump()
        return job

    def _pump(self) -> None:
        while self._worker is None and self._jobs:
            kind, prepare, on_done = self._jobs.popleft()
            task = prepare()
            if task is None:
                continue
            fn, args = task
            worker = create_worker(fn, *args, _start_thread=False)
            worker.returned.connect(on_done)
            worker.errored.connect(self._job_failed)
            worker.finished.connect(self._job_finished)
            self._worker = worker
            worker.start()

    def _job_failed(self, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, TdaError) else f"{type(exc).__name__}: {exc}"
        self._set_status(f"error: {msg}")

    def _job_finished(self) -> None:
        self._worker = None
        self._pump()

    # -- projects ------------------------------------------------------------------------------------
    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save project", "", "tda-graph project (*.tdap *.h5)")
        if path:
            self._guarded(self.save_project, path)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load project", "", "tda-graph project (*.tdap *.h5)")
        if path:
            self._guarded(self.load_project, path)

    def save_project(self, path: str | os.PathLike[str]) -> Any:
        """Save labels, features, forest, channel and enhancer to a project file (in a worker thread)."""
        wf = self.wf
        if wf is None:
            raise SettingsError("nothing to save: press Start first")
        layer = self.image_layer
        src = getattr(getattr(layer, "source", None), "path", None)
        args = (wf, os.fspath(path), src, self.model_source)
        return self._submit("save", lambda: (_save_workflow, args), self._saved)

    def _saved(self, path: str) -> None:
        self._set_status(f"saved {path}")

    def load_project(self, path: str | os.PathLike[str]) -> Any:
        """Load a project: labels, features, forest, channel and enhancer (file read in a worker thread).

        The project is applied to the chosen image layer when its shape fits the
        project's labels; otherwise the project's input image is opened.
        """
        from tda_graph.workflows.project import load_project

        p = os.fspath(path)
        return self._submit("load", lambda: (load_project, (p,)), lambda state: self._apply_project(p, state))

    def _apply_project(self, path: str, state: Any) -> None:
        # GUI thread: layers and the new workflow
        from tda_graph.workflows.headless import enhancer_source

        if state.labels is None:
            self._set_status(f"{path} holds no labels")
            return
        shape = state.labels.output_spec({}).shape
        layer = None
        name = self.image_combo.currentText()
        if name and isinstance(self.viewer.layers[name], Image):
            cand = self.viewer.layers[name]
            if tuple(cand.data.shape[: len(shape)]) == tuple(shape):
                layer = cand
        if layer is None:
            if state.input_path is None:
                self._set_status(f"no image layer of shape {shape} open, and {path} names no input file")
                return
            src = state.open_input(name="raw")
            spec = src.output_spec({})
            data = np.asarray(src.compute(Roi.full(spec.shape), {}))
            layer = self.viewer.add_image(data, name=Path(state.input_path).stem, rgb=spec.axes.endswith("c"))
        selection = state.selection or "default"
        if state.selection:
            for key, cb in self.feature_checks.items():
                cb.blockSignals(True)
                cb.setChecked(key in set(state.selection))
                cb.blockSignals(False)
        wf = self._build(layer, state.labels.class_names, selection, state.in_2d, labels=state.labels.to_dense())
        if state.forest is not None and state.forest.n_features == wf.features.spec.n_channels:
            wf.probabilities.set_forest(state.forest)  # counts as current: no retraining
        if state.channel:
            self.set_channel(state.channel)
        self._set_status(f"loaded {path}")
        if state.enhancer is not None:
            try:  # a bundled name or an existing local package; a project never makes us download
                self.set_model(enhancer_source(state.enhancer), tta=state.enhancer.tta)
            except TdaError as e:
                self._set_status(f"loaded {path}; enhancer not set: {e}")
        self.request_update()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.close_workflow()
        super().closeEvent(event)


def _save_workflow(wf: TrainableDomainAdaptation, path: str, input_path: str | None, model: str | None) -> str:
    """Worker thread: train if the forest is outdated (unless frozen), then write the project atomically."""
    from tda_graph.models import bundled_enhancers
    from tda_graph.workflows.project import EnhancerRef, ProjectState, save_project

    if wf.probabilities.state != "trained" and not wf.graph.is_frozen(wf.probabilities):
        try:  # one voxel is enough to bring the forest up to date
            n = len(wf.probabilities.spec.shape)
            wf.request("probabilities", Roi((0,) * n, (1,) * n))
        except (ClassifierNotReady, OperatorError) as e:
            if _not_ready(e) is None:
                raise
    ref = None
    tta = bool(wf.enhanced is not None and wf.enhanced.settings.tta)
    if model is not None:
        if model in bundled_enhancers():
            ref = EnhancerRef(name=model, tta=tta)
        elif wf.enhanced is not None:
            local = Path(wf.enhanced.model.source)  # a zoo id is stored as its cached package
            ref = EnhancerRef.from_file(local / "bioimageio.yaml" if local.is_dir() else local, tta=tta)
    state = ProjectState(
        input_path=input_path if input_path and Path(input_path).exists() else None,
        selection=wf.features.settings.selection,
        in_2d=wf.features.settings.in_2d,
        labels=wf.labels,
        forest=wf.probabilities.forest,
        channel=wf.channel,
        enhancer=ref,
    )
    save_project(path, state)
    return path
