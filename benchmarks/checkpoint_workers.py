"""Synchronous and asynchronous `tf_zero.Checkpoint` saves across workers.

Launches 2 workers x 2 logical CPUs (tf_zero.launch) that build the benchmark
MLP (Adam, stage 2 by default), train a step, then, `--rounds` times in turn:

* `tf.train.Checkpoint.write` (TensorFlow's rule: the chief writes the shared
  directory, the other worker a scratch copy);
* `tf_zero.Checkpoint.write` (every worker its own slices);
* the same with `CheckpointOptions(enable_async=True)`: the time the training
  thread is blocked, the training steps run while the write is in flight
  (their median time, against the same steps without a save), the time until
  `sync()` returns, and the peak RSS over those of the same steps alone.

Each worker prints its medians; the chief's are summarized.

    python benchmarks/checkpoint_workers.py [--params 50e6] [--stage 2] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(params, stage, rounds, directory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import _common
    import tf_zero
    from checkpoint import Measured
    from tf_zero import _private

    strategy = tf_zero.ZeroStrategy(stage=stage)
    chief = _private.is_chief(strategy)
    index = _private.worker_index(strategy)
    with strategy.scope():
        model = _common.make_model(_common.hidden_for(params))
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(1e-3)), loss="mse")
    x, y = _common.make_data(64)
    model.train_on_batch(x, y)
    with Measured() as alone:
        for _ in range(2):
            model.train_on_batch(x, y)
    step_alone = alone.seconds / 2
    scratch = tempfile.mkdtemp()
    times = {"tf": [], "tf_zero": [], "blocked": [], "async_total": [], "steps": [],
             "step_during": [], "async_rss_extra": []}
    for r in range(rounds):
        shared = os.path.join(directory, f"tf-{r}", "ckpt")
        start = time.perf_counter()
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
            shared if chief else os.path.join(scratch, f"tf-{r}", "ckpt"))
        times["tf"].append(time.perf_counter() - start)
        checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
        start = time.perf_counter()
        checkpoint.write(os.path.join(directory, f"sync-{r}", "ckpt"))
        times["tf_zero"].append(time.perf_counter() - start)
        steps = []
        with Measured() as m:
            start = time.perf_counter()
            checkpoint.write(os.path.join(directory, f"async-{r}", "ckpt"),
                             options=tf.train.CheckpointOptions(enable_async=True))
            times["blocked"].append(time.perf_counter() - start)
            # Every worker trains the same number of steps (collectives):
            # as many as the write took on the chief in the first round.
            for _ in range(2):
                t = time.perf_counter()
                model.train_on_batch(x, y)
                steps.append(time.perf_counter() - t)
            checkpoint.sync()
        times["async_total"].append(m.seconds)
        times["steps"].append(len(steps))
        times["step_during"].append(statistics.median(steps))
        times["async_rss_extra"].append(m.extra)
    medians = {k: statistics.median(v) for k, v in times.items()}
    medians.update(worker=index, step_alone=step_alone, steps_alone_rss_extra=alone.extra,
                   state_mib=model.count_params() * 4 * 3 / 2**20,
                   weights_ok=bool(np.isfinite(model.get_weights()[0]).all()))
    print("RESULT " + json.dumps(medians), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_dir:
        return worker(args.params, args.stage, args.rounds, args.worker_dir)
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.run(
            [sys.executable, "-m", "tf_zero.launch", "--workers", "2",
             "--devices-per-worker", "2", "--timeout", "1500", os.path.abspath(__file__),
             "--params", str(args.params), "--stage", str(args.stage),
             "--rounds", str(args.rounds), "--worker-dir", directory],
            capture_output=True, text=True, timeout=1600)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
               if "RESULT " in line]
    if proc.returncode or len(results) != 2:
        sys.exit(proc.stdout[-5000:] + proc.stderr[-5000:])
    print(f"{args.params:.3g}-parameter Adam MLP, stage {args.stage}, 2 workers x 2 logical "
          f"CPUs, medians of {args.rounds} rounds:")
    for r in sorted(results, key=lambda r: r["worker"]):
        print(f"worker {r['worker']}: tf.train.Checkpoint write {r['tf']:.2f} s | "
              f"tf_zero.Checkpoint write {r['tf_zero']:.2f} s | asynchronous: blocked "
              f"{r['blocked']:.3f} s (x{r['blocked'] / r['tf_zero']:.3f} of the synchronous "
              f"save), {r['steps']:.0f} steps during the write at {r['step_during']:.2f} s "
              f"(alone {r['step_alone']:.2f} s), until sync() {r['async_total']:.2f} s, extra "
              f"RSS {r['async_rss_extra']:.0f} MiB (the same steps alone "
              f"{r['steps_alone_rss_extra']:.0f} MiB; state {r['state_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
