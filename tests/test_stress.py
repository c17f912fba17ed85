"""Stress: 4 reader threads and a painter on one workflow; no stale tile, no lost stroke, no deadlock.

The painter mostly paints or erases strokes, and now and then changes the
feature selection (``set_features``) or the class that feeds the enhancer input
(``set_channel``). Every change is one *event*; the inputs a tile is computed
from are therefore identified by the event count (label version + feature
selection + channel) read before and after its request. Every tile whose
request saw no event is compared with a fresh single-threaded recomputation at
exactly that state: the events are replayed into a second workflow. The run is
short enough for CI; ``benchmarks/stress.py`` runs the same longer.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from operators.kernels.synthetic import em_like
from tda_graph import Roi, TdaError
from tda_graph import testing as kit
from tda_graph.workflows.pixel_classification import TrainableDomainAdaptation

#: Feature selections the painter switches between (different channel counts on purpose).
SELECTIONS = (
    {"GaussianSmoothing": [1.0], "GaussianGradientMagnitude": [1.6], "LaplacianOfGaussian": [1.0]},
    {"GaussianSmoothing": [0.7, 1.6], "HessianOfGaussianEigenvalues": [1.0]},
    {"GaussianSmoothing": [1.0], "DifferenceOfGaussians": [1.6], "StructureTensorEigenvalues": [0.7]},
)
CLASSES = ("a", "b", "c")
OUTPUTS = ("features", "probabilities", "segmentation", "enhancer_input")
#: Painter: chance per step of changing the feature selection / the channel instead of painting.
P_FEATURES = 0.04
P_CHANNEL = 0.04


def build(raw: np.ndarray, workers: int) -> TrainableDomainAdaptation:
    wf = TrainableDomainAdaptation(
        raw, axes="yx", selection=SELECTIONS[0], class_names=CLASSES, n_trees=8, channel=1, workers=workers
    )
    wf.graph.configure(wf.probabilities, n_jobs=1, row_block=32)
    # two classes from the start so requests can be served
    wf.paint(Roi((5, 5), (6, 30)), np.ones((1, 25), bool), 1)
    wf.paint(Roi((100, 5), (101, 30)), np.ones((1, 25), bool), 2)
    return wf


def random_stroke(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[Roi, np.ndarray, int]:
    y, x = int(rng.integers(0, shape[0] - 8)), int(rng.integers(0, shape[1] - 8))
    h, w = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    roi = Roi((y, x), (y + h, x + w))
    mask = rng.random((h, w)) < 0.7
    erase = rng.random() < 0.2
    return roi, mask, 0 if erase else int(rng.integers(1, 4))


def random_event(rng: np.random.Generator, shape: tuple[int, ...], sel: int, channel: int) -> tuple:
    """One painter step: ``("stroke", roi, mask, value)``, ``("features", index)`` or ``("channel", k)``."""
    u = rng.random()
    if u < P_FEATURES:
        return ("features", (sel + 1 + int(rng.integers(len(SELECTIONS) - 1))) % len(SELECTIONS))
    if u < P_FEATURES + P_CHANNEL:
        return ("channel", 1 + (channel + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES))
    return ("stroke", *random_stroke(rng, shape))


def apply_event(wf: TrainableDomainAdaptation, event: tuple) -> None:
    kind = event[0]
    if kind == "features":
        wf.set_features(SELECTIONS[event[1]])
    elif kind == "channel":
        wf.set_channel(event[1])
    else:
        _, roi, mask, value = event
        if value:
            wf.paint(roi, mask, value)
        else:
            wf.erase(roi, mask)


def run_stress(seconds=6.0, seed=0, size=128, readers=4, watchdog=60.0):
    raw = em_like((size, size), seed=seed).raw
    wf = build(raw, workers=2)
    rng = np.random.default_rng(seed)
    events = []  # (event, (label version, selection index, channel) after it)
    tiles = []  # (name, roi, event count, array)
    errors, slow = [], []
    stop = threading.Event()
    counts = {"requests": 0, "unstable": 0, "latency": [], "features": 0, "channel": 0, "stroke": 0}
    lock = threading.Lock()
    painting = threading.Lock()  # held for a whole event: edit + propagation

    def state():
        with painting:  # read between events, never in the middle of one
            return len(events)

    def reader(i):
        r = np.random.default_rng(seed * 100 + i)
        while not stop.is_set():
            name = OUTPUTS[int(r.integers(len(OUTPUTS)))]
            v0 = state()
            op = wf.output(name)
            roi = kit.random_roi(r, op.spec.shape)
            t0 = time.perf_counter()
            try:
                fut = wf.graph.request_async(op, roi)
                data = fut.result(timeout=watchdog)
            except TdaError as e:
                # a class erased away (the forest cannot train at this state), or the feature
                # selection changed the spec under the request: nothing to check
                if "at least two classes" not in str(e) and state() == v0:
                    errors.append(e)
                continue
            except Exception as e:
                errors.append(e)
                stop.set()
                return
            dt = time.perf_counter() - t0
            if dt > watchdog:
                slow.append((name, roi, dt))
            v1 = state()
            with lock:
                counts["requests"] += 1
                counts["latency"].append(dt)
                if v0 == v1:
                    tiles.append((name, roi, v0, data))
                else:
                    counts["unstable"] += 1

    def painter():
        sel, channel = 0, wf.channel
        while not stop.is_set():
            ev = random_event(rng, raw.shape, sel, channel)
            with painting:
                apply_event(wf, ev)
                sel = ev[1] if ev[0] == "features" else sel
                channel = wf.channel
                events.append((ev, (wf.labels.version, sel, channel)))
            counts[ev[0]] += 1
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
    final_labels = wf.labels.to_dense()
    wf.close()
    return raw, events, tiles, errors, slow, hung, counts, final_labels


def verify(raw, events, tiles, final_labels):
    """Replay the events into a fresh workflow; compare tiles at their states; return (stale, lost, checked)."""
    wf = build(raw, workers=1)
    by_state = {}
    for t in tiles:
        by_state.setdefault(t[2], []).append(t)
    stale = checked = 0

    def check_at(n):
        nonlocal stale, checked
        full = {}  # one fresh, single-threaded, cache-free recomputation per output at this state; tiles are crops
        for name, roi, _, data in by_state.get(n, []):
            if name not in full:
                try:
                    full[name] = wf.graph.recompute(wf.output(name))
                except TdaError as e:
                    full[name] = e
            ref = full[name]
            if isinstance(ref, TdaError) or any(b > m for b, m in zip(roi.stop, ref.shape)):
                stale += 1
                continue
            checked += 1
            if not np.array_equal(ref[roi.to_slices()], data):
                stale += 1

    check_at(0)
    for n, (ev, after) in enumerate(events, 1):
        apply_event(wf, ev)
        assert wf.channel == after[2]  # the replay is at the same state
        check_at(n)
    lost = int((wf.labels.to_dense() != final_labels).sum())
    wf.close()
    return stale, lost, checked


def test_readers_and_painter_no_stale_tile_no_lost_stroke():
    raw, events, tiles, errors, slow, hung, counts, final = run_stress(seconds=6.0)
    assert not hung, "a thread did not finish: deadlock"
    assert not errors, errors[:3]
    assert not slow
    assert counts["stroke"] > 50 and counts["requests"] > 20
    assert counts["features"] >= 1 and counts["channel"] >= 1, counts
    stale, lost, checked = verify(raw, events, tiles, final)
    print(
        f"requests {counts['requests']}, strokes {counts['stroke']}, feature changes {counts['features']}, "
        f"channel changes {counts['channel']}, tiles checked {checked}, stale {stale}, lost {lost}"
    )
    assert checked > 5
    assert stale == 0 and lost == 0
