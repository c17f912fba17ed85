"""`tda train` / `tda predict`: headless training, blockwise resumable prediction, clear errors."""

import signal

import h5py
import numpy as np
import pytest

from operators.kernels.synthetic import em_like
from tda_graph.frontends.cli import main
from tda_graph.models import bundled_enhancers
from tda_graph.workflows.headless import predict_to_file
from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation
from tda_graph.workflows.project import load_project
from tda_graph.workflows.strokes import simulate_strokes


def sparse_labels(gt, n=200, seed=0):
    lab = np.zeros(gt.shape, np.uint8)
    for s in simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=n, seed=seed):
        lab[s.roi.to_slices()][s.mask] = s.label
    return lab


@pytest.fixture
def trained(tmp_path):
    em = em_like((300, 260), seed=1)
    gt = em.mitochondria > 0
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f["raw"] = em.raw
        f["labels"] = sparse_labels(gt)
        f["vol"] = np.stack([em.raw] * 3)
    proj = tmp_path / "p.tdap"
    args = ["train", "--image", f"{tmp_path}/img.h5:/raw", "--labels", f"{tmp_path}/img.h5:/labels"]
    assert main([*args, "--project", str(proj), "--trees", "15"]) == 0
    return tmp_path, proj, em


def python_api_result(proj, raw, export):
    state = load_project(proj)
    with TrainableDomainAdaptation(raw, selection=state.selection, class_names=state.labels.class_names) as wf:
        wf.probabilities.set_forest(state.forest)
        return wf.request(export)


@pytest.mark.parametrize("export", ["probabilities", "segmentation", "uncertainty"])
def test_predict_equals_python_api(trained, export):
    d, proj, em = trained
    out = f"{d}/out.h5:/{export}"
    assert (
        main(
            [
                "predict",
                "--project",
                str(proj),
                "--input",
                f"{d}/img.h5:/raw",
                "--output",
                out,
                "--export",
                export,
                "--memory",
                "40M",
                "--quiet",
            ]
        )
        == 0
    )
    with h5py.File(d / "out.h5") as f:
        got = f[export][...]
    np.testing.assert_array_equal(got, python_api_result(proj, em.raw, export))
    assert not (d / "out.h5.tda-partial").exists()


def test_resumed_prediction_is_identical_and_skips_done_blocks(trained):
    d, proj, em = trained
    full = predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/a.zarr", "probabilities", memory=20_000_000)
    assert full["blocks"] > 2
    part = predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/b.zarr", "probabilities", memory=20_000_000, stop_after=2)
    assert not part["finished"] and not (d / "b.zarr").exists()
    rest = predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/b.zarr", "probabilities", memory=20_000_000)
    assert rest["skipped"] == 2 and rest["computed"] == full["blocks"] - 2
    import zarr

    np.testing.assert_array_equal(
        zarr.open_group(str(d / "a.zarr"))["data"][...], zarr.open_group(str(d / "b.zarr"))["data"][...]
    )


def test_roi_and_tiff_output(trained):
    d, proj, em = trained
    assert (
        main(
            [
                "predict",
                "--project",
                str(proj),
                "--input",
                f"{d}/img.h5:/raw",
                "--output",
                f"{d}/s.tif",
                "--export",
                "segmentation",
                "--roi",
                "10:200,50:",
                "--quiet",
            ]
        )
        == 0
    )
    import tifffile

    got = tifffile.imread(d / "s.tif")
    np.testing.assert_array_equal(got, python_api_result(proj, em.raw, "segmentation")[10:200, 50:])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "{d}/missing.h5:/raw"], "missing.h5"),
        (["--input", "{d}/img.h5:/nope"], "nope"),
        (["--input", "{d}/img.h5:/raw", "--axes", "zyx"], "axes"),
        (["--input", "{d}/img.h5:/vol"], "trained on 2D data"),
        (["--input", "{d}/img.h5:/raw", "--roi", "0:999,0:10"], "outside"),
        (["--input", "{d}/img.h5:/raw", "--memory", "lots"], "not a size"),
    ],
)
def test_bad_predict_input_exits_nonzero_with_message(trained, capsys, argv, message):
    d, proj, em = trained
    argv = [a.format(d=d) for a in argv]
    assert main(["predict", "--project", str(proj), "--output", f"{d}/o.h5:/x", "--quiet", *argv]) != 0
    assert message in capsys.readouterr().err


def test_bad_training_input_and_corrupt_project(tmp_path, capsys):
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f["raw"] = np.zeros((64, 64), np.uint8)
        f["empty"] = np.zeros((64, 64), np.uint8)
        f["small"] = np.zeros((32, 64), np.uint8)
        one = np.zeros((64, 64), np.uint8)
        one[5, 5:20] = 1
        f["one"] = one
    base = ["train", "--image", f"{tmp_path}/img.h5:/raw", "--project", str(tmp_path / "p.tdap")]
    assert main([*base, "--labels", f"{tmp_path}/img.h5:/empty"]) != 0
    assert "is empty" in capsys.readouterr().err
    assert main([*base, "--labels", f"{tmp_path}/img.h5:/small"]) != 0
    assert "same size" in capsys.readouterr().err
    assert main([*base, "--labels", f"{tmp_path}/img.h5:/one"]) != 0
    assert "at least two classes" in capsys.readouterr().err
    assert not (tmp_path / "p.tdap").exists()  # nothing half-written
    (tmp_path / "bad.tdap").write_bytes(b"not a project at all")
    assert (
        main(
            [
                "predict",
                "--project",
                str(tmp_path / "bad.tdap"),
                "--input",
                f"{tmp_path}/img.h5:/raw",
                "--output",
                f"{tmp_path}/o.h5:/x",
            ]
        )
        != 0
    )
    assert "bad.tdap" in capsys.readouterr().err


def test_train_and_predict_on_isbi_match_python_api(shared_data, tmp_path):
    with h5py.File(shared_data / "isbi2012_train.h5", "r") as f:
        raw = f["raw"][0, :256, :256]
        membranes = f["membranes"][0, :256, :256] > 0
    with h5py.File(tmp_path / "isbi.h5", "w") as f:
        f["raw"] = raw
        f["labels"] = sparse_labels(membranes, n=300)
    proj = tmp_path / "isbi.tdap"
    assert (
        main(
            [
                "train",
                "--image",
                f"{tmp_path}/isbi.h5:/raw",
                "--labels",
                f"{tmp_path}/isbi.h5:/labels",
                "--project",
                str(proj),
                "--trees",
                "20",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--project",
                str(proj),
                "--input",
                f"{tmp_path}/isbi.h5:/raw",
                "--output",
                f"{tmp_path}/out.h5:/p",
                "--quiet",
                "--memory",
                "30M",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["p"][...]
    np.testing.assert_array_equal(got, python_api_result(proj, raw, "probabilities"))
    pred = got[..., 1] > 0.5
    iou = (pred & membranes).sum() / (pred | membranes).sum()
    assert iou > 1.5 * membranes.mean()


def test_enhanced_export_with_a_model_package(trained, shared_data, capsys):
    d, _, em = trained
    model = shared_data.parent / "models" / "unet2d_nuclei_broad"
    if not model.exists():
        pytest.skip("shared model package absent")
    proj = d / "enh.tdap"
    args = ["train", "--image", f"{d}/img.h5:/raw", "--labels", f"{d}/img.h5:/labels", "--trees", "5"]
    assert main([*args, "--project", str(proj), "--enhancer", str(model), "--channel", "2"]) == 0
    state = load_project(proj)
    assert state.enhancer is not None and state.enhancer.sha256 and state.channel == 2
    assert (
        main(
            [
                "predict",
                "--project",
                str(proj),
                "--input",
                f"{d}/img.h5:/raw",
                "--output",
                f"{d}/e.h5:/enh",
                "--export",
                "enhanced",
                "--quiet",
            ]
        )
        == 0
    )
    with h5py.File(d / "e.h5") as f:
        enh = f["enh"][...]
    assert enh.shape[:2] == (300, 260) and enh.dtype == np.float32 and np.isfinite(enh).all()
    with TrainableDomainAdaptation(em.raw, selection=state.selection, class_names=state.labels.class_names) as wf:
        wf.probabilities.set_forest(state.forest)
        wf.set_enhancer(str(model))
        np.testing.assert_array_equal(enh, wf.request("enhanced"))
    # a project without an enhancer, and a package that does not load
    assert (
        main(
            [
                "predict",
                "--project",
                str(d / "p.tdap"),
                "--input",
                f"{d}/img.h5:/raw",
                "--output",
                f"{d}/x.h5:/e",
                "--export",
                "enhanced",
                "--quiet",
            ]
        )
        != 0
    )
    assert "no enhancer" in capsys.readouterr().err
    (d / "broken").mkdir()
    (d / "broken" / "bioimageio.yaml").write_text("format_version: 0.5.3\ntype: model\n")
    assert main([*args, "--project", str(d / "b.tdap"), "--enhancer", str(d / "broken")]) != 0
    assert "broken" in capsys.readouterr().err
    assert main([*args, "--project", str(d / "b.tdap"), "--enhancer", "no_such_model"]) != 0
    assert "neither a bundled enhancer" in capsys.readouterr().err


def test_info_shows_project_and_graph(trained, capsys):
    d, proj, _ = trained
    assert main(["info", "--project", str(proj), "--input", f"{d}/img.h5:/raw"]) == 0
    out = capsys.readouterr().out
    assert "forest: 15 trees" in out and "classes: 1=class 1" in out
    assert "probabilities    yxc   (300, 260, 2) float32 cached" in out


def test_state_dict_enhancer_needs_allow_code(trained, tmp_path, capsys):
    """A package with only pytorch_state_dict weights: refused without --allow-code at train and predict."""
    from test_enhancer import _state_dict_package

    d, _, _ = trained
    pkg, marker = _state_dict_package(tmp_path)
    proj = d / "code.tdap"
    args = ["train", "--image", f"{d}/img.h5:/raw", "--labels", f"{d}/img.h5:/labels", "--trees", "5"]
    assert main([*args, "--project", str(proj), "--enhancer", str(pkg)]) == 2
    err = capsys.readouterr().err
    assert "only pytorch_state_dict weights, which run Python code from the package" in err and "--allow-code" in err
    assert not proj.exists() and not marker.exists()
    assert main([*args, "--project", str(proj), "--enhancer", str(pkg), "--allow-code"]) == 0
    predict = ["predict", "--project", str(proj), "--input", f"{d}/img.h5:/raw", "--export", "enhanced", "--quiet"]
    marker.unlink(missing_ok=True)
    assert main([*predict, "--output", f"{d}/e.h5:/e"]) == 2  # the permission is not stored in the project
    assert "--allow-code" in capsys.readouterr().err
    assert not (d / "e.h5").exists() and not marker.exists()
    assert main([*predict, "--output", f"{d}/e.zarr", "--scheduler", "local:1"]) == 2  # dask workers too
    assert "--allow-code" in capsys.readouterr().err
    assert main([*predict, "--output", f"{d}/e.h5:/e", "--allow-code"]) == 0
    with h5py.File(d / "e.h5") as f:
        single = f["e"][...]
    assert single.shape == (300, 260, 1) and np.isfinite(single).all()
    assert marker.exists()
    assert main([*predict, "--output", f"{d}/e.zarr", "--scheduler", "local:1", "--allow-code"]) == 0
    import zarr

    np.testing.assert_array_equal(zarr.open_group(str(d / "e.zarr"))["data"][...], single)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_predict_process_resumes_identically(trained):
    """A real `tda predict` process killed mid-run: the re-run skips its finished blocks, output identical."""
    import subprocess
    import sys
    import time

    d, proj, em = trained
    argv = ["predict", "--project", str(proj), "--input", f"{d}/img.h5:/raw", "--export", "probabilities"]
    argv += ["--memory", "4M", "--workers", "1", "--quiet"]  # many small blocks
    assert main([*argv, "--output", f"{d}/ref.h5:/p"]) == 0
    with h5py.File(d / "ref.h5") as f:
        ref = f["p"][...]
    out = f"{d}/k.h5:/p"
    code = "import sys; from tda_graph.frontends.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--output", out])
    partial = d / "k.h5.tda-partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and len(list(partial.glob("block_*.npy"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (d / "k.h5").exists()  # the output appears only when complete
    done_before = len(list(partial.glob("block_*.npy")))
    res = predict_to_file(proj, f"{d}/img.h5:/raw", out, "probabilities", memory=4_000_000, workers=1)
    assert res["finished"] and res["skipped"] == done_before and res["computed"] >= 1
    with h5py.File(d / "k.h5") as f:
        np.testing.assert_array_equal(f["p"][...], ref)


def test_train_reads_chunked_labels_block_by_block(tmp_path, monkeypatch):
    from operators import file_sources
    from operators.file_sources import open_image
    from tda_graph.workflows.headless import _sparse_label_blocks

    monkeypatch.setattr(file_sources, "MIN_BLOCK_BYTES", 1)  # a cache grid of single chunks

    em = em_like((96, 80), seed=3)
    lab = sparse_labels(em.mitochondria > 0, n=60)
    lab[:, 40:] = 0  # the right half holds no labels
    with h5py.File(tmp_path / "l.h5", "w") as f:
        f["raw"] = em.raw
        f.create_dataset("labels", data=lab, chunks=(32, 40))
        f.create_dataset("wide", data=np.where(lab == 2, 300, lab.astype(np.uint16)), chunks=(32, 40))
    parts = _sparse_label_blocks(open_image(f"{tmp_path}/l.h5:/labels"), "labels")
    rebuilt = np.zeros_like(lab)
    for start, blk in parts:
        assert blk.dtype == np.uint8 and blk.any()
        rebuilt[tuple(slice(s, s + n) for s, n in zip(start, blk.shape))] = blk
    np.testing.assert_array_equal(rebuilt, lab)
    assert 0 < len(parts) <= 3 and all(start[1] < 40 for start, _ in parts)  # 6 chunks, empty ones not kept

    proj = tmp_path / "p.tdap"
    img, labels = f"{tmp_path}/l.h5:/raw", f"{tmp_path}/l.h5:/labels"
    assert main(["train", "--image", img, "--labels", labels, "--project", str(proj), "--trees", "5"]) == 0
    np.testing.assert_array_equal(load_project(proj).labels.to_dense(), lab)
    with pytest.raises(Exception, match=r"integers 0\.\.255.*found 300 in block"):
        _sparse_label_blocks(open_image(f"{tmp_path}/l.h5:/wide"), "wide")


@pytest.mark.skipif("mitochondria_em2d" not in bundled_enhancers(), reason="bundled enhancer not installed")
def test_tta_is_stored_in_the_project_and_used_by_predict(trained, capsys):
    d, _, _ = trained
    args = ["train", "--image", f"{d}/img.h5:/raw", "--labels", f"{d}/img.h5:/labels", "--trees", "5"]
    assert main([*args, "--project", str(d / "t.tdap"), "--tta"]) != 0
    assert "tta needs an enhancer" in capsys.readouterr().err
    outputs = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        proj = d / f"{name}.tdap"
        assert main([*args, "--project", str(proj), "--enhancer", "mitochondria_em2d", *extra]) == 0
        assert load_project(proj).enhancer.tta is bool(extra)
        out = f"{d}/{name}.h5:/enh"
        predict = ["predict", "--project", str(proj), "--input", f"{d}/img.h5:/raw", "--output", out]
        assert main([*predict, "--export", "enhanced", "--quiet"]) == 0
        with h5py.File(d / f"{name}.h5") as f:
            outputs[name] = f["enh"][...]
    assert outputs["tta"].shape == outputs["plain"].shape
    assert np.abs(outputs["tta"] - outputs["plain"]).max() > 1e-3  # the stored flag reached the enhancer


@pytest.mark.skipif("boundaries_em3d" not in bundled_enhancers(), reason="bundled 3D enhancer not installed")
def test_3d_enhancer_trains_and_predicts_on_a_volume_and_refuses_2d_data(tmp_path, capsys):
    em = em_like((32, 96, 96), seed=2, cell_size=24.0)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["raw"], f["labels"] = em.raw, sparse_labels(em.membranes > 0, n=150)
        f["flat"], f["flat_labels"] = em.raw[0], sparse_labels(em.membranes[0] > 0, n=80)
    proj = tmp_path / "vol.tdap"
    train = ["train", "--image", f"{tmp_path}/vol.h5:/raw", "--labels", f"{tmp_path}/vol.h5:/labels"]
    assert main([*train, "--project", str(proj), "--trees", "5", "--enhancer", "boundaries_em3d"]) == 0
    out = f"{tmp_path}/enh.h5:/enh"
    predict = ["predict", "--project", str(proj), "--input", f"{tmp_path}/vol.h5:/raw", "--output", out]
    assert main([*predict, "--export", "enhanced", "--quiet"]) == 0
    with h5py.File(tmp_path / "enh.h5") as f:
        enh = f["enh"][...]
    assert enh.shape == (32, 96, 96, 1) and np.isfinite(enh).all() and 0 <= enh.min() <= enh.max() <= 1
    # the 3D network keeps the boundaries: more probability on them than off them
    on = em.membranes > 0
    assert enh[..., 0][on].mean() > enh[..., 0][~on].mean() + 0.2
    flat = ["train", "--image", f"{tmp_path}/vol.h5:/flat", "--labels", f"{tmp_path}/vol.h5:/flat_labels"]
    assert main([*flat, "--project", str(tmp_path / "f.tdap"), "--trees", "5", "--enhancer", "boundaries_em3d"]) != 0
    assert "works on 'zyx' data" in capsys.readouterr().err
