"""Overhead of ``bnkit.keras.Monitor`` in ``model.fit()``, on the backend given by ``KERAS_BACKEND``.

Model: ``keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)`` (52 BN layers),
SGD, batch 32. Variants, timed in paired rounds (each round runs one ``fit()`` of ``--steps`` steps of every
variant, in rotating order, on the same model):

- ``plain``: ``fit()`` without the callback;
- ``every=1``: with a Monitor recording every step (JSONL + TensorBoard scalars, histograms every 10 steps);
- ``every=10``: recording every 10th step.

The figure is the median over rounds of each round's ratio to ``plain`` (targets: every=1 <= 1.10,
every=10 <= 1.03). ``--backend`` sets ``KERAS_BACKEND`` before Keras is imported.

Run: ``python benchmarks/keras_monitor.py --backend jax`` (quick: one to three minutes per backend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print per-step medians and paired ratios; return the median ratios.

    Example:
        >>> main(["--rounds", "1", "--steps", "2"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"), default=None)
    parser.add_argument("--steps", type=int, default=10, help="training steps per fit() call (default 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend

    import keras
    import numpy as np

    import bnkit.keras as bk

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)
    model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    x = rng.random((n, 96, 96, 3), dtype=np.float32)
    y = rng.integers(0, 10, n)

    with tempfile.TemporaryDirectory() as tmp:
        monitors = {
            "plain": None,
            "every=1": bk.Monitor(f"{tmp}/every1", every=1, warn=False),
            "every=10": bk.Monitor(f"{tmp}/every10", every=10, warn=False),
        }
        names = list(monitors)
        # Seconds spent inside each monitor's callbacks: the monitor's own cost, less noisy than the wall ratio.
        spent = {name: [0.0] for name in names}
        for name, monitor in monitors.items():
            if monitor is not None:
                for hook in ("on_train_begin", "on_train_batch_end", "on_train_end"):
                    setattr(monitor, hook, _timed(getattr(monitor, hook), spent[name]))

        def run(name: str) -> float:
            callbacks = [] if monitors[name] is None else [monitors[name]]
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, callbacks=callbacks, verbose=0)
            return time.perf_counter() - start

        for name in names:  # warm-up: compile/trace the train step, open the files once
            run(name)
        print(f"backend {keras.backend.backend()}: warm", flush=True)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            spent[name][0] = 0.0
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(run(name) / args.steps)
            paired = "  ".join(f"{n} {times[n][-1] / times['plain'][-1]:.3f}" for n in names if n != "plain")
            print(f"  round {r + 1}: plain {times['plain'][-1] * 1e3:.1f} ms/step, ratios {paired}", flush=True)
        records = {name: len(m.last) for name, m in monitors.items() if m is not None}

    ratios = {
        name: statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))
        for name in names
        if name != "plain"
    }
    print(
        f"backend {keras.backend.backend()}: MobileNetV2(alpha=0.35, 96x96, weights=None) fit(), batch "
        f"{args.batch_size}, {args.rounds} paired rounds x {args.steps} steps per variant"
    )
    for name in names:
        line = f"  {name:9s} {statistics.median(times[name]) * 1e3:8.1f} ms/step"
        if name != "plain":
            target = 1.03 if name == "every=10" else 1.10
            verdict = "ok" if ratios[name] <= target else "ABOVE TARGET"
            line += f"   median paired ratio {ratios[name]:.3f} (target <= {target:.2f}: {verdict})"
            own = spent[name][0] / (args.rounds * args.steps)
            line += (
                f"; in the callback {own * 1e3:.1f} ms/step = {own / statistics.median(times['plain']):.3f} of plain"
            )
        print(line)
    print(f"  layers recorded: {records}")
    return ratios


def _timed(fn, total: list[float]):
    """``fn`` that adds the seconds it runs to ``total[0]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    return wrapper


if __name__ == "__main__":
    main()
