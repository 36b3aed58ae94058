"""Median fit step time and peak RSS: MirroredStrategy vs ZeRO stages 1, 2 and 3.

Each mode runs in a process of its own (its peak RSS is its own), and the
modes alternate round by round (mirrored, stage1, stage2, stage3, mirrored,
...), so machine noise hits them alike. In each process the first epoch
(tracing, warm-up) is excluded; the median over the remaining steps is
reported, beside the epoch's wall time over its steps (what Keras' progress
bar shows), the time to the first step (tracing included), the traced step's
op count and the process's peak RSS. Figures are medians over the rounds.
CPU runs use TensorFlow's BFC allocator unless TF_CPU_ALLOCATOR_USE_BFC is set
(`_common`); the allocator that ran is printed.

Workloads (`--model`): `mlp` (3 hidden layers, `--params` / `--hidden`, 32
samples per replica: the quickstart's model at `--hidden 2048`), `mlp27m` and
`gpt2` (see `_common.WORKLOADS`). `--modes ... gradients` adds the floor: the
forward and backward pass alone under MirroredStrategy, no reduction and no
update, which no mode of data-parallel training can beat on the same replicas.

    python benchmarks/step_time.py [--model mlp27m] [--rounds 2] [--replicas 4] [--epochs 3]

Under a mixed policy stages 1-2 keep 16-bit working weights; the modes
`stage1_float32` / `stage2_float32` keep float32 ones (`param_dtype="float32"`):

    python benchmarks/step_time.py --policy mixed_bfloat16 --modes mirrored stage2 stage2_float32
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def child(args):
    """One mode's run; prints one JSON line."""
    devices = _common.configure_cpus(args.replicas)
    import keras

    if args.policy:
        keras.mixed_precision.set_global_policy(args.policy)

    hidden = args.hidden or _common.hidden_for(int(args.params))
    bucket = int(args.bucket_mib * 2**20) if args.bucket_mib else None
    model, x, y, batch = _common.make_workload(args.model, args.child, devices, args.steps,
                                               hidden, args.batch_per_replica, bucket)

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

    warm, timer = Timer(), Timer()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[warm])
    model.fit(x, y, batch_size=batch, epochs=args.epochs - 1, verbose=0, callbacks=[timer])
    print(json.dumps({
        "step": statistics.median(timer.times),
        "epoch_step": statistics.median(timer.epochs) / args.steps,
        "first": warm.first,
        "ops": _common.step_op_count(model, x, y, batch),
        "rss": _common.peak_rss_mib(),
        "params": model.count_params(),
        "steps": len(timer.times),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", *_common.WORKLOADS], default="mlp")
    parser.add_argument("--params", type=float, default=2e6, help="mlp only")
    parser.add_argument("--hidden", type=int, default=None,
                        help="mlp width; overrides --params (quickstart: 2048)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=list(_common.MODES),
                        choices=[*_common.MODES, _common.FLOOR, *_common.FLOAT32_WORKING_MODES],
                        help=f"'{_common.FLOOR}': the forward and backward pass alone "
                             "under MirroredStrategy (no reduction, no update), the floor "
                             "under every mode")
    parser.add_argument("--policy", default=None,
                        help="a Keras mixed-precision policy, e.g. mixed_bfloat16; the modes "
                             "stage1_float32 / stage2_float32 keep float32 working weights")
    parser.add_argument("--rounds", type=int, default=1,
                        help="processes per mode, alternating between the modes")
    parser.add_argument("--epochs", type=int, default=3, help="per process, the first untimed")
    parser.add_argument("--steps", type=int, default=20, help="per epoch")
    parser.add_argument("--batch-per-replica", type=int, default=32, help="mlp only")
    parser.add_argument("--bucket-mib", type=float, default=None,
                        help="ZeroOptimizer's bucket size (default: tf_zero's)")
    parser.add_argument("--plot", default=None, help="write a PNG of the step-time ratios")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is the warm-up)")
    if args.child:
        return child(args)
    forwarded = [a for a in sys.argv[1:] if a != "--plot" and not a.endswith(".png")]
    runs = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            line = _common.run_child([os.path.abspath(__file__), *forwarded, "--child", mode])
            runs[mode].append(json.loads(line))

    def med(mode, key):
        return statistics.median(r[key] for r in runs[mode])

    allocator = ("BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")
                 else "default")
    base = args.modes[0]
    first = runs[base][0]
    what = (_common.WORKLOADS[args.model][0] if args.model != "mlp"
            else f"MLP, Adam, global batch {args.batch_per_replica * args.replicas}")
    if args.policy:
        what += f", {args.policy}"
    print(f"{what}: {first['params']:,} parameters, {args.replicas} replicas, "
          f"{first['steps']} timed steps per process, {args.rounds} round(s), "
          f"CPU allocator: {allocator}")
    ratios = {}
    for mode in args.modes:
        step, rss = med(mode, "step"), med(mode, "rss")
        ratios[mode] = step / med(base, "step")
        print(f"{mode:>14}: median step {step * 1000:8.2f} ms   x{ratios[mode]:.3f} of {base}"
              f"   epoch/steps {med(mode, 'epoch_step') * 1000:8.2f} ms   first step "
              f"{med(mode, 'first'):6.2f} s   traced ops {int(med(mode, 'ops')):,}"
              f"   peak RSS {rss:7.0f} MiB x{rss / med(base, 'rss'):.3f}")
    if args.plot:
        _common.bar_plot(args.plot, ratios, f"median step / {base}",
                         f"{first['params']:,} params, N={args.replicas}")


if __name__ == "__main__":
    main()
