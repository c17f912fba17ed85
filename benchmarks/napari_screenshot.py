"""Make ``docs/napari_widget.png``: the napari dock widget in use on a synthetic EM image.

Run ``python benchmarks/napari_screenshot.py [--out docs/napari_widget.png]``. It needs
napari with a Qt binding (``pip install -e ".[napari]"``) and an OpenGL context for the
canvas: on a machine without a screen it starts ``Xvfb`` (Debian package ``xvfb``) itself
and uses Qt's ``xcb`` platform on that display (mesa's software GL renders the canvas).
Strokes are painted the way napari's brush paints, then the script waits for the live update
and for the bundled ``mitochondria_em2d`` enhancer, and takes ``viewer.screenshot(canvas_only=False)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _display() -> subprocess.Popen | None:
    """Start a virtual X display when there is none (OpenGL for the canvas); ``None`` if not needed."""
    if os.environ.get("DISPLAY"):
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        sys.exit("no DISPLAY and no Xvfb: install it (apt-get install xvfb) or run under a desktop session")
    proc = subprocess.Popen([xvfb, ":97", "-screen", "0", "1920x1200x24", "-nolisten", "tcp"])
    os.environ["DISPLAY"] = ":97"
    time.sleep(1.0)
    return proc


def _wait(app, until, timeout: float = 120.0) -> None:
    t0 = time.perf_counter()
    while not until():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("the widget did not finish in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "napari_widget.png"))
    ap.add_argument("--size", type=int, default=384)
    args = ap.parse_args()
    xvfb = _display()
    # Qt's default platform on X ("xcb"): Qt 6's "offscreen" platform has no QOpenGLWidget, so the canvas
    # would stay empty there (Debian: libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 ... for xcb)
    try:
        import napari
        from PIL import Image
        from qtpy.QtWidgets import QApplication
        from scipy import ndimage

        from operators.kernels.synthetic import em_like
        from tda_graph.frontends.napari_widget import LABELS_NAME, PROB_PREFIX

        em = em_like((args.size, args.size), seed=1, cell_size=56)
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1500, 900)
        viewer.add_image(em.raw, name="synthetic EM")
        # the widget as napari opens it from Plugins → tda-graph (through the npe2 manifest)
        _, w = viewer.window.add_plugin_dock_widget("tda-graph", "Trainable domain adaptation")
        app = QApplication.instance()
        w.classes_edit.setText("background, mitochondria")
        w.start()
        lab = viewer.layers[LABELS_NAME]
        rng = np.random.default_rng(0)
        mito = em.mitochondria > 0
        for label, region in (
            (1, ndimage.binary_erosion(~mito, iterations=8)),
            (2, ndimage.binary_erosion(mito, iterations=3)),
        ):
            pts = np.argwhere(region)
            for p in pts[rng.choice(len(pts), 10, replace=False)]:
                # a short horizontal brush stroke, as a mouse drag paints it
                q = (p[0], min(p[1] + 6, args.size - 1))
                lab.brush_size = 4
                lab.mode = "paint"
                lab.selected_label = label
                with lab.block_history():
                    lab._draw(label, tuple(p), tuple(p))
                    lab._draw(label, tuple(p), q)
        _wait(app, lambda: not w.busy and w.updates > 0)
        w.set_model("mitochondria_em2d")
        _wait(app, lambda: not w.busy and w.model_source is not None)
        viewer.layers[PROB_PREFIX + "background"].visible = False
        viewer.layers[PROB_PREFIX + "mitochondria"].visible = False
        viewer.layers.selection.active = lab
        viewer.reset_view()
        _wait(app, lambda: not w.busy)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.05)
        shot = viewer.screenshot(canvas_only=False, flash=False)
        canvas = viewer.screenshot(canvas_only=True, flash=False)
        if canvas[..., :3].max() == 0:
            print("warning: the canvas rendered black (no OpenGL?); the screenshot shows the widget only")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot).convert("RGB").save(args.out, optimize=True)
        print(f"wrote {args.out} {shot.shape[1]}x{shot.shape[0]}; status: {w.status}")
        viewer.close()
    finally:
        if xvfb is not None:
            xvfb.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
