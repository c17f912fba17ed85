"""Engine overhead benchmark.

Measures, in one run:

1. a fully cached 512x512 ROI requested through a 5-operator chain (latency
   per request, against a plain numpy copy of the same bytes as reference);
2. blocks per second of an uncached chain of 5 trivial operators feeding a
   cached output with small blocks (the scheduling cost per block).

Run: ``python benchmarks/bench_engine.py [--workers N] [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from operators import ArraySource, GaussianSmoothing, Scale
from tda_graph import Graph, Roi


def timeit(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def cached_chain(workers: int, repeat: int) -> dict[str, float]:
    data = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    g = Graph(workers=workers)
    node = g.add(ArraySource(data, axes="yx"))
    node = g.add(GaussianSmoothing(sigma=1.0), image=node)
    for i in range(4):
        node = g.add(Scale(factor=1.0 + i), image=node, cache=True)
    roi = Roi((256, 256), (768, 768))  # 512x512 over 4 blocks of 256x256
    g.request(node, roi)  # fill
    g.reset_stats()
    times = timeit(lambda: g.request(node, roi), repeat)
    blocks = g.stats(node)["blocks_computed"]
    ref = timeit(lambda: data[256:768, 256:768].copy(), repeat)
    g.close()
    med, ref_med = statistics.median(times), statistics.median(ref)
    return {
        "median_ms": med * 1e3,
        "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3,
        "numpy_copy_ms": ref_med * 1e3,
        "overhead_ms": (med - ref_med) * 1e3,
        "blocks_recomputed": blocks,
    }


def uncached_chain(workers: int, side: int, block: int) -> dict[str, float]:
    data = np.random.default_rng(0).random((side, side), dtype=np.float32)
    g = Graph(workers=workers)
    node = g.add(ArraySource(data, axes="yx"))
    for i in range(5):
        node = g.add(Scale(factor=1.0 + i), image=node, cache=(i == 4), block_shape=(block, block) if i == 4 else None)
    t0 = time.perf_counter()
    out = g.request(node)
    dt = time.perf_counter() - t0
    assert out.shape == (side, side)
    n_blocks = g.stats(node)["blocks_computed"]
    n_tasks = sum(s["blocks_computed"] for s in g.stats().values())
    g.close()
    return {
        "blocks": n_blocks,
        "tasks": n_tasks,
        "seconds": dt,
        "blocks_per_s": n_blocks / dt,
        "tasks_per_s": n_tasks / dt,
        "us_per_task": dt / n_tasks * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = ap.parse_args()
    workers = a.workers or Graph().workers
    rep = 50 if a.quick else 300
    c = cached_chain(workers, rep)
    print(f"workers={workers}")
    print("cached 512x512 ROI through a 5-operator chain (all blocks cached):")
    print(
        f"  median {c['median_ms']:.3f} ms  p90 {c['p90_ms']:.3f} ms  "
        f"(numpy copy of the same bytes {c['numpy_copy_ms']:.3f} ms; engine overhead {c['overhead_ms']:.3f} ms; "
        f"blocks recomputed {c['blocks_recomputed']})"
    )
    for side, block in ((1024, 64), (2048, 64)) if not a.quick else ((1024, 64),):
        u = uncached_chain(workers, side, block)
        print(f"uncached chain of 5 trivial ops, {side}x{side}, blocks {block}x{block}:")
        print(
            f"  {u['blocks']} output blocks ({u['tasks']} operator calls) in {u['seconds']:.3f} s -> "
            f"{u['blocks_per_s']:.0f} blocks/s, {u['tasks_per_s']:.0f} calls/s, {u['us_per_task']:.0f} us/call"
        )


if __name__ == "__main__":
    main()
