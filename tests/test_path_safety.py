"""Paths read from project files and model packages never make tda write outside the outputs the user gave.

Each test crafts a project (or package) with hostile names (``..``, absolute
paths, URLs, symbolic links), runs the command that uses it, and checks both the
error and that no file appeared or changed outside the given output.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from operators.kernels.synthetic import em_like
from tda_graph.frontends.cli import main
from tda_graph.workflows import project as project_mod
from tda_graph.workflows.headless import BatchError, predict_to_file
from tda_graph.workflows.project import load_project

BUNDLED = Path(__file__).resolve().parents[1] / "tda_graph" / "models" / "enhancers" / "mitochondria_em2d"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns) of files (folders: (0, 0)), links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (
                (0, 0) if p.is_dir() and not p.is_symlink() else (st.st_size, st.st_mtime_ns)
            )
    return out


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(project folder, trained project, outside folder)``: an image, its sparse labels, a trained project."""
    d = tmp_path / "job"
    d.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("must survive")
    em = em_like((96, 80), seed=3)
    gt = em.mitochondria > 0
    lab = np.zeros(gt.shape, np.uint8)
    lab[10, 5:60] = 1
    lab[np.nonzero(gt)[0][:40], np.nonzero(gt)[1][:40]] = 2
    with h5py.File(d / "img.h5", "w") as f:
        f["raw"] = em.raw
        f["labels"] = lab
    proj = d / "p.tdap"
    args = ["train", "--image", f"{d}/img.h5:/raw", "--labels", f"{d}/img.h5:/labels", "--trees", "4"]
    assert main([*args, "--project", str(proj), "--enhancer", "mitochondria_em2d"]) == 0
    return d, proj, outside


def craft(proj: Path, name: str, edit) -> Path:
    """A copy of ``proj`` named ``name`` with ``edit(h5file)`` applied.

    The metadata digest is recomputed, as anyone crafting a file can: these tests are
    about what a well-formed but hostile project can make tda do.
    """
    p = proj.with_name(name)
    shutil.copy(proj, p)
    with h5py.File(p, "a") as f:
        edit(f)
        f.attrs[project_mod.DIGEST_ATTR] = project_mod._metadata_digest(f)
    return p


def set_enhancer(**attrs: str):
    def edit(f: h5py.File) -> None:
        g = f["enhancer"]
        for k in list(g.attrs):
            del g.attrs[k]
        for k, v in attrs.items():
            g.attrs[k] = v

    return edit


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import operators.enhancer as enh

    def refuse(source: str, dest: Path) -> None:
        raise AssertionError(f"a project made tda download {source!r}")

    monkeypatch.setattr(enh, "_download_package", refuse)


@pytest.mark.parametrize("name", ["../../outside/evil", "/etc/passwd", "mitochondria_em2d/../../x"])
def test_crafted_enhancer_name_is_refused(work, name: str, no_download) -> None:
    d, proj, outside = work
    p = craft(proj, "crafted.tdap", set_enhancer(name=name))
    before = tree(d.parent)
    with pytest.raises(BatchError, match="no bundled enhancer named.*set the enhancer again"):
        predict_to_file(p, f"{d}/img.h5:/raw", f"{d}/out.h5:/e", "enhanced")
    assert tree(d.parent) == before  # nothing written anywhere, not even the output's work folder


@pytest.mark.parametrize("where", ["https://example.org/evil.zip", "some-zoo-id", "../../outside/nothing.zip"])
def test_crafted_enhancer_path_never_downloads(work, where: str, no_download, capsys) -> None:
    d, proj, outside = work
    p = craft(proj, "crafted.tdap", set_enhancer(path_absolute=where, path_relative=where))
    with pytest.raises(Exception, match="enhancer weights file was not found"):
        load_project(p)  # checked loading: the file must exist
    before = tree(d.parent)
    # `tda info --input` loads without checking files; the enhancer still has to be a local file
    argv = ["info", "--project", str(p), "--input", f"{d}/img.h5:/raw", "--export", "enhanced"]
    assert main(argv) == 2
    assert "local model files only" in capsys.readouterr().err
    assert tree(d.parent) == before


def test_crafted_input_path_writes_only_the_output(work) -> None:
    d, proj, outside = work
    rel = os.path.relpath(d / "img.h5", outside / "a" / "b")  # ../../../job/img.h5 style
    p = craft(
        proj,
        "crafted.tdap",
        lambda f: (
            f["input"].attrs.__setitem__("path_relative", "../" * 8 + rel.lstrip("./")),
            f["input"].attrs.__setitem__("path_absolute", str(outside / "../job/img.h5")),
        ),
    )
    before = tree(d.parent)
    r = predict_to_file(p, f"{d}/img.h5:/raw", f"{d}/out.h5:/probs")
    assert r["finished"]
    after = tree(d.parent)
    assert {k for k in after if k not in before} == {"job/out.h5"}
    assert all(after[k] == v for k, v in before.items())
    assert (outside / "precious.txt").read_text() == "must survive"


def test_symlinked_work_folder_is_refused(work) -> None:
    d, proj, outside = work
    (d / "out.h5.tda-partial").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    with pytest.raises(BatchError, match="tda-partial' is a symbolic link; refusing to write through it"):
        predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/out.h5:/probs")
    assert tree(outside) == before and not (d / "out.h5").exists()
    (d / "link.zarr").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BatchError, match="link.zarr' is a symbolic link"):
        predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/link.zarr")
    assert tree(outside) == before


@pytest.mark.parametrize("inner", ["../escaped", "a/../../escaped", "./x"])
def test_output_dataset_name_cannot_climb_out(work, inner: str) -> None:
    d, proj, outside = work
    before = tree(d.parent)
    with pytest.raises(BatchError, match="has '.' or '..' parts"):
        predict_to_file(proj, f"{d}/img.h5:/raw", f"{d}/out.zarr:{inner}")
    pytest.importorskip("dask.distributed")
    from tda_graph.frontends.distributed import predict_distributed

    with pytest.raises(BatchError, match="has '.' or '..' parts"):
        predict_distributed(proj, f"{d}/img.h5:/raw", f"{d}/out.zarr:{inner}", scheduler="local:1", progress=False)
    assert tree(d.parent) == before


def test_downloaded_package_naming_files_outside_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A downloaded package whose description points its weights outside the package never reaches the cache."""
    import operators.enhancer as enh
    from operators.enhancer import ModelError, load_enhancer_model

    text = (BUNDLED / "bioimageio.yaml").read_text().replace("source: weights_torchscript.pt", "source: ../../w.pt")
    z = tmp_path / "pkg.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in BUNDLED.iterdir():
            zf.write(f, f.name) if f.name != "bioimageio.yaml" else zf.writestr("bioimageio.yaml", text)
    monkeypatch.setattr(enh, "_download_package", lambda source, dest: shutil.copy(z, dest))
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="lacks its torchscript weights '../../w.pt'"):
        load_enhancer_model("evil-model", cache_dir=cache, offline=False)
    assert list(cache.iterdir()) == []
