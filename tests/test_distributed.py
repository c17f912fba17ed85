"""`tda predict --scheduler`: blockwise prediction on dask.distributed, identical to one process, resumable."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from operators.kernels.synthetic import em_like  # noqa: E402
from tda_graph.frontends.cli import main  # noqa: E402
from tda_graph.frontends.distributed import (  # noqa: E402
    _client,
    _prepare_output,
    predict_distributed,
    restore_environ,
    write_block,
)
from tda_graph.workflows.blocks import block_grid, predict_block  # noqa: E402
from tda_graph.workflows.headless import BatchError, predict_to_file, train_project  # noqa: E402
from tda_graph.workflows.strokes import simulate_strokes  # noqa: E402

MEMORY = 12_000_000  # per-slice features: 2 x 64 x 64 blocks, 2 x 3 x 3 of the 4 x 192 x 192 volume


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    ems = [em_like((192, 192), seed=s) for s in range(4)]
    raw = np.stack([e.raw for e in ems])
    labels = np.zeros(raw.shape, np.uint8)
    for z in (0, 2):
        gt = ems[z].mitochondria > 0
        for s in simulate_strokes({1: ~gt, 2: gt}, pixels_per_class=150, seed=z):
            labels[z][s.roi.to_slices()][s.mask] = s.label
    zarr.create_array(str(d / "img.zarr"), data=raw, chunks=(2, 64, 64))
    zarr.create_array(str(d / "lab.zarr"), data=labels, chunks=(2, 64, 64))
    proj = d / "p.tdap"
    train_project(str(d / "img.zarr"), str(d / "lab.zarr"), proj, in_2d=True, n_trees=8)
    refs = {}
    for export in ("probabilities", "segmentation"):
        predict_to_file(proj, str(d / "img.zarr"), str(d / f"ref-{export}.zarr"), export, memory=MEMORY)
        refs[export] = zarr.open_group(str(d / f"ref-{export}.zarr"))["data"][...]
    return d, proj, refs


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    client, c = _client("local:2", None)  # what --scheduler local:2 starts: 1 thread, 1 numba thread each
    try:
        yield c, client
    finally:
        client.close()
        c.close()
        restore_environ(saved)  # a worker restarted by a test may have set them again


def read(path):
    return zarr.open_group(str(path))["data"][...]


def test_block_grid_and_predict_block_match_predict_to_file(data):
    d, proj, refs = data
    grid = block_grid(proj, str(d / "img.zarr"), "probabilities", None, MEMORY)
    assert grid.shape == refs["probabilities"].shape and grid.dtype == refs["probabilities"].dtype
    assert len(grid.blocks) == 18 and grid.chunks == (2, 64, 64, 2)
    _, r = grid.blocks[7]
    got = predict_block(proj, str(d / "img.zarr"), "probabilities", r, threads=1)
    np.testing.assert_array_equal(got, refs["probabilities"][r.to_slices()])
    odd = (slice(1, 3), slice(50, 91), slice(100, 140))  # any tiling gives the same voxels
    got = predict_block(proj, str(d / "img.zarr"), "segmentation", odd)
    np.testing.assert_array_equal(got, refs["segmentation"][odd])


def test_two_workers_give_identical_output(data, cluster):
    d, proj, refs = data
    addr = cluster[0].scheduler_address
    r = predict_distributed(
        proj, str(d / "img.zarr"), str(d / "a.zarr"), "probabilities", scheduler=addr, memory=MEMORY, progress=False
    )
    assert r == {"blocks": 18, "computed": 18, "skipped": 0, "finished": True, "shape": (4, 192, 192, 2)}
    np.testing.assert_array_equal(read(d / "a.zarr"), refs["probabilities"])
    assert not (d / "a.zarr.tda-done").exists()
    argv = ["predict", "--project", str(proj), "--input", str(d / "img.zarr"), "--output", str(d / "s.zarr")]
    assert main([*argv, "--export", "segmentation", "--memory", "250M", "--scheduler", addr, "--quiet"]) == 0
    np.testing.assert_array_equal(read(d / "s.zarr"), refs["segmentation"])


def test_killed_worker_run_still_completes_identically(data, cluster):
    d, proj, refs = data
    c, client = cluster

    def slow_down():
        import tda_graph.frontends.distributed as mod
        from tda_graph.workflows.blocks import predict_block as fast

        def slow(*args, **kwargs):
            time.sleep(0.25)
            return fast(*args, **kwargs)

        mod.predict_block = slow

    client.run(slow_down)
    pids = client.run(os.getpid)
    done = d / "k.zarr.tda-done"
    seen: list[int] = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            n = len(list(done.glob("block_*"))) if done.exists() else 0
            if n >= 4:
                seen.append(n)
                os.kill(next(iter(pids.values())), signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    try:
        r = predict_distributed(
            proj, str(d / "img.zarr"), str(d / "k.zarr"), scheduler=c.scheduler_address, memory=MEMORY, progress=False
        )
        assert set(client.run(os.getpid).values()) != set(pids.values())  # a new worker took over
    finally:
        t.join()
        client.restart()  # fresh workers, no slow-down
    assert seen and seen[0] < 18  # the worker died mid-run
    assert r["finished"] and r["computed"] == 18
    np.testing.assert_array_equal(read(d / "k.zarr"), refs["probabilities"])


def test_restart_after_killed_client_computes_only_missing_blocks(data, cluster):
    d, proj, refs = data
    out = str(d / "r.zarr")
    inp = str(d / "img.zarr")
    grid = block_grid(proj, inp, "probabilities", None, MEMORY)
    done, finished = _prepare_output(str(proj), inp, "probabilities", out, "data", grid)
    assert finished == set()
    # what a killed client leaves: some blocks written and marked, one chunk written but not marked,
    # one chunk half-written (garbage) by a killed worker
    marked = grid.blocks[:5]
    for idx, r in marked:
        write_block(str(proj), inp, "probabilities", out, "data", grid.roi.start, r.start, r.stop)
        (done / ("block_" + "_".join(map(str, idx)))).touch()
    _, r5 = grid.blocks[5]
    write_block(str(proj), inp, "probabilities", out, "data", grid.roi.start, r5.start, r5.stop)
    _, r6 = grid.blocks[6]
    zarr.open_array(store=out, path="data", mode="r+")[r6.to_slices()] = 7.0
    chunks = {p: p.stat().st_mtime_ns for p in (d / "r.zarr" / "data" / "c").rglob("*") if p.is_file()}
    assert len(chunks) == 7
    time.sleep(0.05)
    rerun = predict_distributed(proj, inp, out, scheduler=cluster[0].scheduler_address, memory=MEMORY, progress=False)
    assert rerun["skipped"] == 5 and rerun["computed"] == 13
    np.testing.assert_array_equal(read(out), refs["probabilities"])
    changed = sorted(p for p, t in chunks.items() if p.stat().st_mtime_ns != t)
    assert len(changed) == 2  # only the unmarked chunks were written again


def test_errors_and_lazy_dask_import(data, capsys):
    d, proj, _ = data
    with pytest.raises(BatchError, match="zarr only"):
        predict_distributed(proj, str(d / "img.zarr"), str(d / "o.h5:/x"), progress=False)
    with pytest.raises(BatchError, match="neither local:N"):
        predict_distributed(proj, str(d / "img.zarr"), str(d / "o.zarr"), scheduler="slurm", progress=False)
    assert not (d / "o.zarr").exists()  # nothing touched before the scheduler is known to be valid
    argv = ["predict", "--project", str(proj), "--input", str(d / "img.zarr"), "--output", str(d / "o.tif")]
    assert main([*argv, "--scheduler", "local:2", "--quiet"]) != 0
    assert "zarr outputs only" in capsys.readouterr().err
    code = "import sys, tda_graph, tda_graph.frontends.distributed; print('dask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_starts_its_own_local_cluster(data, capsys):
    d, proj, refs = data
    argv = ["predict", "--project", str(proj), "--input", str(d / "img.zarr"), "--output", str(d / "l.zarr:probs")]
    assert main([*argv, "--roi", "0:4,0:64,32:192", "--memory", "250M", "--scheduler", "local:2"]) == 0
    assert "predict" in capsys.readouterr().err  # the progress bar
    got = zarr.open_group(str(d / "l.zarr"))["probs"][...]
    np.testing.assert_array_equal(got, refs["probabilities"][:, :64, 32:])


def test_local_cluster_leaves_this_process_environment_alone(monkeypatch):
    """The nanny's pre-spawn variables must not stick here: numba fails if NUMBA_NUM_THREADS changes."""
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    client, c = _client("local:1", None)
    try:
        assert "NUMBA_NUM_THREADS" not in os.environ and os.environ["OMP_NUM_THREADS"] == "2"
        assert set(client.run(lambda: os.environ.get("NUMBA_NUM_THREADS")).values()) == {"1"}  # workers: 1 thread
    finally:
        client.close()
        c.close()
