"""Threads: one computation per block, no stale writes, no deadlocks."""

import threading
import time

import numpy as np
from conftest import Hook
from scipy import ndimage

from operators import ArraySource, GaussianSmoothing, Scale
from tda_graph import Graph, Roi


def test_sixteen_threads_same_block_compute_once():
    """Issue item 3: 16 concurrent identical requests compute the block once."""
    g = Graph(workers=4)
    src = g.add(ArraySource(np.arange(128 * 128, dtype=np.float32).reshape(128, 128), axes="yx"))
    h = g.add(Hook(lambda roi: time.sleep(0.2)), image=src, block_shape=(64, 64))
    barrier = threading.Barrier(16)
    results, errors = [None] * 16, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = g.request(h, Roi((10, 10), (20, 20)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert h.calls == 1 and g.stats(h)["blocks_computed"] == 1
    for r in results:
        np.testing.assert_array_equal(r, src.data[10:20, 10:20])


def test_edit_during_compute_is_not_stored():
    """Issue item 4: a result computed from superseded input is never stored as current."""
    inside, release = threading.Event(), threading.Event()
    first = [True]

    def gate(roi):
        if first[0]:
            first[0] = False
            inside.set()
            assert release.wait(10)

    data = np.zeros((64, 64), np.float32)
    g = Graph(workers=2)
    src = g.add(ArraySource(data, axes="yx"))
    h = g.add(Hook(gate), image=src, block_shape=(64, 64))
    down = g.add(Scale(factor=1.0), image=h, cache=True, block_shape=(64, 64))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", g.request(down, Roi((0, 0), (8, 8)))))
    t.start()
    assert inside.wait(10)  # the hook is computing from the old data (zeros)
    src.write(Roi((0, 0), (4, 4)), 9.0)  # the edit lands meanwhile
    release.set()
    t.join(10)
    st = g.stats(h)
    assert st["stale_discards"] >= 1  # the stale block was refused
    # the running request noticed the edit and answered with current data
    np.testing.assert_array_equal(box["r"][:4, :4], 9.0)
    np.testing.assert_array_equal(g.request(down), g.recompute(down))
    assert g.request(down)[0, 0] == 9.0


def test_stale_inflight_result_is_not_reused_by_waiters():
    inside, release = threading.Event(), threading.Event()
    calls = []

    def gate(roi):
        calls.append(roi)
        if len(calls) == 1:
            inside.set()
            assert release.wait(10)

    g = Graph(workers=3)
    src = g.add(ArraySource(np.zeros((32, 32), np.float32), axes="yx"))
    h = g.add(Hook(gate), image=src, block_shape=(32, 32))
    box = {}
    t1 = threading.Thread(target=lambda: box.setdefault("a", g.request(h, max_retries=0)))
    t1.start()
    assert inside.wait(10)
    src.write(Roi((0, 0), (32, 32)), 1.0)
    t2 = threading.Thread(target=lambda: box.setdefault("b", g.request(h, max_retries=0)))
    t2.start()
    time.sleep(0.1)
    release.set()
    t1.join(10)
    t2.join(10)
    np.testing.assert_array_equal(box["b"], 1.0)  # the second request never saw pre-edit data
    np.testing.assert_array_equal(g.request(h), 1.0)


def test_many_readers_and_writers_stay_consistent():
    rng = np.random.default_rng(11)
    data = rng.random((192, 192), dtype=np.float32)
    g = Graph(workers=3)
    src = g.add(ArraySource(data, axes="yx"))
    sm = g.add(GaussianSmoothing(sigma=1.5), image=src, block_shape=(48, 48))
    sc = g.add(Scale(factor=2.0), image=sm, cache=True, block_shape=(64, 64))
    stop = threading.Event()
    errors = []

    def reader(seed):
        r = np.random.default_rng(seed)
        while not stop.is_set():
            a, b = sorted(r.integers(0, 192, 2))
            try:
                g.request(sc, Roi((a, 0), (b + 1, 192)))
            except Exception as e:  # pragma: no cover
                errors.append(e)
                return

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in readers:
        t.start()
    for _ in range(40):
        y, x = rng.integers(0, 180, 2)
        src.write(Roi((y, x), (y + 12, x + 12)), rng.random((12, 12), dtype=np.float32))
    stop.set()
    for t in readers:
        t.join(30)
    assert not errors
    expected = 2.0 * ndimage.gaussian_filter(src.data, 1.5, mode="reflect")
    np.testing.assert_allclose(g.request(sc), expected, rtol=1e-6)
    np.testing.assert_array_equal(g.request(sc), g.recompute(sc))
