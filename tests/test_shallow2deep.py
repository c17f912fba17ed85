"""Shallow2deep enhancer training, export and the bundled enhancer packages (fast, synthetic data)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bioimageio.core")

from operators.kernels.synthetic import em_like  # noqa: E402
from tda_graph.errors import SettingsError  # noqa: E402
from tda_graph.models import bundled_enhancer, bundled_enhancers  # noqa: E402
from tda_graph.workflows import shallow2deep as s2d  # noqa: E402


@pytest.fixture(scope="module")
def pairs() -> list[s2d.ForestPair]:
    im = em_like((160, 160), seed=3)
    return s2d.make_forest_predictions([im.raw], [im.mitochondria], 2, patch=64, crop=96, n_trees=5, seed=0)


def test_forest_pairs_shapes_and_ranges(pairs: list[s2d.ForestPair]) -> None:
    assert len(pairs) == 2
    for p in pairs:
        assert p.probability.shape == p.target.shape == (96, 96)
        assert p.probability.dtype == np.float32
        assert 0.0 <= p.probability.min() and p.probability.max() <= 1.0
        assert set(np.unique(p.target)) <= {0.0, 1.0}
        assert p.n_labels > 0
    # the forests learnt something: foreground pixels get higher probability on average
    fg = np.mean([p.probability[p.target > 0].mean() for p in pairs])
    bg = np.mean([p.probability[p.target == 0].mean() for p in pairs])
    assert fg > bg


def test_forest_pairs_are_seeded() -> None:
    im = em_like((128, 128), seed=4)
    a = s2d.make_forest_predictions([im.raw], [im.mitochondria], 2, patch=48, crop=64, n_trees=3, seed=7)
    b = s2d.make_forest_predictions([im.raw], [im.mitochondria], 2, patch=48, crop=64, n_trees=3, seed=7)
    for x, y in zip(a, b):
        assert x.source == y.source
        np.testing.assert_array_equal(x.probability, y.probability)


def test_random_feature_subsets_vary_and_keep_whole_types_and_scales() -> None:
    rng = np.random.default_rng(0)
    pool = list(s2d.SHALLOW2DEEP_FEATURES)
    seen = set()
    for _ in range(50):
        sub = s2d._random_feature_subset(pool, rng)
        assert sub and set(sub) <= set(pool)
        names, sigmas = {f for f, _ in sub}, {s for _, s in sub}
        assert set(sub) == {(f, s) for f, s in pool if f in names and s in sigmas}  # a full grid of the kept ones
        seen.add(tuple(sub))
    assert len(seen) > 20


def test_forest_pairs_with_varied_features_are_seeded_and_differ() -> None:
    im = em_like((128, 128), seed=4)
    kw = dict(patch=48, crop=64, n_trees=3, seed=7)
    a = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, vary_features=True, **kw)
    b = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, vary_features=True, **kw)
    plain = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.probability, y.probability)
    assert any(not np.array_equal(x.probability, y.probability) for x, y in zip(a, plain))


@pytest.mark.parametrize("seed", range(12))  # both label kinds (points, strokes) occur
def test_background_labels_avoid_the_given_structures(seed: int) -> None:
    im = em_like((128, 128), seed=6)
    target = im.mitochondria > 0
    avoid = (im.membranes > 0) & ~target
    window = (slice(16, 112), slice(8, 120))
    labels = s2d._sparse_labels(target, window, np.random.default_rng(seed), avoid)
    assert (labels[avoid] != 1).all()  # no background label on a membrane
    assert (labels == 1).sum() >= 20 and (labels == 2).sum() >= 1
    assert (labels[~target] != 2).all() and (labels[target] != 1).all()
    # a window with nothing but avoided background: fall back to all of the background
    everything = np.ones_like(target)
    labels = s2d._sparse_labels(target, window, np.random.default_rng(seed), everything)
    assert (labels == 1).sum() >= 20
    # inside: the background labels lie on the structures only (a user painting membranes as background)
    labels = s2d._sparse_labels(target, window, np.random.default_rng(seed), avoid, inside=True)
    assert (labels == 1).sum() >= 1 and (labels[~avoid] != 1).all()
    assert (labels[target] != 1).all() and (labels == 2).sum() >= 1
    labels = s2d._sparse_labels(target, window, np.random.default_rng(seed), np.zeros_like(target), inside=True)
    assert (labels == 1).sum() >= 20  # no such structure in the window: all of the background


def test_forest_pairs_with_avoided_background_are_seeded_and_change_the_forests() -> None:
    im = em_like((128, 128), seed=4)
    kw = dict(patch=48, crop=64, n_trees=3, seed=8)
    avoid = [(im.membranes > 0) & (im.mitochondria == 0)]
    a = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, avoid=avoid, avoid_share=1.0, **kw)
    b = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, avoid=avoid, avoid_share=1.0, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.probability, y.probability)
    # forests that never saw a membrane as background score membranes higher
    plain = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, **kw)

    def on_membranes(pairs: list[s2d.ForestPair]) -> float:
        crops = [(im.membranes > 0)[p.source[2] : p.source[2] + 64, p.source[3] : p.source[3] + 64] for p in pairs]
        return float(np.mean([p.probability[m].mean() for p, m in zip(pairs, crops)]))

    assert on_membranes(a) > on_membranes(plain) + 0.1
    # avoid_inside 0 draws nothing more: the same forests as without the option
    kw_avoid = dict(avoid=avoid, avoid_share=1.0, **kw)
    zero = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, avoid_inside=0.0, **kw_avoid)
    for x, y in zip(a, zero):
        np.testing.assert_array_equal(x.probability, y.probability)
    # background painted on membranes only: the forests take the cytoplasm for foreground
    inside = s2d.make_forest_predictions([im.raw], [im.mitochondria], 3, avoid_inside=1.0, **kw_avoid)

    def on_cytoplasm(pairs: list[s2d.ForestPair]) -> float:
        cyto = (im.membranes == 0) & (im.mitochondria == 0)
        crops = [cyto[p.source[2] : p.source[2] + 64, p.source[3] : p.source[3] + 64] for p in pairs]
        return float(np.mean([p.probability[m].mean() for p, m in zip(pairs, crops)]))

    assert on_cytoplasm(inside) > on_cytoplasm(plain) + 0.1
    with pytest.raises(ValueError, match="one avoid mask per image"):
        s2d.make_forest_predictions([im.raw], [im.mitochondria], 1, avoid=[im.membranes[:10]], **kw)
    with pytest.raises(ValueError, match="avoid_share must be in"):
        s2d.make_forest_predictions([im.raw], [im.mitochondria], 1, avoid=avoid, avoid_share=1.5, **kw)
    with pytest.raises(ValueError, match="avoid_inside must be in"):
        s2d.make_forest_predictions([im.raw], [im.mitochondria], 1, avoid=avoid, avoid_inside=-0.1, **kw)
    with pytest.raises(ValueError, match="avoid_inside needs avoid masks"):
        s2d.make_forest_predictions([im.raw], [im.mitochondria], 1, avoid_inside=0.5, **kw)


def test_bin_means_blocks() -> None:
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(s2d._bin(a, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert s2d._bin(a, 1).dtype == np.float32


def test_forest_pairs_at_coarser_scales() -> None:
    # factor 2: crops of the 2x-binned slice; the target is the majority of each 2x2 block
    im = em_like((200, 200), seed=5)
    pairs = s2d.make_forest_predictions(
        [im.raw], [im.mitochondria], 6, patch=48, crop=64, n_trees=3, seed=1, scales=(1, 2)
    )
    assert {p.probability.shape for p in pairs} == {(64, 64)}
    seen = set()
    for p in pairs:
        _, z, y0, x0 = p.source
        binned = s2d._bin(im.mitochondria > 0, 2)[y0 : y0 + 64, x0 : x0 + 64] >= 0.5
        full = (im.mitochondria > 0)[y0 : y0 + 64, x0 : x0 + 64]
        match = {f for f, t in ((1, full), (2, binned)) if np.array_equal(p.target > 0, t)}
        assert match
        seen |= match
    assert seen == {1, 2}
    with pytest.raises(ValueError, match="integer downsampling factors"):
        s2d.make_forest_predictions([im.raw], [im.mitochondria], 1, scales=(0,))


def test_cli_scales_option() -> None:
    assert s2d._parse_scales("1,2,4") == [1, 2, 4]
    with pytest.raises(s2d.SettingsError, match="--scales 'x'"):
        s2d._parse_scales("x")


def _tiny_trained(pairs: list[s2d.ForestPair], seed: int) -> tuple[object, list[float]]:
    torch.manual_seed(seed)
    model = s2d.build_unet(depth=2, width=4)
    losses = s2d.train_unet(model, pairs, iterations=2, batch_size=2, patch=64, seed=seed)
    return model, losses


def test_unet_training_is_deterministic(pairs: list[s2d.ForestPair], tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m1, l1 = _tiny_trained(pairs, seed=5)
        m2, l2 = _tiny_trained(pairs, seed=5)
        m3, _ = _tiny_trained(pairs, seed=6)
    finally:
        torch.set_num_threads(threads)
    assert len(l1) == 2 and l1 == l2
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))
    x = torch.rand(1, 1, 64, 64)
    y = m1(x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_checkpoint_written(pairs: list[s2d.ForestPair], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = s2d.build_unet(depth=2, width=4)
    ckpt = tmp_path / "ckpt.pt"
    s2d.train_unet(model, pairs, iterations=1, batch_size=1, patch=64, checkpoint=ckpt)
    state = torch.load(ckpt)
    assert state["iteration"] == 1 and len(state["losses"]) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recalibration_is_a_monotone_remap_that_moves_levels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = rng.random((32, 32)).astype(np.float32)
    out = s2d._recalibrate(prob, np.random.default_rng(seed), 1.5)
    assert out.dtype == np.float32 and 0.0 < out.min() and out.max() < 1.0
    order = np.argsort(prob, axis=None)
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # same ranking: shapes are kept, levels move
    assert np.abs(out - prob).max() > 0.05
    # strength 0 is the identity (up to the 1e-4 clip)
    np.testing.assert_allclose(s2d._recalibrate(prob, rng, 0.0), np.clip(prob, 1e-4, 1 - 1e-4), atol=1e-6)


def test_calibration_augmentation_changes_inputs_not_targets(pairs: list[s2d.ForestPair]) -> None:
    p = pairs[0]
    plain_x, plain_y = s2d._sample_batch(pairs, 8, 64, np.random.default_rng(3))
    cal_x, cal_y = s2d._sample_batch(pairs, 8, 64, np.random.default_rng(3), calibration=1.5)
    assert cal_x.shape == plain_x.shape and 0.0 <= cal_x.min() and cal_x.max() <= 1.0
    assert np.abs(cal_x - plain_x).max() > 0.05
    assert set(np.unique(cal_y)) <= {0.0, 1.0} and p.target.dtype == np.float32
    with pytest.raises(SettingsError, match="calibration must be a finite number >= 0"):
        s2d.train_unet(s2d.build_unet(depth=2, width=4), pairs, iterations=1, patch=64, calibration=-1.0)


def test_init_weights_from_package_checkpoint_and_torchscript(pairs: list[s2d.ForestPair], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = s2d.build_unet(depth=2, width=4)
    ckpt = tmp_path / "ckpt.pt"
    s2d.train_unet(model, pairs, iterations=1, batch_size=1, patch=64, checkpoint=ckpt)
    pkg = s2d.export_enhancer(
        model,
        tmp_path / "pkg",
        name="tiny enhancer",
        description="fine-tuning test",
        halo=8,
        min_size=64,
        step=16,
        test_input=pairs[0].probability[:64, :64],
    )
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want = model(x)
    for source in (pkg, pkg / "weights_torchscript.pt", ckpt):
        torch.manual_seed(1)  # another random start, overwritten by the loaded weights
        fresh = s2d.build_unet(depth=2, width=4).eval()
        s2d.load_initial_weights(fresh, source)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), want)


def test_init_weights_errors_name_the_problem(tmp_path: Path) -> None:
    model = s2d.build_unet(depth=2, width=4)
    with pytest.raises(SettingsError, match="no such file or folder"):
        s2d.load_initial_weights(model, tmp_path / "missing")
    with pytest.raises(SettingsError, match="no bioimageio.yaml"):
        s2d.load_initial_weights(model, tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(SettingsError, match="not TorchScript weights or a training checkpoint"):
        s2d.load_initial_weights(model, junk)
    bundled = bundled_enhancer("mitochondria_em2d")  # depth 3, width 16
    with pytest.raises(SettingsError, match="does not match a 2D U-Net of depth 2 and width 4.*--depth, --width"):
        s2d.load_initial_weights(model, bundled)
    flat_to_3d = s2d.build_unet(depth=3, width=16, ndim=3)  # same weight names, 5D kernels
    with pytest.raises(SettingsError, match="does not match a 3D U-Net of depth 3.*--ndim"):
        s2d.load_initial_weights(flat_to_3d, bundled)


def test_export_passes_bioimageio_test(pairs: list[s2d.ForestPair], tmp_path: Path) -> None:
    from bioimageio.core import load_model_description
    from bioimageio.spec.model import v0_5

    torch.manual_seed(0)
    model = s2d.build_unet(depth=2, width=4)
    pkg = s2d.export_enhancer(
        model,
        tmp_path / "tiny",
        name="tiny test enhancer",
        description="a tiny enhancer for the tests",
        halo=8,
        min_size=32,
        step=16,
        test_input=pairs[0].probability[:96, :96],
    )
    assert (pkg / "bioimageio.yaml").is_file()
    for f in ("README.md", "cover.png", "test_input.npy", "test_output.npy", "weights_torchscript.pt"):
        assert (pkg / f).is_file(), f
    descr = load_model_description(pkg / "bioimageio.yaml")
    assert isinstance(descr, v0_5.ModelDescr)
    assert str(descr.license) == "MIT"
    assert any(c.doi is not None and str(c.doi) == "10.3389/fcomp.2022.805166" for c in descr.cite)
    axes = descr.inputs[0].axes
    assert [str(a.id) for a in axes] == ["batch", "channel", "y", "x"]
    assert axes[2].size.min == 32 and axes[2].size.step == 16
    assert descr.outputs[0].axes[2].halo == 8
    # the traced weights reproduce the stored test output
    ts = torch.jit.load(str(pkg / "weights_torchscript.pt"))
    x = np.load(pkg / "test_input.npy")
    np.testing.assert_allclose(ts(torch.from_numpy(x)).detach().numpy(), np.load(pkg / "test_output.npy"), atol=1e-5)
    assert s2d.check_package(pkg) == "passed"


def test_export_rejects_invalid_test_size(pairs: list[s2d.ForestPair], tmp_path: Path) -> None:
    model = s2d.build_unet(depth=2, width=2)
    with pytest.raises(ValueError, match="min_size"):
        s2d.export_enhancer(
            model,
            tmp_path / "x",
            name="bad size",
            description="d",
            halo=4,
            min_size=32,
            step=16,
            test_input=np.zeros((40, 40)),
        )


def test_bundled_enhancers_load() -> None:
    from bioimageio.core import load_model_description
    from bioimageio.spec.model import v0_5

    found = bundled_enhancers()
    assert {"mitochondria_em2d", "membranes_em2d"} <= set(found)
    for name, path in found.items():
        assert bundled_enhancer(name) == path
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        assert size < 10 * 2**20, (name, size)  # a few MB (depth 4: 7.7 MB), shipped inside the wheel
        descr = load_model_description(path / "bioimageio.yaml")
        assert isinstance(descr, v0_5.ModelDescr), name
        ts = torch.jit.load(str(path / "weights_torchscript.pt"))
        x = np.load(path / "test_input.npy")
        np.testing.assert_allclose(
            ts(torch.from_numpy(x)).detach().numpy(), np.load(path / "test_output.npy"), atol=1e-5
        )


def test_bundled_enhancer_unknown_name_lists_names() -> None:
    with pytest.raises(KeyError, match="membranes_em2d"):
        bundled_enhancer("nope")


def test_cli_parser_registration() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    s2d.add_train_enhancer_parser(sub)
    args = parser.parse_args(
        ["train-enhancer", "a.h5:raw", "a.h5:gt", "--out", "o", "--epochs", "7", "--slices", "0-2"]
    )
    assert args.func is s2d.cmd_train_enhancer
    assert args.iterations == 7 and args.width == 16 and args.depth == 3
    assert s2d.parse_index_list("0-2,5") == [0, 1, 2, 5]


def test_train_enhancer_cli_end_to_end(tmp_path: Path) -> None:
    import h5py

    im = [em_like((128, 128), seed=s) for s in range(2)]
    h5 = tmp_path / "syn.h5"
    with h5py.File(h5, "w") as f:
        f["raw"] = np.stack([i.raw for i in im])
        f["gt"] = np.stack([i.membranes for i in im])
        other = em_like((144, 176), seed=5)  # a second "acquisition" with another slice shape
        f["raw2"] = other.raw[np.newaxis]
        f["gt2"] = other.membranes[np.newaxis]
        f["gt_bad"] = other.membranes[np.newaxis, :90]
        f["mito"] = np.stack([i.mitochondria for i in im])
        f["mito2"] = other.mitochondria[np.newaxis]
    argv = ["train-enhancer", f"{h5}:raw", f"{h5}:gt", "--out", str(tmp_path / "pkg"), "--forests", "4"]
    argv += ["--iterations", "2", "--depth", "2", "--width", "4", "--no-test", "--slices", "0"]
    assert s2d.main(argv + ["--add-data", f"{h5}:raw2", f"{h5}:gt2"]) == 0
    text = (tmp_path / "pkg" / "bioimageio.yaml").read_text()
    assert "raw2" in text and "gt2" in text  # both pairs recorded in the package's training facts
    tuned = tmp_path / "tuned.v2"  # the default model name comes from it; bioimage.io refuses the dot
    argv_ft = (
        argv[:4] + [str(tuned)] + argv[5:] + ["--init", str(tmp_path / "pkg"), "--calibration", "1", "--lr", "1e-4"]
    )
    assert s2d.main(argv_ft) == 0
    facts = (tuned / "bioimageio.yaml").read_text()
    assert "init:" in facts and "calibration: 1.0" in facts and "lr: 0.0001" in facts
    assert "vary_features: false" in facts
    assert "name: shallow2deep enhancer tuned_v2" in facts
    with pytest.raises(SettingsError, match=r"gt_bad has \(1, 90, 176\).*same shape"):
        s2d.main(argv + ["--add-data", f"{h5}:raw2", f"{h5}:gt_bad"])
    # --avoid: one mask per pair, recorded in the package
    avoided = argv[:4] + [str(tmp_path / "avoided")] + argv[5:] + ["--add-data", f"{h5}:raw2", f"{h5}:gt2"]
    both = ["--avoid", f"{h5}:mito", "--avoid", f"{h5}:mito2"]
    assert s2d.main(avoided + both + ["--avoid-share", "1", "--avoid-inside", "0.5"]) == 0
    facts = (tmp_path / "avoided" / "bioimageio.yaml").read_text()
    assert "mito2" in facts and "avoid_share: 1.0" in facts and "avoid_inside: 0.5" in facts
    with pytest.raises(SettingsError, match="1 --avoid mask.*for 2 data pair.*one --avoid per pair"):
        s2d.main(avoided + ["--avoid", f"{h5}:mito"])
    with pytest.raises(SettingsError, match=r"--avoid .*gt_bad has shape \(1, 90, 176\).*image's shape"):
        s2d.main(avoided + ["--avoid", f"{h5}:mito", "--avoid", f"{h5}:gt_bad"])
    with pytest.raises(SettingsError, match="--avoid-share 2.0: give a share"):
        s2d.main(avoided + ["--avoid-share", "2"])
    with pytest.raises(SettingsError, match="--avoid-inside 2.0: give a share of the --avoid forests"):
        s2d.main(avoided + ["--avoid-inside", "2"])
    with pytest.raises(SettingsError, match="--avoid-inside needs --avoid MASK"):
        s2d.main(avoided + ["--avoid-inside", "0.5"])


@pytest.mark.parametrize(("name", "why"), [("cand", "has 4 characters"), ("mito/v2 model", "characters '/'")])
def test_a_name_bioimageio_refuses_stops_training_before_it_starts(name: str, why: str, tmp_path: Path) -> None:
    im = em_like((96, 96), seed=1)
    with pytest.raises(SettingsError, match=f"{why}.*bioimage.io needs 5-128 characters.*give another --name"):
        s2d.train_enhancer([im.raw], [im.mitochondria], tmp_path / "pkg", name=name, description="d", log=None)
    assert not (tmp_path / "pkg").exists()


def test_a_failed_export_keeps_the_trained_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(s2d, "export_enhancer", disk_full)
    im = em_like((96, 96), seed=1)
    kw = dict(name="tiny model", description="d", n_forests=2, iterations=3, depth=1, width=2, log=None)
    with pytest.raises(OSError, match="No space left") as err:
        s2d.train_enhancer([im.raw], [im.mitochondria], tmp_path / "pkg", label_patch=48, crop=64, train_patch=32, **kw)
    kept = tmp_path / "pkg.unexported.ckpt"
    assert any(str(kept) in note for note in err.value.__notes__)
    net = s2d.build_unet(depth=1, width=2)
    s2d.load_initial_weights(net, kept)  # a checkpoint --init reads
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]  # no temp file left, no half package


def test_importing_does_not_import_torch() -> None:
    code = "import sys, tda_graph, tda_graph.models, tda_graph.workflows.shallow2deep; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("kernel", "reach", "halo"), [(1, 0, 16), (5, 2, 16), (41, 20, 32), (71, 35, 48)])
def test_measure_halo_finds_the_reach_of_a_known_network(kernel: int, reach: int, halo: int) -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, kernel, padding=kernel // 2)
    torch.nn.init.uniform_(net.weight, 0.5, 1.0)  # every tap counts
    probe = np.random.default_rng(0).random((200, 300)).astype(np.float32)
    assert s2d.measure_halo(net, probe) == (reach, halo)


def test_measure_halo_of_a_unet_is_within_its_nominal_field() -> None:
    torch.manual_seed(0)
    net = s2d.build_unet(depth=2, width=4)
    reach, halo = s2d.measure_halo(net, np.random.default_rng(0).random((128, 128)).astype(np.float32))
    # depth 2: 2 + 4 (encoder) + 8 (bottom) + 4 + 2 (decoder) px of 3x3 convolutions, plus pooling offsets
    assert 10 <= reach <= 26
    assert halo == (16 if reach <= 16 else 32)
    assert net.training  # the measurement leaves the mode as it found it
    with pytest.raises(ValueError, match="2D or 3D image"):
        s2d.measure_halo(net, np.zeros((2, 3, 8, 8), np.float32))


# --------------------------------------------------------------------------- 3D enhancers
@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    im = em_like((40, 72, 72), seed=2, cell_size=24.0)
    return im.raw, im.membranes


def test_forest_pairs_in_3d_are_cubes_of_the_volume(volume: tuple[np.ndarray, np.ndarray]) -> None:
    raw, gt = volume
    pairs = s2d.make_forest_predictions([raw], [gt], 2, patch=24, crop=48, n_trees=3, seed=1, ndim=3)
    again = s2d.make_forest_predictions([raw], [gt], 2, patch=24, crop=48, n_trees=3, seed=1, ndim=3)
    for p, q in zip(pairs, again):
        assert p.probability.shape == p.target.shape == (40, 48, 48)  # z is clipped to the volume
        assert p.probability.dtype == np.float32 and 0 <= p.probability.min() <= p.probability.max() <= 1
        i, z0, y0, x0 = p.source
        assert i == 0 and z0 == 0 and 0 <= y0 <= 72 - 48 and 0 <= x0 <= 72 - 48
        np.testing.assert_array_equal(p.target, gt[:, y0 : y0 + 48, x0 : x0 + 48] > 0)
        np.testing.assert_array_equal(p.probability, q.probability)  # seeded
        assert p.probability[p.target > 0].mean() > p.probability[p.target == 0].mean()
    binned = s2d.make_forest_predictions([raw], [gt], 1, patch=16, crop=48, n_trees=3, seed=1, ndim=3, scales=(2,))
    assert binned[0].probability.shape == (20, 36, 36)  # 2x2x2 binning: (40, 72, 72) / 2
    with pytest.raises(ValueError, match=r"3D training needs \(z, y, x\) volumes"):
        s2d.make_forest_predictions([raw[0]], [gt[0]], 1, ndim=3)
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        s2d.make_forest_predictions([raw], [gt], 1, ndim=4)


def test_bin_means_3d_blocks() -> None:
    a = np.arange(4 * 4 * 6, dtype=np.float32).reshape(4, 4, 6)
    out = s2d._bin(a, 2)
    assert out.shape == (2, 2, 3)
    assert out[1, 0, 2] == a[2:4, 0:2, 4:6].mean()


def test_3d_unet_and_augmentation_keep_shapes_and_pairs_aligned() -> None:
    torch.manual_seed(0)
    net = s2d.build_unet(depth=2, width=2, ndim=3)
    assert net.ndim == 3 and isinstance(net.encoders[0][0], torch.nn.Conv3d)
    assert net(torch.zeros(1, 1, 16, 24, 32)).shape == (1, 1, 16, 24, 32)
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        s2d.build_unet(ndim=1)
    rng = np.random.default_rng(0)
    vol = rng.random((6, 8, 8)).astype(np.float32)
    # the 16 allowed transforms: a quarter turn in yx, a mirror in x, a mirror in z (z is never turned)
    allowed = {
        (k, fx, fz): np.rot90(vol, k, axes=(1, 2))[:, :, :: -1 if fx else 1][:: -1 if fz else 1]
        for k in range(4)
        for fx in (0, 1)
        for fz in (0, 1)
    }
    seen = set()
    for _ in range(60):
        x, y = s2d._augment(vol, vol.copy(), rng)
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.8  # input (maybe noisy) and target move together
        seen |= {key for key, t in allowed.items() if np.array_equal(y, t)}
    assert {fz for _, _, fz in seen} == {0, 1} and {k for k, _, _ in seen} == {0, 1, 2, 3}


def test_measure_halo_in_3d_finds_a_known_reach() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 9, padding=4)
    torch.nn.init.uniform_(net.weight, 0.5, 1.0)
    probe = np.random.default_rng(0).random((40, 50, 60)).astype(np.float32)
    assert s2d.measure_halo(net, probe) == (4, 16)


def test_train_enhancer_3d_package_runs_in_the_engine(volume: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    from operators.enhancer import Enhancer, load_enhancer_model
    from operators.sources import ArraySource
    from tda_graph import Graph

    raw, gt = volume
    res = s2d.train_enhancer(
        [raw], [gt], tmp_path / "pkg3d", name="test 3d enhancer", description="a 3D test package",
        n_forests=2, iterations=2, depth=1, width=2, ndim=3, label_patch=24, crop=48, train_patch=32,
        batch_size=1, test_size=32, n_trees=3, threads=1, log=None,
    )  # fmt: skip
    assert res.test_status == "passed"  # bioimageio.core's own test of the 3D package
    text = (res.package / "bioimageio.yaml").read_text()
    assert "unet3d" in text and "ndim: 3" in text
    model = load_enhancer_model(res.package)
    assert model.axes == "zyx" and model.halo == (16, 16, 16)  # depth 1 reaches < 16 px
    assert model.min_size == (48, 48, 48) and model.step == (16, 16, 16)  # 2 * halo + step
    assert np.load(res.package / "test_input.npy").shape == (1, 1, 48, 48, 48)  # the smallest valid input
    # tiled 3D inference equals one pass of the network over the volume, away from its borders
    prob = np.random.default_rng(3).random((48, 64, 80)).astype(np.float32)
    g = Graph(workers=2)
    enh = g.add(Enhancer(model, tile=(16, 16, 32)), image=g.add(ArraySource(prob, "zyx")))
    tiled = g.request(enh)[..., 0]
    net = torch.jit.load(str(res.package / "weights_torchscript.pt"))
    with torch.no_grad():
        whole = net(torch.from_numpy(prob[None, None])).numpy()[0, 0]
    h = model.halo[0]
    inner = (slice(h, -h),) * 3
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-5)


def test_cli_3d_options_are_checked(tmp_path: Path) -> None:
    import h5py

    h5 = tmp_path / "vol.h5"
    im = em_like((8, 32, 32), seed=1)
    with h5py.File(h5, "w") as f:
        f["raw"], f["gt"] = im.raw, im.membranes
        f["raw2d"], f["gt2d"] = im.raw[0], im.membranes[0]
    base = ["train-enhancer", f"{h5}:raw", f"{h5}:gt", "--out", str(tmp_path / "o"), "--ndim", "3"]
    with pytest.raises(SettingsError, match="one contiguous z range"):
        s2d.main(base + ["--slices", "0-2,5"])
    with pytest.raises(SettingsError, match="larger than the forest crop"):
        s2d.main(base + ["--train-patch", "64", "--crop", "32"])
    flat = ["train-enhancer", f"{h5}:raw2d", f"{h5}:gt2d", "--out", str(tmp_path / "o"), "--ndim", "3"]
    with pytest.raises(SettingsError, match=r"needs \(z, y, x\) volumes"):
        s2d.main(flat)


def test_train_enhancer_3d_defaults_are_3d_sizes(volume: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    raw, gt = volume  # (40, 72, 72): smaller than the 96³ default crop, so crops are clipped and patches mirrored
    res = s2d.train_enhancer(
        [raw], [gt], tmp_path / "p", name="test 3d defaults", description="d", n_forests=1, iterations=1,
        depth=1, width=2, ndim=3, n_trees=3, threads=1, run_test=False, log=None,
    )  # fmt: skip
    assert res.n_pairs == 1 and res.iterations == 1
    assert np.load(res.package / "test_input.npy").shape == (1, 1, 48, 48, 48)  # the smallest valid input
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        s2d.train_enhancer([raw], [gt], tmp_path / "q", name="bad ndim", description="d", ndim=4, log=None)


@pytest.mark.parametrize(
    ("text", "indices"),
    [("0-5", [0, 1, 2, 3, 4, 5]), ("0,2,7", [0, 2, 7]), ("3", [3]), (" 4 , 0-1,1", [0, 1, 4])],
)
def test_parse_index_list(text: str, indices: list[int]) -> None:
    assert s2d.parse_index_list(text) == indices


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a", "--slices 'a': give indices >= 0"),
        ("-1", "give indices >= 0"),
        ("1-", "give indices"),
        ("", "give indices"),
        ("1-2-3", "give indices"),
        ("5-2", "the range 5-2 runs backwards; write 2-5"),
    ],
)
def test_parse_index_list_errors(text: str, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        s2d.parse_index_list(text)


def test_read_stack_errors_name_the_problem(tmp_path: Path) -> None:
    import h5py

    h5 = tmp_path / "d.h5"
    with h5py.File(h5, "w") as f:
        f["raw"] = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
        f["group/gt"] = np.zeros((4, 3, 2), np.uint8)
        f["rgb"] = np.zeros((3, 4, 5), np.uint8)
        f["movie"] = np.zeros((2, 3, 4, 5), np.uint8)
        f["plane"] = np.zeros((4, 5), np.uint8)
    assert s2d.read_stack(f"{h5}:raw", "1,3").tolist() == np.arange(24).reshape(4, 3, 2)[[1, 3]].tolist()
    with pytest.raises(SettingsError, match="cannot tell the format"):
        s2d.read_stack(str(tmp_path / "d_h5"))
    with pytest.raises(SettingsError, match="holds 5 image datasets; name one"):
        s2d.read_stack(str(h5))
    with pytest.raises(SettingsError, match="does not exist; check the path"):
        s2d.read_stack(f"{tmp_path / 'nope.h5'}:raw")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SettingsError, match="not a readable HDF5 file"):
        s2d.read_stack(f"{tmp_path / 'text.h5'}:raw")
    with pytest.raises(SettingsError, match="'rawx' does not exist .* available datasets: /group/gt, /movie"):
        s2d.read_stack(f"{h5}:rawx")
    with pytest.raises(SettingsError, match="'group' is a group, not a dataset"):
        s2d.read_stack(f"{h5}:group")
    with pytest.raises(SettingsError, match=r"has 4 slices along its z axis \(0-3\)"):
        s2d.read_stack(f"{h5}:raw", "2-4")
    with pytest.raises(SettingsError, match="runs backwards"):
        s2d.read_stack(f"{h5}:raw", "3-1")
    with pytest.raises(SettingsError, match="save one channel, or give --axes"):
        s2d.read_stack(f"{h5}:rgb", axes="cyx")
    with pytest.raises(SettingsError, match="give one time point"):
        s2d.read_stack(f"{h5}:movie", axes="tzyx")
    with pytest.raises(SettingsError, match="name 2 axes but"):
        s2d.read_stack(f"{h5}:raw", axes="yx")
    with pytest.raises(SettingsError, match="is one 2D image .* not a stack"):
        s2d.read_stack(f"{h5}:plane", "0")


@pytest.mark.parametrize("fmt", ["zarr", "tif", "h5"])
def test_read_stack_reads_every_format_and_axis_order(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 255, (6, 7, 9), dtype=np.uint8)
    stored = np.moveaxis(stack, 0, -1)  # yxz on disk: the reader must put z first
    if fmt == "zarr":
        import zarr

        zarr.create_array(tmp_path / "s.zarr", data=stored, chunks=(4, 4, 2))
        spec = str(tmp_path / "s.zarr")
    elif fmt == "tif":
        import tifffile

        tifffile.imwrite(tmp_path / "s.tif", stored)
        spec = str(tmp_path / "s.tif")
    else:
        import h5py

        with h5py.File(tmp_path / "s.h5", "w") as f:
            f["img"] = stored
        spec = f"{tmp_path / 's.h5'}:img"
    np.testing.assert_array_equal(s2d.read_stack(spec, axes="yxz"), stack)
    # runs of slices are read separately and joined in index order
    np.testing.assert_array_equal(s2d.read_stack(spec, "0-1,4,3", axes="yxz"), stack[[0, 1, 3, 4]])
    # a singleton channel axis is dropped; a time series of 2D frames is a stack
    np.testing.assert_array_equal(s2d.read_stack(spec, "2", axes="yxt"), stack[[2]])


def test_train_enhancer_command_reads_tiff(tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    gt = np.zeros((2, 48, 48), np.uint8)
    gt[:, 10:30, 12:34] = 1
    raw = (gt * 120 + rng.normal(60, 20, gt.shape)).clip(0, 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", raw)
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    argv = ["train-enhancer", str(tmp_path / "raw.tif"), str(tmp_path / "gt.tif"), "--out", str(tmp_path / "m")]
    argv += ["--forests", "2", "--iterations", "2", "--depth", "2", "--width", "4", "--no-test", "--slices", "1"]
    argv += ["--label-patch", "32", "--crop", "40", "--train-patch", "32"]
    assert s2d.main(argv) == 0
    rdf = (tmp_path / "m" / "bioimageio.yaml").read_text()
    assert "raw.tif" in rdf and "gt.tif" in rdf


def test_module_entry_point_reports_a_user_error_without_a_traceback(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tda_graph.workflows.shallow2deep", "train-enhancer", f"{tmp_path}/no.h5:raw"]
        + [f"{tmp_path}/no.h5:gt", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "train-enhancer: error:" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"n_forests": 0}, "--forests 0: give at least 1"),
        ({"iterations": 0}, "--iterations 0: give at least 1"),
        ({"batch_size": 0}, "--batch-size 0: give at least 1"),
        ({"depth": 0}, "--depth 0 / --width 16: both must be at least 1"),
        ({"init": "no/such/package"}, "--init no/such/package: no such file or folder"),
        ({"checkpoint": "no/such/folder/c.ckpt"}, "--checkpoint no/such/folder/c.ckpt: the folder 'no/such/folder'"),
        ({"out": "a_file"}, "a file of that name exists; give a folder"),
    ],
)
def test_bad_training_settings_fail_before_the_forests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict[str, object], match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("user data")
    monkeypatch.setattr(s2d, "make_forest_predictions", lambda *a, **k: pytest.fail("forests ran"))
    im = em_like((64, 64), seed=0)
    kw: dict[str, object] = {"out": tmp_path / "pkg", "name": "bad settings", "description": "d", "log": None}
    kw.update(settings)
    with pytest.raises(SettingsError, match=match):
        s2d.train_enhancer([im.raw], [im.mitochondria], **kw)
    assert not (tmp_path / "pkg").exists() and (tmp_path / "a_file").read_text() == "user data"
