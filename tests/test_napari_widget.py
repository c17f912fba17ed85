"""The napari dock widget (tda_graph/frontends/napari_widget.py), headless.

Runs on a GUI-less ``napari.components.ViewerModel`` (no OpenGL canvas needed)
with the Qt "offscreen" platform. Strokes are painted the way napari's brush
paints (``Labels._draw`` inside ``block_history``), so the widget receives the
same ``Labels.events.paint`` payload as from a mouse drag. Skips cleanly when
napari, a Qt binding or pytest-qt is missing, or when Qt cannot start here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any Qt import

pytest.importorskip("napari", exc_type=ImportError)
pytest.importorskip("pytestqt", exc_type=ImportError)


def _qt_starts() -> bool:
    # a Qt platform that cannot start aborts the process (qFatal), so probe in a child first
    code = "from qtpy.QtWidgets import QApplication; QApplication([])"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _qt_starts():
    pytest.skip("Qt cannot start a QApplication here (offscreen platform)", allow_module_level=True)

from napari.components import ViewerModel  # noqa: E402
from scipy import ndimage  # noqa: E402

from operators.kernels.synthetic import em_like  # noqa: E402
from tda_graph.frontends.napari_widget import (  # noqa: E402
    ENHANCED_NAME,
    LABELS_NAME,
    PROB_PREFIX,
    TdaWidget,
    _camera,
)
from tda_graph.models import bundled_enhancers  # noqa: E402
from tda_graph.workflows.project import load_project  # noqa: E402

SIZE = 128
FAST = {"GaussianSmoothing": [0.7, 1.6], "LaplacianOfGaussian": [1.6], "HessianOfGaussianEigenvalues": [1.6]}
WAIT_MS = 30_000


@pytest.fixture
def setup(qtbot):
    em = em_like((SIZE, SIZE), seed=3, cell_size=40)
    viewer = ViewerModel()
    viewer.add_image(em.raw, name="em")
    w = TdaWidget(viewer, n_trees=16, workers=2, debounce_ms=10)
    qtbot.addWidget(w)
    w.classes_edit.setText("background, mitochondria")
    w.set_selection(FAST)
    w.start()
    yield viewer, w, em
    w.close_workflow()


def _points(mask: np.ndarray, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` pixels well inside ``mask`` (brush-sized margin)."""
    inner = ndimage.binary_erosion(mask, iterations=3)
    pos = np.argwhere(inner)
    rng = np.random.default_rng(seed)
    return [tuple(p) for p in pos[rng.choice(len(pos), n, replace=False)]]


def brush(layer, points, label: int, size: int = 3, erase: bool = False) -> None:
    """One brush stroke through ``points``, as napari's ``draw`` mouse binding paints it."""
    layer.brush_size = size
    layer.mode = "erase" if erase else "paint"
    value = 0 if erase else label
    with layer.block_history():  # press … release: one history item → one paint event
        last = points[0]
        for p in points:
            if hasattr(layer, "_draw"):
                layer._draw(value, last, p)
            else:  # pragma: no cover - napari without _draw
                layer.paint(p, value)
            last = p


def wait_update(qtbot, w: TdaWidget, after: int) -> None:
    qtbot.waitUntil(lambda: not w.busy and w.updates > after, timeout=WAIT_MS)


def paint_two_classes(qtbot, viewer, w, em, seed: int = 0) -> None:
    lab = viewer.layers[LABELS_NAME]
    mito = em.mitochondria > 0
    n = w.updates
    for p in _points(~mito & (ndimage.distance_transform_edt(~mito) > 6), 6, seed):
        brush(lab, [p], 1)
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
    assert w.wf.probabilities.forest is None and "two classes" in w.status  # one class only: says what is missing
    for p in _points(mito, 6, seed):
        brush(lab, [p], 2)
    wait_update(qtbot, w, n)


def test_manifest_and_lazy_imports():
    import npe2

    manifest = npe2.PluginManifest.from_file(
        Path(__file__).resolve().parents[1] / "tda_graph" / "frontends" / "napari.yaml"
    )
    assert manifest.name == "tda-graph"
    assert [c.python_name for c in manifest.contributions.commands][0].endswith("napari_widget:TdaWidget")
    # importing the engine, the workflow or the other frontends must never pull napari or Qt
    code = (
        "import sys, tda_graph, tda_graph.frontends, tda_graph.frontends.cli, "
        "tda_graph.workflows.pixel_classification; "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PySide6') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_strokes_train_and_update_visible_region(qtbot, setup):
    viewer, w, em = setup
    img, lab = viewer.layers["em"], viewer.layers[LABELS_NAME]
    p_bg, p_mito = viewer.layers[PROB_PREFIX + "background"], viewer.layers[PROB_PREFIX + "mitochondria"]
    # pretend the canvas shows the top half only: only that region is predicted
    img.corner_pixels = np.array([[0, 0], [SIZE // 2 - 1, SIZE - 1]])
    before = p_mito.data.copy()
    paint_two_classes(qtbot, viewer, w, em)
    # the strokes reached the label store, exactly as painted in the layer
    np.testing.assert_array_equal(w.wf.labels.to_dense(), lab.data)
    assert set(np.unique(lab.data)) == {0, 1, 2}
    top = slice(0, SIZE // 2)
    for layer in (p_bg, p_mito):
        assert 0.0 <= layer.data.min() and layer.data.max() <= 1.0
        assert np.all(layer.data[SIZE // 2 :] == 0)  # not visible: not computed
    assert not np.array_equal(p_mito.data[top], before[top])
    np.testing.assert_allclose(p_bg.data[top] + p_mito.data[top], 1.0, atol=1e-5)
    # the view moves to the whole image: the rest is fetched
    n = w.updates
    img.corner_pixels = np.array([[0, 0], [SIZE - 1, SIZE - 1]])
    _camera(viewer).center = (0.0, SIZE / 2 + 1, SIZE / 2 + 1)
    wait_update(qtbot, w, n)
    np.testing.assert_allclose(p_mito.data, w.wf.request("probabilities")[..., 1], atol=1e-6)
    # sensible: painted class regions and the ground truth are told apart
    assert p_bg.data[lab.data == 1].mean() > p_bg.data[lab.data == 2].mean()
    mito = em.mitochondria > 0
    assert p_mito.data[mito].mean() > p_mito.data[~mito].mean() + 0.2
    # erasing with the brush erases in the store too
    n = w.updates
    spot = tuple(np.argwhere(lab.data == 2)[0])
    brush(lab, [spot], 0, size=1, erase=True)
    wait_update(qtbot, w, n)
    assert lab.data[spot] == 0
    np.testing.assert_array_equal(w.wf.labels.to_dense(), lab.data)
    # a label value beyond the classes is not sent to the store
    brush(lab, [(5, 5)], 7, size=1)
    assert w.wf.labels.to_dense()[5, 5] == 0 and "not classes" in w.status


def test_freeze_toggle_prevents_retraining(qtbot, setup):
    viewer, w, em = setup
    lab, p_mito = viewer.layers[LABELS_NAME], viewer.layers[PROB_PREFIX + "mitochondria"]
    paint_two_classes(qtbot, viewer, w, em)
    forest = w.wf.probabilities.forest
    shown = p_mito.data.copy()
    w.live_check.setChecked(False)  # the GUI toggle
    assert w.wf.graph.is_frozen(w.wf.probabilities)
    brush(lab, _points(em.mitochondria > 0, 8, seed=5), 2)  # more strokes while frozen
    qtbot.waitUntil(lambda: not w.busy, timeout=WAIT_MS)
    assert w.wf.labels.counts()[2] > 0 and np.array_equal(w.wf.labels.to_dense(), lab.data)
    assert w.wf.probabilities.forest is forest  # no retraining
    np.testing.assert_array_equal(p_mito.data, shown)
    n = w.updates
    w.live_check.setChecked(True)
    wait_update(qtbot, w, n)
    assert w.wf.probabilities.forest is not forest
    assert not np.array_equal(p_mito.data, shown)


def fresh_widget(qtbot, em):
    """A second viewer with the same image and a new widget (for loading a saved project)."""
    viewer = ViewerModel()
    viewer.add_image(em.raw, name="em")
    widget = TdaWidget(viewer, n_trees=16, workers=2, debounce_ms=10)
    qtbot.addWidget(widget)
    return viewer, widget


@pytest.mark.skipif("mitochondria_em2d" not in bundled_enhancers(), reason="bundled enhancer not installed")
def test_enhancer_channel_selector_and_project_round_trip(qtbot, setup, tmp_path):
    viewer, w, em = setup
    paint_two_classes(qtbot, viewer, w, em)
    n = w.updates
    w.set_model("mitochondria_em2d")
    wait_update(qtbot, w, n)
    enh = viewer.layers[ENHANCED_NAME]
    assert w.wf.enhanced is not None and w.model_source == "mitochondria_em2d"
    assert np.isfinite(enh.data).all() and enh.data.std() > 0
    assert w.wf.channel == 2
    first = enh.data.copy()
    # the channel selector: class 1 now feeds the enhancer
    n = w.updates
    w.channel_combo.setCurrentIndex(0)
    wait_update(qtbot, w, n)
    assert w.wf.channel == 1
    np.testing.assert_array_equal(w.wf.request("enhancer_input")[..., 0], w.wf.request("probabilities")[..., 0])
    assert not np.allclose(enh.data, first)
    # save, then load into a fresh widget on a fresh viewer
    path = tmp_path / "session.tdap"
    w.save_project(path)
    qtbot.waitUntil(lambda: not w.busy and w.status.startswith("saved"), timeout=WAIT_MS)
    assert path.is_file()
    viewer2, w2 = fresh_widget(qtbot, em)
    try:
        w2.load_project(path)
        qtbot.waitUntil(lambda: not w2.busy and w2.model_source is not None and w2.updates > 0, timeout=WAIT_MS)
        assert w2.class_names() == ("background", "mitochondria")
        assert w2.selection() == w.selection()
        np.testing.assert_array_equal(viewer2.layers[LABELS_NAME].data, viewer.layers[LABELS_NAME].data)
        np.testing.assert_array_equal(w2.wf.labels.to_dense(), w.wf.labels.to_dense())
        assert w2.wf.channel == 1 and w2.channel_combo.currentIndex() == 0
        assert w2.wf.probabilities.state == "trained"  # the saved forest, not a retrained one
        assert w2.model_source is not None and w2.wf.enhanced is not None
        np.testing.assert_allclose(
            viewer2.layers[PROB_PREFIX + "mitochondria"].data,
            viewer.layers[PROB_PREFIX + "mitochondria"].data,
            atol=1e-5,
        )
        np.testing.assert_allclose(viewer2.layers[ENHANCED_NAME].data, enh.data, atol=1e-4)
        assert not w2.tta_check.isChecked() and not w2.wf.enhanced.settings.tta
    finally:
        w2.close_workflow()


@pytest.mark.skipif("mitochondria_em2d" not in bundled_enhancers(), reason="bundled enhancer not installed")
def test_tta_check_box_reruns_the_enhancer_and_is_saved(qtbot, setup, tmp_path):
    viewer, w, em = setup
    paint_two_classes(qtbot, viewer, w, em)
    n = w.updates
    w.set_model("mitochondria_em2d")
    wait_update(qtbot, w, n)
    plain = viewer.layers[ENHANCED_NAME].data.copy()
    n = w.updates
    w.tta_check.setChecked(True)  # re-applies the model with test-time augmentation
    qtbot.waitUntil(lambda: w.wf.enhanced is not None and w.wf.enhanced.settings.tta, timeout=WAIT_MS)
    wait_update(qtbot, w, n)
    assert not np.allclose(viewer.layers[ENHANCED_NAME].data, plain, atol=1e-4)
    path = tmp_path / "tta.tdap"
    w.save_project(path)
    qtbot.waitUntil(lambda: not w.busy and w.status.startswith("saved"), timeout=WAIT_MS)
    assert load_project(path).enhancer.tta
    _, w2 = fresh_widget(qtbot, em)
    try:
        w2.load_project(path)
        qtbot.waitUntil(lambda: not w2.busy and w2.wf is not None and w2.wf.enhanced is not None, timeout=WAIT_MS)
        assert w2.tta_check.isChecked() and w2.wf.enhanced.settings.tta
    finally:
        w2.close_workflow()


def test_napari_undo_and_redo_reach_the_label_store(qtbot, setup):
    viewer, w, em = setup
    lab = viewer.layers[LABELS_NAME]
    paint_two_classes(qtbot, viewer, w, em)
    painted = lab.data.copy()
    trainings = w.wf.probabilities.counters["trainings"]
    spot = tuple(np.argwhere(painted == 0)[len(np.argwhere(painted == 0)) // 2])
    n = w.updates
    brush(lab, [spot], 2, size=3)
    wait_update(qtbot, w, n)
    assert w.wf.labels.to_dense()[spot] == 2
    # napari's own undo (Ctrl+Z calls layer.undo()) sends no paint event; the store must follow anyway
    n = w.updates
    lab.undo()
    wait_update(qtbot, w, n)
    np.testing.assert_array_equal(lab.data, painted)
    np.testing.assert_array_equal(w.wf.labels.to_dense(), painted)
    n = w.updates
    lab.redo()
    wait_update(qtbot, w, n)
    assert lab.data[spot] == 2
    np.testing.assert_array_equal(w.wf.labels.to_dense(), lab.data)
    assert w.wf.probabilities.counters["trainings"] >= trainings + 3  # stroke, undo, redo each retrain
    # after the workflow closes, undo is napari's own method again
    w.close_workflow()
    assert "undo" not in vars(lab) and "redo" not in vars(lab)
