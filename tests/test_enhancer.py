"""Enhancer: a bioimage.io model run tile by tile inside the graph (real model package)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from operators.enhancer import Enhancer, EnhancerModel, ModelError, load_enhancer_model
from operators.kernels import tiling
from operators.sources import ArraySource
from tda_graph import Graph, IncompatibleInputError, OperatorError, Roi, SettingsError, testing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
NUCLEI = MODELS / "unet2d_nuclei_broad"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def shared_models() -> Path:
    """``../shared/models``; tests using it skip cleanly when it is absent."""
    if not (NUCLEI / "bioimageio.yaml").is_file():
        pytest.skip(f"model packages not found at {NUCLEI}")
    pytest.importorskip("bioimageio.core")
    pytest.importorskip("torch")
    return MODELS


@pytest.fixture(scope="module")
def nuclei(shared_models: Path) -> EnhancerModel:
    return load_enhancer_model(shared_models / "unet2d_nuclei_broad")


@pytest.fixture(scope="module")
def whole(nuclei: EnhancerModel) -> np.ndarray:
    """The model on its whole 512² test input in one call (its own per-sample statistics)."""
    x = np.load(NUCLEI / "test_input.npy")
    return nuclei.predict(x[0])


# ------------------------------------------------------------------ pure tiling math
def test_tiling_math() -> None:
    assert tiling.valid_size(100, 64, 16) == 112
    assert tiling.valid_size(10, 64, 16) == 64
    assert tiling.valid_size(512, 512, 0) == 512
    with pytest.raises(ValueError, match="fixed model size"):
        tiling.valid_size(513, 512, 0)
    assert tiling.tile_input_range(448, 512, 32, 512, 0) == (416, 928)
    assert tiling.grid_starts(500, 1000, 448) == [448, 896]
    a = np.arange(10.0)
    got = tiling.read_padded(a, (0,), (-3,), (13,))
    np.testing.assert_array_equal(got, np.pad(a, 3, mode="reflect"))
    got = tiling.read_padded(a[4:], (4,), (6,), (8,))  # inside: plain crop
    np.testing.assert_array_equal(got, [6.0, 7.0])


def test_import_is_light() -> None:
    code = (
        "import sys, tda_graph, operators, operators.enhancer, operators.channels; "
        "bad = [m for m in ('torch', 'bioimageio.core', 'bioimageio.spec') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ------------------------------------------------------------------ description and reproduction
def test_model_facts(nuclei: EnhancerModel) -> None:
    assert nuclei.axes == "yx"
    assert nuclei.in_channels == 1
    assert nuclei.min_size == (512, 512) and nuclei.step == (0, 0)
    assert nuclei.halo == (32, 32)
    assert nuclei.channel_names == ("probability",)
    assert nuclei.tile_shape() == (512, 512)  # fixed-size model: the only valid size
    assert "torchscript" in nuclei.weights_formats


def test_reproduces_test_output(nuclei: EnhancerModel, whole: np.ndarray) -> None:
    expected = np.load(NUCLEI / "test_output.npy")[0]
    assert whole.shape == expected.shape and whole.dtype == np.float32
    # bioimageio's own default: rtol = atol = 1e-3; we hold it to 1e-4
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-4)


def test_load_from_yaml_and_zip(shared_models: Path, tmp_path: Path) -> None:
    m = load_enhancer_model(NUCLEI / "bioimageio.yaml")
    assert m.halo == (32, 32)
    z = shutil.make_archive(str(tmp_path / "nuclei"), "zip", NUCLEI)
    m = load_enhancer_model(z)
    assert m.channel_names == ("probability",)


# ------------------------------------------------------------------ tiling through the graph
def test_tiled_equals_whole_image(nuclei: EnhancerModel, whole: np.ndarray) -> None:
    x = np.load(NUCLEI / "test_input.npy")[0, 0]
    g = Graph(workers=2)
    src = g.add(ArraySource(x.copy(), "yx", name="raw"))
    # whole-image statistics, plus 32 px of context beyond the declared halo (the U-Net's
    # receptive field is larger than its declared halo of 32)
    enh = g.add(Enhancer(nuclei, statistics="image", margin=32, name="enhancer"), image=src)
    spec = g.spec(enh)
    assert spec.axes == "yxc" and spec.dtype == np.float32 and spec.channel_names == ("probability",)
    assert spec.block_shape == (384, 384, 1)  # tile 512 minus 2 * (32 + 32)
    tiled = g.request(enh)
    assert g.stats(enh)["blocks_computed"] == 4
    b = 64  # away from the borders (there: reflect padding vs. the network's zero padding)
    diff = np.abs(tiled[b:-b, b:-b, 0] - whole[0, b:-b, b:-b])
    assert diff.max() <= 1e-5, f"tiled vs whole max |diff| {diff.max():.3g}"
    # a ROI equals the whole result cropped (served from the same tiles)
    r = Roi((100, 300, 0), (200, 420, 1))
    np.testing.assert_array_equal(g.request(enh, r), tiled[r.to_slices()])
    # whole-image statistics make the input a global dependency: a stroke dirties every tile
    events = []
    sub = g.subscribe(enh, events.append)
    src.write(Roi((10, 10), (12, 12)), 5.0)
    assert [ev.rois for ev in events] == [(Roi.full(spec.shape),)]
    after = g.request(enh)
    assert g.stats(enh)["blocks_computed"] == 8
    np.testing.assert_array_equal(after, g.recompute(enh))
    sub.disconnect()


def test_stroke_reruns_only_affected_tiles(nuclei: EnhancerModel) -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((448, 896)).astype(np.float32)  # an enhancer input: a probability map
    g = Graph(workers=2)
    src = g.add(ArraySource(prob, "yx", name="forest"))
    enh = g.add(Enhancer(nuclei, name="enhancer"), image=src)  # per-tile statistics: regional
    assert g.spec(enh).block_shape == (448, 448, 1)
    first = g.request(enh)
    assert g.stats(enh)["blocks_computed"] == 2
    events = []
    sub = g.subscribe(enh, events.append)
    src.write(Roi((100, 100), (110, 110)), 1.0)  # inside tile (0, 0), away from the seam at x = 448
    assert [r for ev in events for r in ev.rois] == [Roi((0, 0, 0), (448, 448, 1))]
    second = g.request(enh)
    assert g.stats(enh)["blocks_computed"] == 3  # only the tile touched re-ran
    np.testing.assert_array_equal(second[:, 448:], first[:, 448:])
    assert not np.array_equal(second[:, :448], first[:, :448])
    np.testing.assert_array_equal(second[:, :448], g.recompute(enh, Roi((0, 0, 0), (448, 448, 1))))
    src.write(Roi((200, 430), (205, 440)), 0.0)  # within the halo of the seam: both tiles
    g.request(enh)
    assert g.stats(enh)["blocks_computed"] == 5
    sub.disconnect()


def test_small_image_contract(nuclei: EnhancerModel) -> None:
    rng = np.random.default_rng(1)
    g = Graph(workers=2)
    src = g.add(ArraySource(rng.random((90, 70)).astype(np.float32), "yx"))
    enh = g.add(Enhancer(nuclei), image=src)  # one tile, reflect-padded from 90x70 to 512²
    testing.check_roi_equals_full(g, enh, n=4)
    out = g.request(enh)
    assert out.shape == (90, 70, 1) and np.all((out >= 0) & (out <= 1))
    testing.check_spec_pure(enh, {"image": g.spec(src)})


def test_2d_model_on_3d_data_runs_per_slice(nuclei: EnhancerModel) -> None:
    rng = np.random.default_rng(2)
    vol = rng.random((2, 60, 50)).astype(np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(vol, "zyx"))
    enh = g.add(Enhancer(nuclei), image=src)
    assert g.spec(enh).axes == "zyxc" and g.spec(enh).block_shape == (1, 448, 448, 1)
    out = g.request(enh, Roi((1, 0, 0, 0), (2, 60, 50, 1)))
    assert g.stats(enh)["blocks_computed"] == 1
    g2 = Graph(workers=1)
    s2 = g2.add(ArraySource(vol[1].copy(), "yx"))
    e2 = g2.add(Enhancer(nuclei), image=s2)
    np.testing.assert_array_equal(out[0], g2.request(e2))


def test_seconds_per_tile(nuclei: EnhancerModel, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(3).random((1, 512, 512)).astype(np.float32)
    nuclei.predict(x)  # warm
    t0 = time.perf_counter()
    nuclei.predict(x)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[enhancer] one 512² tile of {nuclei.name} on the CPU: {dt:.3f} s")
    assert dt < 30


def test_cuda_device(nuclei: EnhancerModel) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = np.load(NUCLEI / "test_input.npy")[0, 0]
    g = Graph(workers=1)
    src = g.add(ArraySource(x.copy(), "yx"))
    enh = g.add(Enhancer(nuclei, device="cuda", statistics="image", margin=32), image=src)
    cpu = g.add(Enhancer(nuclei, statistics="image", margin=32), image=src)
    np.testing.assert_allclose(g.request(enh), g.request(cpu), atol=1e-4)


# ------------------------------------------------------------------ errors
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found.*nope.zip"):
        load_enhancer_model(tmp_path / "nope.zip")


def test_bad_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelError, match="not a valid zip file"):
        load_enhancer_model(bad)


def test_folder_without_description(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no bioimageio.yaml"):
        load_enhancer_model(tmp_path)


def test_offline_uncached_zoo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not cached.*offline.*pass its local path"):
        load_enhancer_model("affable-shark", cache_dir=tmp_path, offline=True)


def test_broken_description(shared_models: Path, tmp_path: Path) -> None:
    d = tmp_path / "broken"
    shutil.copytree(NUCLEI, d)
    (d / "bioimageio.yaml").write_text("type: model\nformat_version: 0.5.4\nname: broken\n")
    with pytest.raises(ModelError, match="could not load a bioimage.io model"):
        load_enhancer_model(d)


def test_settings_and_connection_errors(nuclei: EnhancerModel) -> None:
    with pytest.raises(SettingsError, match="statistics must be"):
        Enhancer(nuclei, statistics="global")
    with pytest.raises(SettingsError, match="device must be"):
        Enhancer(nuclei, device="tpu")
    with pytest.raises(SettingsError, match="has no 'keras_hdf5' weights"):
        Enhancer(nuclei, weights_format="keras_hdf5")
    with pytest.raises(SettingsError, match="needs a model"):
        Enhancer()
    g = Graph(workers=1)
    two = g.add(ArraySource(np.zeros((8, 8, 2), np.float32), "yxc"))
    with pytest.raises(IncompatibleInputError, match="expects 1 input channel"):
        g.add(Enhancer(nuclei), image=two)


def _fault_module(kind: str):
    """A torch module that raises (``"raise"``), returns NaN (``"nan"``) or a cropped shape (``"shape"``)."""
    torch = pytest.importorskip("torch")

    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("fake failure")

    class ReturnsNaN(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    class WrongShape(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., 1:, :-2]

    return {"raise": Raises, "nan": ReturnsNaN, "shape": WrongShape}[kind]()


def _fake_model(tmp_path: Path, name: str, kind: str) -> Path:
    """A copy of the nuclei package whose torchscript weights fail (``"raise"``) or return NaN (``"nan"``)."""
    torch = pytest.importorskip("torch")
    d = tmp_path / name
    d.mkdir()
    for f in ("test_input.npy", "test_output.npy", "test_input.png", "test_output.png", "cover0.png", "README.md"):
        shutil.copy(NUCLEI / f, d / f)
    torch.jit.save(torch.jit.script(_fault_module(kind)), str(d / "fake.pt"))
    sha = hashlib.sha256((d / "fake.pt").read_bytes()).hexdigest()
    text = (NUCLEI / "bioimageio.yaml").read_text()
    text = text.replace("name: UNet 2D Nuclei Broad", f"name: {name}")
    weights = f"weights:\n  torchscript:\n    source: fake.pt\n    sha256: {sha}\n    pytorch_version: 2.5.1\n"
    text = text[: text.index("weights:")] + weights
    (d / "bioimageio.yaml").write_text(text)
    return d


@pytest.mark.parametrize(("kind", "match"), [("raise", "fake failure"), ("nan", "NaN/inf")])
def test_failing_model_names_model_and_tile(shared_models: Path, tmp_path: Path, kind: str, match: str) -> None:
    model = load_enhancer_model(_fake_model(tmp_path, "FailingFake", kind))
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((500, 40), np.float32), "yx"))
    enh = g.add(Enhancer(model, name="enh"), image=src)
    with pytest.raises(OperatorError) as info:
        g.request(enh, Roi((460, 0, 0), (470, 10, 1)))
    msg = str(info.value)
    assert "FailingFake" in msg and match in msg, msg
    assert "tile Roi[448:500, 0:40]" in msg  # the tile that failed (second row of tiles)
    assert isinstance(info.value.__cause__, ModelError)
    assert g.stats(enh)["cached_blocks"] == 0  # nothing (no zeros) was stored


def test_cuda_request_falls_back_to_cpu(nuclei: EnhancerModel) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    g = Graph(workers=1)
    src = g.add(ArraySource(np.zeros((16, 16), np.float32), "yx"))
    enh = g.add(Enhancer(nuclei, device="cuda"), image=src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = g.request(enh)
    assert out.shape == (16, 16, 1)
    assert any("no CUDA device" in str(w.message) for w in caught)


def test_cached_zoo_id_is_used_without_download(shared_models: Path, tmp_path: Path) -> None:
    from operators.enhancer import _cache_name

    shutil.make_archive(str(tmp_path / _cache_name("some-zoo-id"))[: -len(".zip")], "zip", NUCLEI)
    m = load_enhancer_model("some-zoo-id", cache_dir=tmp_path, offline=True)
    assert m.name == "UNet 2D Nuclei Broad"


_MEAN3D_YAML = """\
name: Mean3D
description: 3x3x3 mean filter as a stand-in for a 3D enhancer (test fixture)
covers: [cover0.png]
authors: [{name: tda-graph tests}]
cite: [{text: none, url: "https://example.com/"}]
license: MIT
format_version: 0.5.4
type: model
documentation: README.md
inputs:
- id: raw
  axes:
  - type: batch
  - type: channel
    channel_names: [raw_intensity]
  - {type: space, id: z, size: {min: 8, step: 8}}
  - {type: space, id: y, size: {min: 16, step: 8}}
  - {type: space, id: x, size: {min: 16, step: 8}}
  test_tensor: {source: in.npy, sha256: SHA_IN}
outputs:
- id: mean
  axes:
  - type: batch
  - type: channel
    channel_names: [smooth]
  - {type: space, id: z, halo: 2, size: {tensor_id: raw, axis_id: z}}
  - {type: space, id: y, halo: 2, size: {tensor_id: raw, axis_id: y}}
  - {type: space, id: x, halo: 2, size: {tensor_id: raw, axis_id: x}}
  test_tensor: {source: out.npy, sha256: SHA_OUT}
weights:
  torchscript: {source: mean.pt, sha256: SHA_PT, pytorch_version: 2.5.1}
"""


def _mean3d_model(tmp_path: Path) -> Path:
    """A 3D step-sized model package: a 3x3x3 mean (its true halo is 1; it declares 2)."""
    torch = pytest.importorskip("torch")

    class Mean3d(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)

    d = tmp_path / "mean3d"
    d.mkdir()
    shutil.copy(NUCLEI / "cover0.png", d / "cover0.png")
    (d / "README.md").write_text("test model\n")
    module = torch.jit.script(Mean3d())
    torch.jit.save(module, str(d / "mean.pt"))
    x = np.random.default_rng(5).random((1, 1, 8, 16, 16)).astype(np.float32)
    np.save(d / "in.npy", x)
    np.save(d / "out.npy", module(torch.from_numpy(x)).numpy())
    text = _MEAN3D_YAML
    for key, f in (("SHA_IN", "in.npy"), ("SHA_OUT", "out.npy"), ("SHA_PT", "mean.pt")):
        text = text.replace(key, hashlib.sha256((d / f).read_bytes()).hexdigest())
    (d / "bioimageio.yaml").write_text(text)
    return d


def test_3d_step_model_contract(shared_models: Path, tmp_path: Path) -> None:
    model = load_enhancer_model(_mean3d_model(tmp_path))
    assert model.axes == "zyx" and model.min_size == (8, 16, 16) and model.step == (8, 8, 8)
    assert model.halo == (2, 2, 2) and model.channel_names == ("smooth",)
    rng = np.random.default_rng(6)
    g = Graph(workers=2)
    src = g.add(ArraySource(rng.random((13, 30, 41)).astype(np.float32), "zyx", name="vol"))
    enh = g.add(Enhancer(model, tile=(12, 20, 20), name="mean3d"), image=src)
    spec = g.spec(enh)
    assert spec.axes == "zyxc" and spec.block_shape == (12, 20, 20, 1)  # tiles 16x24x24 minus 2*2
    testing.check_roi_equals_full(g, enh, n=6)
    testing.check_dirty_covers_changes(g, src, enh, n_edits=3, max_extent=5)
    # a mean filter is exact wherever its 1-voxel footprint stays inside the image
    from scipy import ndimage

    ref = ndimage.uniform_filter(src.data, 3, mode="constant")
    out = g.request(enh)[..., 0]
    np.testing.assert_allclose(out[1:-1, 1:-1, 1:-1], ref[1:-1, 1:-1, 1:-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(IncompatibleInputError, match="works on 'zyx' data"):
        g.add(Enhancer(model), image=g.add(ArraySource(np.zeros((20, 20), np.float32), "yx")))


@pytest.mark.parametrize(
    ("member", "data", "match"),
    [
        ("../evil.py", b"x", "zip slip"),
        ("/etc/evil", b"x", "zip slip"),
        ("weights/../../evil", b"x", "zip slip"),
        ("bomb.bin", b"\0" * (8 << 20), "zip bomb"),
    ],
)
def test_unsafe_zip_packages_are_refused(tmp_path: Path, member: str, data: bytes, match: str) -> None:
    import zipfile

    p = tmp_path / "model.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bioimageio.yaml", "type: model\n")
        zf.writestr(member, data)
    with pytest.raises(ModelError, match=match):
        load_enhancer_model(p)


# ------------------------------------------------------------------ packages that run Python code (allow_code)
BUNDLED = Path(__file__).resolve().parents[1] / "tda_graph" / "models" / "enhancers" / "mitochondria_em2d"

_ARCH = """import pathlib

import torch

pathlib.Path(MARKER).write_text("the architecture code ran")


class Smooth(torch.nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.scale = scale

    def forward(self, x):
        return torch.sigmoid(self.scale * self.conv(x))
"""


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _state_dict_package(tmp_path: Path, *, keep_torchscript: bool = False) -> tuple[Path, Path]:
    """A copy of the bundled package with ``pytorch_state_dict`` weights (architecture in ``arch.py``).

    Importing ``arch.py`` writes a marker file, so a test sees whether the package's code ran.
    Returns the package folder and the marker path.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("bioimageio.core")
    d = tmp_path / ("torchscript_and_state_dict" if keep_torchscript else "state_dict_only")
    marker = tmp_path / f"{d.name}.code-ran"
    shutil.copytree(BUNDLED, d)
    arch = _ARCH.replace("MARKER", repr(str(marker)))
    (d / "arch.py").write_text(arch)
    ns: dict = {}
    exec(compile(arch.replace('.write_text("the architecture code ran")', ""), "arch", "exec"), ns)  # no marker
    net = ns["Smooth"](2.0)
    with torch.no_grad():
        net.conv.weight[:] = 1 / 9
    torch.save(net.state_dict(), d / "state.pt")
    text = (BUNDLED / "bioimageio.yaml").read_text()
    start, end = text.index("weights:"), text.index("config:")
    weights = (
        "weights:\n"
        "  pytorch_state_dict:\n"
        f"    source: state.pt\n    sha256: {_sha(d / 'state.pt')}\n"
        f"    architecture:\n      source: arch.py\n      sha256: {_sha(d / 'arch.py')}\n"
        "      callable: Smooth\n      kwargs: {scale: 2.0}\n"
        "    pytorch_version: 2.13.0\n"
    )
    if keep_torchscript:
        weights += text[start:end].split("\n", 1)[1]
    else:
        (d / "weights_torchscript.pt").unlink()
    text = text[:start] + weights + text[end:]
    (d / "bioimageio.yaml").write_text(text.replace("name: tda-graph mitochondria EM 2D enhancer", f"name: {d.name}"))
    return d, marker


def test_state_dict_package_needs_allow_code(tmp_path: Path) -> None:
    pkg, marker = _state_dict_package(tmp_path)
    msg = (
        "model 'state_dict_only' has only pytorch_state_dict weights, which run Python code from the package; "
        "pass allow_code=True"
    )
    with pytest.raises(ModelError, match=msg):
        load_enhancer_model(pkg)
    with pytest.raises(SettingsError, match="--allow-code"):
        Enhancer(str(pkg))  # a path in the settings: same rule
    assert not marker.exists(), "the package's code ran without allow_code"
    # with the opt-in it loads and predicts (and the package's code does run)
    model = load_enhancer_model(pkg, allow_code=True)
    assert model.usable_formats == ("pytorch_state_dict",) and model.allow_code
    g = Graph(workers=1)
    x = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    src = g.add(ArraySource(x, "yx"))
    enh = g.add(Enhancer(model, name="enh"), image=src)
    out = g.request(enh)
    assert marker.exists()
    from scipy import ndimage

    ref = 1 / (1 + np.exp(-2.0 * ndimage.uniform_filter(x, 3, mode="constant")))
    np.testing.assert_allclose(out[1:-1, 1:-1, 0], ref[1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_torchscript_is_preferred_over_state_dict(tmp_path: Path) -> None:
    pkg, marker = _state_dict_package(tmp_path, keep_torchscript=True)
    model = load_enhancer_model(pkg)  # torchscript present: no opt-in needed
    assert model.usable_formats == ("torchscript",)
    assert model.weights_formats == ("torchscript", "pytorch_state_dict")
    with pytest.raises(SettingsError, match="pytorch_state_dict weights run Python code.*allow_code=True"):
        Enhancer(model, weights_format="pytorch_state_dict")
    trusted = load_enhancer_model(pkg, allow_code=True)
    assert trusted.usable_formats == ("torchscript", "pytorch_state_dict")
    x = np.random.default_rng(1).random((1, 64, 64)).astype(np.float32)
    model.predict(x)
    trusted.predict(x)
    assert not marker.exists(), "the architecture code ran although torchscript weights were available"


def test_third_party_package_declares_safe_weights(shared_models: Path) -> None:
    model = load_enhancer_model(NUCLEI)  # torchscript + onnx: no opt-in
    assert set(model.weights_formats) == {"torchscript", "onnx"}
    assert model.usable_formats == ("torchscript", "onnx") and not model.allow_code


def test_workflow_set_enhancer_allow_code(tmp_path: Path) -> None:
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

    pkg, marker = _state_dict_package(tmp_path)
    raw = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    with TrainableDomainAdaptation(raw, workers=1, n_trees=4) as wf:
        with pytest.raises(SettingsError, match="pass allow_code=True"):
            wf.set_enhancer(str(pkg))
        assert wf.enhanced is None and not marker.exists()
        wf.set_enhancer(str(pkg), allow_code=True)
        assert wf.enhanced.model.allow_code


# ------------------------------------------------------------------ verified downloads
def _zip_of(folder: Path, dest: Path) -> Path:
    return Path(shutil.make_archive(str(dest.with_suffix("")), "zip", folder))


@pytest.fixture
def fake_download(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace the network download by a copy of ``state["zip"]`` (optionally failing half-way)."""
    import operators.enhancer as enh_mod

    state: dict = {"zip": None, "fail_after": None, "calls": 0}

    def download(source: str, dest: Path) -> None:
        state["calls"] += 1
        data = Path(state["zip"]).read_bytes()
        if state["fail_after"] is not None:
            dest.write_bytes(data[: state["fail_after"]])
            raise ConnectionError("connection reset by peer")
        dest.write_bytes(data)

    monkeypatch.setattr(enh_mod, "_download_package", download)
    return state


def test_download_is_verified_and_cached(tmp_path: Path, fake_download: dict) -> None:
    from operators.enhancer import _cache_name

    pytest.importorskip("bioimageio.core")
    good = _zip_of(BUNDLED, tmp_path / "good.zip")
    fake_download["zip"] = good
    cache = tmp_path / "cache"
    m = load_enhancer_model("https://example.org/mito.zip", cache_dir=cache, offline=False, sha256=_sha(good))
    assert m.name == "tda-graph mitochondria EM 2D enhancer"
    assert [p.name for p in cache.iterdir()] == [_cache_name("https://example.org/mito.zip")]
    load_enhancer_model("https://example.org/mito.zip", cache_dir=cache, offline=False)
    assert fake_download["calls"] == 1  # the second time from the cache


def test_tampered_weights_are_refused_and_deleted(tmp_path: Path, fake_download: dict) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(BUNDLED, pkg)
    expected = _sha(pkg / "weights_torchscript.pt")
    with open(pkg / "weights_torchscript.pt", "ab") as f:
        f.write(b"tampered")
    actual = _sha(pkg / "weights_torchscript.pt")
    fake_download["zip"] = _zip_of(pkg, tmp_path / "bad.zip")
    cache = tmp_path / "cache"
    match = f"torchscript weights 'weights_torchscript.pt' does not match.*expected {expected}, got {actual}"
    with pytest.raises(ModelError, match=match):
        load_enhancer_model("some-zoo-id", cache_dir=cache, offline=False)
    assert list(cache.iterdir()) == []  # deleted, nothing in the cache


def test_tampered_architecture_source_is_refused(tmp_path: Path, fake_download: dict) -> None:
    pkg, marker = _state_dict_package(tmp_path)
    (pkg / "arch.py").write_text((pkg / "arch.py").read_text() + "\nimport os  # injected\n")
    fake_download["zip"] = _zip_of(pkg, tmp_path / "bad.zip")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="pytorch_state_dict architecture source 'arch.py' does not match"):
        load_enhancer_model("some-zoo-id", cache_dir=cache, offline=False, allow_code=True)
    assert list(cache.iterdir()) == [] and not marker.exists()


def test_package_sha256_mismatch_and_partial_download(tmp_path: Path, fake_download: dict) -> None:
    good = _zip_of(BUNDLED, tmp_path / "good.zip")
    fake_download["zip"] = good
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=f"does not match its sha256: expected {'0' * 64}, got {_sha(good)}"):
        load_enhancer_model("some-zoo-id", cache_dir=cache, offline=False, sha256="0" * 64)
    assert list(cache.iterdir()) == []
    fake_download["fail_after"] = 1000  # the connection drops half-way
    with pytest.raises(ModelError, match="could not download model 'some-zoo-id'.*connection reset"):
        load_enhancer_model("some-zoo-id", cache_dir=cache, offline=False)
    assert list(cache.iterdir()) == []  # no partial file left, nothing under the cache name


# ------------------------------------------------------------------ model faults inside the workflow
def _faulty_bundled(tmp_path: Path, kind: str) -> Path:
    """The bundled package with torchscript weights that raise, return NaN, or return a cropped (wrong) shape."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bioimageio.core")
    module = _fault_module(kind)
    d = tmp_path / f"faulty_{kind}"
    shutil.copytree(BUNDLED, d)
    (d / "weights_torchscript.pt").unlink()
    torch.jit.save(torch.jit.script(module), str(d / "fake.pt"))
    text = (BUNDLED / "bioimageio.yaml").read_text()
    start, end = text.index("weights:"), text.index("config:")
    sha = _sha(d / "fake.pt")
    weights = f"weights:\n  torchscript:\n    source: fake.pt\n    sha256: {sha}\n    pytorch_version: 2.13.0\n"
    text = text[:start] + weights + text[end:]
    (d / "bioimageio.yaml").write_text(
        text.replace("name: tda-graph mitochondria EM 2D enhancer", f"name: Faulty {kind}")
    )
    return d


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("raise", "failed on tile.*fake failure"),
        ("nan", "returned [0-9]+ NaN/inf values on tile"),
        # the fake network crops its output by 1 and 2 px; tile 352 = 256 core + 2 x 48 halo
        ("shape", r"returned shape \(1, 351, 350\) on tile.*expected \(1, 352, 352\)"),
    ],
)
def test_model_fault_in_workflow_is_clear_and_graph_stays_usable(tmp_path: Path, kind: str, match: str) -> None:
    from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

    model = load_enhancer_model(_faulty_bundled(tmp_path, kind))
    raw = np.random.default_rng(7).random((96, 96)).astype(np.float32)
    with TrainableDomainAdaptation(raw, workers=2, n_trees=4, selection={"GaussianSmoothing": [1.0]}) as wf:
        wf.paint(Roi((5, 5), (6, 60)), np.ones((1, 55), bool), 1)
        wf.paint(Roi((80, 5), (81, 60)), np.ones((1, 55), bool), 2)
        wf.set_enhancer(model)
        for _ in range(2):  # fails the same way again: nothing (no zeros) was cached
            with pytest.raises(OperatorError) as info:
                wf.request("enhanced")
            msg = str(info.value)
            assert f"model 'Faulty {kind}'" in msg and "tile Roi[0:96, 0:96]" in msg, msg
            assert isinstance(info.value.__cause__, ModelError)
            assert re.search(match, msg, re.S), msg
            assert wf.graph.stats(wf.enhanced)["cached_blocks"] == 0
        # the other outputs keep working, and equal a fresh single-threaded recomputation
        for name in ("features", "probabilities", "segmentation", "enhancer_input"):
            np.testing.assert_array_equal(wf.request(name), wf.graph.recompute(wf.output(name)))
        wf.paint(Roi((40, 40), (41, 50)), np.ones((1, 10), bool), 2)  # painting still propagates
        np.testing.assert_array_equal(wf.request("probabilities"), wf.graph.recompute(wf.probabilities))
        wf.set_enhancer("mitochondria_em2d")  # a working model replaces the faulty one
        out = wf.request("enhanced")
        assert out.shape == (96, 96, 1) and np.all(np.isfinite(out))


# ------------------------------------------------------------------ bundled enhancers: declared halo
@pytest.mark.parametrize("name", ["mitochondria_em2d", "membranes_em2d", "boundaries_em3d"])
def test_bundled_halo_covers_the_network_reach_so_tiles_have_no_seams(name: str) -> None:
    """With only the declared halo as context, tiles equal one whole-image (3D: whole-volume) pass.

    The first bundled packages declared 16 px; the networks react to pixels 31 and 51 px
    away, and tiling changed 0.2 % of the thresholded pixels of an EPFL slice.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("bioimageio.core")
    from scipy import ndimage

    from tda_graph.models import bundled_enhancer
    from tda_graph.workflows.shallow2deep import measure_halo

    pkg = bundled_enhancer(name)
    model = load_enhancer_model(pkg)
    rng = np.random.default_rng(3)
    shape = (400, 496) if model.axes == "yx" else (80, 112, 128)
    # a forest-like map: smooth blobs in [0, 1] with pixel noise
    x = ndimage.gaussian_filter(rng.normal(size=shape), 6 if len(shape) == 2 else 3)
    x = np.clip(0.5 + 4 * x + 0.05 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
    net = torch.jit.load(str(pkg / "weights_torchscript.pt")).eval()
    reach, _ = measure_halo(net, x[(slice(0, 256),) * x.ndim])
    assert model.halo[0] >= reach, f"declared halo {model.halo} < measured reach {reach}"
    whole = model.predict(x[None])[0]
    g = Graph(workers=2)
    src = g.add(ArraySource(x.copy(), model.axes, name="prob"))
    enh = g.add(Enhancer(model, name="enhancer"), image=src)  # context = declared halo only
    tiled = g.request(enh)[..., 0]
    assert g.stats(enh)["blocks_computed"] >= 4  # really tiled
    b = model.halo[0]  # away from the image borders (reflect padding vs. the network's zeros)
    inner = (slice(b, -b),) * x.ndim
    diff = np.abs(tiled[inner] - whole[inner])
    assert diff.max() <= 1e-5, f"tiled vs whole max |diff| {diff.max():.3g}"
    g.close()
