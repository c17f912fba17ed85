"""The TrainableDomainAdaptation workflow object and the `tda demo` command."""

import json

import numpy as np
import pytest

from operators.kernels.synthetic import em_like
from tda_graph import Roi, SettingsError
from tda_graph.frontends.cli import main
from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation
from tda_graph.workflows.strokes import simulate_strokes


@pytest.fixture
def em():
    return em_like((192, 192), seed=3)


def paint_truth(wf, gt, n=150, seed=0):
    with wf.strokes():
        for s in simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=n, seed=seed):
            wf.paint(s.roi, s.mask, s.label)


def test_workflow_outputs_by_name_and_roi_equals_full(em):
    gt = em.mitochondria > 0
    with TrainableDomainAdaptation(em.raw, n_trees=15, workers=2) as wf:
        paint_truth(wf, gt)
        full = wf.request("probabilities")
        assert full.shape == (192, 192, 2)
        np.testing.assert_array_equal(
            wf.request("probabilities", Roi((10, 20, 1), (50, 90, 2))), full[10:50, 20:90, 1:]
        )
        seg = wf.request("segmentation")
        np.testing.assert_array_equal(seg, full.argmax(-1) + 1)
        assert wf.probabilities.counters["trainings"] == 1
        iou = ((seg == 2) & gt).sum() / ((seg == 2) | gt).sum()
        assert iou > 3 * gt.mean()
        assert wf.request("features").shape[-1] == wf.features.spec.n_channels


def test_workflow_subscribe_freeze_and_errors(em):
    gt = em.mitochondria > 0
    wf = TrainableDomainAdaptation(em.raw, n_trees=10, workers=1)
    events = []
    sub = wf.subscribe("segmentation", events.append)
    paint_truth(wf, gt)
    assert len(events) == 1  # one batch of strokes, one event
    before = wf.request("segmentation")
    wf.freeze()
    trainings = wf.probabilities.counters["trainings"]
    wf.paint(Roi((0, 0), (1, 40)), np.ones((1, 40), bool), 2)
    np.testing.assert_array_equal(wf.request("segmentation"), before)  # live update off
    wf.graph.set_cache_budget(0)  # even blocks that must be computed again use the frozen forest
    np.testing.assert_array_equal(wf.request("segmentation", Roi((0, 0), (64, 64))), before[:64, :64])
    assert wf.probabilities.counters["trainings"] == trainings  # nothing trained while frozen
    wf.unfreeze()
    wf.graph.set_cache_budget(1 << 30)
    wf.request("segmentation")
    assert wf.probabilities.counters["trainings"] == trainings + 1
    assert wf.request("probabilities").shape == (192, 192, 2)
    with pytest.raises(SettingsError, match="unknown output 'probs'; choose one of"):
        wf.output("probs")
    with pytest.raises(SettingsError, match="needs an enhancer"):
        wf.output("enhanced")
    with pytest.raises(SettingsError, match="channel must be a label value between 1 and 2"):
        TrainableDomainAdaptation(em.raw, channel=3)
    with pytest.raises(SettingsError, match="cannot guess the axes of a 4-D image"):
        TrainableDomainAdaptation(np.zeros((2, 2, 2, 2)))
    sub.disconnect()
    wf.paint(Roi((5, 0), (6, 40)), np.ones((1, 40), bool), 1)
    assert len(events) == 2  # the unfreeze released one merged event; none after disconnect
    wf.close()


def test_demo_command_writes_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "256", "--trees", "20", "--pixels", "40"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"] == "membranes"
    assert summary["forest_iou"] > 2 * summary["chance_iou"]
    assert summary["enhanced_iou"] > summary["forest_iou"]  # the bundled membranes enhancer helps here
    assert summary["pixels_predicted_after_stroke"] == 256 * 256
    assert (tmp_path / "overview.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--size", "0"], "--size 0: give an image side of at least 64"),
        (["--out", "FILE"], "a file of that name exists"),
    ],
)
def test_demo_bad_arguments_are_clear_errors(tmp_path, capsys, argv, match):
    (tmp_path / "FILE").write_text("user data")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    assert main(["demo", "--size", "64", "--trees", "2", "--out", str(tmp_path / "out"), *argv]) == 2
    assert match in capsys.readouterr().err
    assert (tmp_path / "FILE").read_text() == "user data" and not (tmp_path / "out").exists()


def test_demo_with_test_time_augmentation(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--size", "256", "--trees", "20", "--pixels", "40"]
    assert main([*args, "--tta"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["enhancer"] == "membranes_em2d (bundled, tta)"
    assert summary["enhanced_iou"] > summary["forest_iou"]


def test_workflow_with_enhancer_channel_and_stroke(shared_data):
    model = shared_data.parent / "models" / "unet2d_nuclei_broad"
    if not model.exists():
        pytest.skip("shared model package absent")
    em = em_like((512, 512), seed=2)
    gt = em.mitochondria > 0
    with TrainableDomainAdaptation(em.raw, n_trees=10, workers=2, class_names=("bg", "mito")) as wf:
        paint_truth(wf, gt, n=150)
        wf.set_enhancer(str(model))
        enhanced = wf.request("enhanced")
        assert enhanced.shape[:2] == (512, 512) and enhanced.dtype == np.float32
        assert np.isfinite(enhanced).all()
        np.testing.assert_array_equal(wf.request("enhancer_input")[..., 0], wf.request("probabilities")[..., 1])
        events = []
        sub = wf.subscribe("enhanced", events.append)
        wf.set_channel(1)
        assert events and wf.channel == 1
        np.testing.assert_array_equal(wf.request("enhancer_input")[..., 0], wf.request("probabilities")[..., 0])
        sub.disconnect()


def test_bundled_enhancer_set_and_removed(em):
    gt = em.mitochondria > 0
    with TrainableDomainAdaptation(em.raw, n_trees=10, workers=1) as wf:
        paint_truth(wf, gt)
        wf.set_enhancer("mitochondria_em2d")
        out = wf.request("enhanced", Roi((0, 0, 0), (96, 96, 1)))
        assert out.shape == (96, 96, 1) and 0.0 <= out.min() and out.max() <= 1.0
        wf.remove_enhancer()
        assert wf.enhanced is None
        with pytest.raises(SettingsError, match="needs an enhancer"):
            wf.request("enhanced")
        assert wf.request("probabilities").shape == (192, 192, 2)  # the rest keeps working
        wf.remove_enhancer()  # idempotent
