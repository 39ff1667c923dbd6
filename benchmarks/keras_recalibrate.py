"""Benchmark: ``bnkit.keras.recalibrate`` over K batches vs ``model.predict`` over the same batches.

The ratio is the cost of exact recalibration over the floor (inference on the same data). Target: <= 1.25.
Both are timed warm (their compiled step built by a first call, whose time is printed too). ``--eager`` times
``recalibrate(..., compiled=False)``, the eager path used for models that cannot be traced.
Model: ``keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)`` (52 BN layers).
Reports wall-clock medians of interleaved repeats, on the backend given by ``KERAS_BACKEND``
(``--backend`` sets it before Keras is imported).

Run: ``python benchmarks/keras_recalibrate.py --backend jax`` (quick: about a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"), default=None)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="recalibrate with compiled=False (the eager path)")
    args = parser.parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend

    import keras
    import numpy as np

    import bnkit.keras as bk

    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)
    rng = np.random.default_rng(0)
    x = rng.random((args.batches * args.batch_size, 96, 96, 3), dtype=np.float32)
    batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]

    def predict() -> None:
        model.predict(x, batch_size=args.batch_size, verbose=0)

    paths = set()

    def recalibrate() -> None:
        report = bk.recalibrate(model, batches, compiled=not args.eager)
        paths.add("compiled step" if report.compiled else "eager calls")

    cold: dict[str, float] = {}
    for name, fn in (("predict", predict), ("recalibrate", recalibrate)):  # warm-up: compile/trace both once
        start = time.perf_counter()
        fn()
        cold[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {"predict": [], "recalibrate": []}
    for _ in range(args.repeats):
        for name, fn in (("predict", predict), ("recalibrate", recalibrate)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    p, r = statistics.median(times["predict"]), statistics.median(times["recalibrate"])
    # Each repeat times both back to back, so the median of the per-repeat ratios cancels slow drifts of a shared
    # machine; the ratio of the fastest runs is printed beside it as a second, noise-resistant reading.
    paired = statistics.median(b / a for a, b in zip(times["predict"], times["recalibrate"], strict=True))
    fastest = min(times["recalibrate"]) / min(times["predict"])
    print(f"backend {keras.backend.backend()}: MobileNetV2(alpha=0.35, 96x96), {args.batches} x {args.batch_size}")
    print(f"predict      {p:8.3f} s")
    print(f"recalibrate  {r:8.3f} s   ratio {paired:.2f} (target <= 1.25; {', '.join(sorted(paths))})")
    print(f"ratio of the fastest runs {fastest:.2f} (over {args.repeats} paired repeats)")
    first = f"predict {cold['predict']:.3f} s, recalibrate {cold['recalibrate']:.3f} s"
    print(f"first calls (trace/compile included): {first}")


if __name__ == "__main__":
    main()
