"""Stress: 4 reader threads and a painter on one graph; no stale tile, no lost stroke, no deadlock.

Every tile returned while the labels did not change during its request is
compared with a fresh single-threaded recomputation at exactly that label
version (strokes replayed into a second graph). The run is short enough for CI;
``benchmarks/stress.py`` runs the same longer.
"""

import threading
import time

import numpy as np

from operators import ArraySource, FeatureFilters, LabelStore, PixelClassifier, Segmentation
from operators.kernels.synthetic import em_like
from tda_graph import Graph, Roi, TdaError
from tda_graph import testing as kit

SELECTION = {"GaussianSmoothing": [1.0], "GaussianGradientMagnitude": [1.6], "LaplacianOfGaussian": [1.0]}
CLASSES = ("a", "b", "c")
CACHE_CLF = True


def build(raw, workers):
    g = Graph(workers=workers)
    src = g.add(ArraySource(raw, axes="yx"))
    feats = g.add(FeatureFilters(SELECTION), image=src)
    lab = g.add(LabelStore(raw.shape, "yx", CLASSES, block_shape=(32, 32)))
    clf = g.add(
        PixelClassifier(class_names=CLASSES, n_trees=8, n_jobs=1, row_block=32),
        features=feats,
        labels=lab,
        cache=CACHE_CLF,
    )
    seg = g.add(Segmentation(), probabilities=clf)
    return g, {"features": feats, "probabilities": clf, "segmentation": seg}, lab


def random_stroke(rng, shape):
    y, x = int(rng.integers(0, shape[0] - 8)), int(rng.integers(0, shape[1] - 8))
    h, w = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    roi = Roi((y, x), (y + h, x + w))
    mask = rng.random((h, w)) < 0.7
    erase = rng.random() < 0.2
    return roi, mask, 0 if erase else int(rng.integers(1, 4))


def run_stress(seconds=6.0, seed=0, size=128, readers=4, watchdog=60.0):
    raw = em_like((size, size), seed=seed).raw
    g, outs, lab = build(raw, workers=2)
    rng = np.random.default_rng(seed)
    # two classes from the start so requests can be served
    lab.paint(Roi((5, 5), (6, 30)), np.ones((1, 25), bool), 1)
    lab.paint(Roi((100, 5), (101, 30)), np.ones((1, 25), bool), 2)
    strokes = []  # (version after, roi, mask, value)
    tiles = []  # (name, roi, version, array)
    errors, slow = [], []
    stop = threading.Event()
    counts = {"requests": 0, "unstable": 0, "latency": []}
    lock = threading.Lock()
    painting = threading.Lock()  # held for a whole stroke: edit + propagation

    def version():
        with painting:  # a version read between strokes, never in the middle of one
            return lab.version

    def reader(i):
        r = np.random.default_rng(seed * 100 + i)
        names = list(outs)
        while not stop.is_set():
            name = names[int(r.integers(len(names)))]
            roi = kit.random_roi(r, outs[name].spec.shape)
            v0 = version()
            t0 = time.perf_counter()
            try:
                fut = g.request_async(outs[name], roi)
                data = fut.result(timeout=watchdog)
            except TdaError as e:  # e.g. a class erased away: the forest cannot train at this version
                if "at least two classes" not in str(e):
                    errors.append(e)
                continue
            except Exception as e:
                errors.append(e)
                stop.set()
                return
            dt = time.perf_counter() - t0
            if dt > watchdog:
                slow.append((name, roi, dt))
            v1 = version()
            with lock:
                counts["requests"] += 1
                counts["latency"].append(dt)
                if v0 == v1:
                    tiles.append((name, roi, v0, data))
                else:
                    counts["unstable"] += 1

    def painter():
        while not stop.is_set():
            roi, mask, value = random_stroke(rng, raw.shape)
            with painting:
                if value:
                    lab.paint(roi, mask, value)
                else:
                    lab.erase(roi, mask)
                strokes.append((lab.version, roi, mask, value))
            time.sleep(0.02)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads.append(threading.Thread(target=painter))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(watchdog)
    hung = [t for t in threads if t.is_alive()]
    final_labels = lab.to_dense()
    g.close()
    return raw, strokes, tiles, errors, slow, hung, counts, final_labels


def verify(raw, strokes, tiles, final_labels):
    """Replay strokes into a fresh graph; compare tiles at their versions; return (stale, lost)."""
    g, outs, lab = build(raw, workers=1)
    lab.paint(Roi((5, 5), (6, 30)), np.ones((1, 25), bool), 1)
    lab.paint(Roi((100, 5), (101, 30)), np.ones((1, 25), bool), 2)
    by_version = {}
    for t in tiles:
        by_version.setdefault(t[2], []).append(t)
    stale = checked = 0
    pending = sorted(by_version)
    i = 0
    versions = [lab.version]

    def check_at(v):
        nonlocal stale, checked
        for name, roi, _, data in by_version.get(v, []):
            try:
                ref = g.recompute(outs[name], roi)
            except TdaError:
                stale += 1
                continue
            checked += 1
            if not np.array_equal(ref, data):
                stale += 1

    check_at(lab.version)
    for _, roi, mask, value in strokes:
        if value:
            lab.paint(roi, mask, value)
        else:
            lab.erase(roi, mask)
        versions.append(lab.version)
        check_at(lab.version) if lab.version != versions[-2] else None
        i += 1
    lost = int((lab.to_dense() != final_labels).sum())
    g.close()
    del pending
    return stale, lost, checked


def test_readers_and_painter_no_stale_tile_no_lost_stroke():
    raw, strokes, tiles, errors, slow, hung, counts, final = run_stress(seconds=6.0)
    assert not hung, "a thread did not finish: deadlock"
    assert not errors, errors[:3]
    assert not slow
    assert len(strokes) > 50 and counts["requests"] > 20
    stale, lost, checked = verify(raw, strokes, tiles, final)
    print(f"requests {counts['requests']}, strokes {len(strokes)}, tiles checked {checked}, stale {stale}, lost {lost}")
    assert checked > 5
    assert stale == 0 and lost == 0
