"""Median fit step time: MirroredStrategy vs ZeRO stages 1, 2 and 3.

All models live in one process on the same N replicas and data; their
epochs are interleaved (mirrored, stage1, stage2, stage3, mirrored, ...) so machine
noise hits them alike. The first epoch of each (tracing, warm-up) is
excluded; the median over the remaining steps is reported, with ratios,
beside the epoch's wall time over its steps (what Keras' progress bar shows),
the time to the first step (tracing included) and the traced step's op count.
CPU runs use TensorFlow's BFC allocator unless TF_CPU_ALLOCATOR_USE_BFC is set
(`_common`); the allocator that ran is printed.

    python benchmarks/step_time.py [--params 2e6] [--replicas 4] [--epochs 4]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=2e6)
    parser.add_argument("--hidden", type=int, default=None,
                        help="MLP width; overrides --params (quickstart: 2048)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-replica", type=int, default=32)
    parser.add_argument("--plot", default=None, help="write a PNG of the step-time ratios")
    args = parser.parse_args()
    devices = _common.configure_cpus(args.replicas)
    import keras

    hidden = args.hidden or _common.hidden_for(int(args.params))
    batch = args.batch_per_replica * args.replicas
    x, y = _common.make_data(batch * args.steps)

    class Timer(keras.callbacks.Callback):
        """Each step, each epoch's wall time, and the time to the first step."""

        def __init__(self):
            super().__init__()
            self.times, self.epochs, self.first = [], [], None

        def on_train_begin(self, logs=None):
            self._start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self._epoch)

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if self.first is None:  # tracing, building and the first step
                self.first = time.perf_counter() - self._start
                return
            self.times.append(time.perf_counter() - self._t)

    runs = {}
    for mode in _common.MODES:
        _, model = _common.make_strategy_and_model(mode, devices, hidden)
        runs[mode] = (model, Timer())
    warm = {}
    for epoch in range(args.epochs):
        for mode, (model, timer) in runs.items():
            if epoch == 0:  # warm-up: tracing and the first step, timed apart
                warm[mode] = Timer()
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[warm[mode]])
            else:
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
    params = runs["mirrored"][0].count_params()
    allocator = ("BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")
                 else "default")
    print(f"{params:,} parameters, Adam, {args.replicas} replicas, global batch {batch}, "
          f"{len(runs['mirrored'][1].times)} timed steps each, CPU allocator: {allocator}")
    base = statistics.median(runs["mirrored"][1].times)
    ratios = {}
    for mode, (model, timer) in runs.items():
        med = statistics.median(timer.times)
        ratios[mode] = med / base
        # What Keras' progress bar shows: an epoch's wall time over its steps.
        per_step = statistics.median(timer.epochs) / args.steps
        ops = _common.step_op_count(model, x, y, batch)
        print(f"{mode:>9}: median step {med * 1000:8.2f} ms   x{med / base:.3f} of mirrored"
              f"   epoch/steps {per_step * 1000:8.2f} ms   first step "
              f"{warm[mode].first:6.2f} s   traced ops {ops:,}")
    if args.plot:
        _common.bar_plot(args.plot, ratios, "median step / MirroredStrategy",
                         f"{params:,} params, N={args.replicas}")


if __name__ == "__main__":
    main()
