"""Host memory and wall time of saving and restoring a sharded checkpoint.

For each writer (`tf.train.Checkpoint`, `tf_zero.Checkpoint`) and replica
count N, a fresh process builds the benchmark MLP (Adam, stage 2 by default),
trains one step so every slot exists, then:

* save: `Checkpoint(model=..., optimizer=...).write(...)`;
* restore, in a second fresh process: the same checkpoint into a newly
  built model and optimizer on the same N, also trained one step first so
  that its state is allocated (`read(...)`; every value's digest compared
  with the saved one's).

RSS is sampled every 2 ms on a thread; "extra" is the peak during the call
minus the RSS just before it. TensorFlow's CPU allocator (BFC) also reports
its peak bytes in use over its bytes in use before the call. Both are given
in MiB and as a fraction of the model state
(float32 weights and both Adam slots, summed over the model, not per
replica). All N replicas share one process here, so "own shards" is the
whole state: the issue's per-worker bound is that extra stays below one
worker's own shards plus one bucket, and slices written straight from the
shards make it far smaller.

    python benchmarks/checkpoint.py [--params 50e6] [--replicas 1 2 4 8] [--stage 2]
        [--writers tf tf_zero] [--rounds 1] [--plot checkpoint.png]

Writers: `tf` (tf.train.Checkpoint), `tf_zero` (tf_zero.Checkpoint, its
default CRC32C integrity), `tf_zero_sha256` (`integrity="sha256"`),
`tf_zero_async` (`CheckpointOptions(enable_async=True)`: the training
thread's blocked time, then training steps while the write is in flight, their
median time against the same steps alone, and the memory of the whole save
with those steps against the steps alone), `keras` (model.save_weights). With `--rounds R` the writers run in turn R times
(paired runs on the same machine state) and the medians of the wall times
are printed, with each writer's median over `tf`'s.

Run it with another tf_zero on PYTHONPATH (an older checkout, `--writers tf`)
to compare with the path that assembled every slot.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Peak RSS (MiB) while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.before = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.extra = self.peak - self.before
        return False


def _digest(arrays):
    import hashlib

    import numpy as np

    return [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]


class Measured(PeakRss):
    """PeakRss plus the peak of TensorFlow's (BFC) CPU allocator over its usage before."""

    def __enter__(self):
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")
        self.tf_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        return super().__enter__()

    def __exit__(self, *exc):
        import tensorflow as tf

        super().__exit__(*exc)
        self.tf_extra = (tf.config.experimental.get_memory_info("CPU:0")["peak"]
                         - self.tf_before) / 2**20
        return False


def child(n, params, stage, directory, phase, writer):
    """phase "save": train a step, save, print digests; "restore": a fresh
    process builds the model and restores (no memory freed before it)."""
    devices = _common.configure_cpus(n)
    import gc

    import numpy as np
    import tensorflow as tf

    hidden = _common.hidden_for(params)
    _, model = _common.make_strategy_and_model(f"stage{stage}", devices, hidden)
    model.optimizer.build(model.trainable_variables)
    prefix = os.path.join(directory, "ckpt")
    # One step first, in both phases: Keras creates slots sharing one zeros
    # buffer until their first write, and a restore would be charged for
    # materializing them. Extra is then what a save or restore adds on top
    # of the training state.
    x, y = _common.make_data(16 * n)
    model.fit(x, y, batch_size=16 * n, epochs=1, verbose=0)
    if writer.startswith("tf_zero"):
        import functools

        import tf_zero

        make = functools.partial(tf_zero.Checkpoint, integrity=(
            "sha256" if writer == "tf_zero_sha256" else "crc32c"))
        if writer == "tf_zero_async" and phase == "save":
            return background_save(model, make, prefix, x, y, n)
    else:
        make = tf.train.Checkpoint
    h5 = prefix + ".weights.h5"
    gc.collect()
    os.sync()  # the previous writer's dirty pages are not written back during this one
    with Measured() as m:
        if writer == "keras" and phase == "save":
            model.save_weights(h5)
        elif writer == "keras":
            model.load_weights(h5)
        elif phase == "save":
            make(model=model, optimizer=model.optimizer).write(prefix)
        else:
            make(model=model, optimizer=model.optimizer).read(prefix).assert_consumed()
    values = model.get_weights() + [np.asarray(v.numpy()) for v in model.optimizer.variables]
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(json.dumps({"n": n, "params": model.count_params(),
                      "state_mib": model.count_params() * 4 * 3 / 2**20,
                      "seconds": m.seconds, "rss_extra_mib": m.extra, "tf_extra_mib": m.tf_extra,
                      "file_mib": size / 2**20, "digest": _digest(values)}))


def background_save(model, make, prefix, x, y, n):
    """An asynchronous save: the training thread's blocked time, the steps
    trained while the write is in flight, the whole save's time and memory."""
    import gc

    import numpy as np
    import tensorflow as tf

    xb, yb = x[:16 * n], y[:16 * n]
    model.train_on_batch(xb, yb)
    gc.collect()
    with Measured() as alone:  # the same steps without a save
        for _ in range(3):
            model.train_on_batch(xb, yb)
    step_alone = alone.seconds / 3
    values = model.get_weights() + [np.asarray(v.numpy()) for v in model.optimizer.variables]
    saved_digest = _digest(values)  # what the save must hold
    del values
    checkpoint = make(model=model, optimizer=model.optimizer)
    gc.collect()
    steps = []
    with Measured() as m:
        start = time.perf_counter()
        checkpoint.write(prefix, options=tf.train.CheckpointOptions(enable_async=True))
        blocked = time.perf_counter() - start
        pending = checkpoint._tf_zero_save  # noqa: SLF001  (to know when the write ends)
        while pending.thread is not None and pending.thread.is_alive() and len(steps) < 200:
            t = time.perf_counter()
            model.train_on_batch(xb, yb)
            steps.append(time.perf_counter() - t)
        checkpoint.sync()
    directory = os.path.dirname(prefix)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(json.dumps({"n": n, "params": model.count_params(),
                      "state_mib": model.count_params() * 4 * 3 / 2**20,
                      "seconds": m.seconds, "blocked_seconds": blocked,
                      "steps_during_write": len(steps),
                      "step_seconds_during_write": float(np.median(steps)) if steps else None,
                      "step_seconds_alone": step_alone,
                      "steps_alone_rss_extra_mib": alone.extra,
                      "steps_alone_tf_extra_mib": alone.tf_extra,
                      "rss_extra_mib": m.extra, "tf_extra_mib": m.tf_extra,
                      "file_mib": size / 2**20, "digest": saved_digest}))


LABELS = {"tf": "tf.train.Checkpoint", "tf_zero": "tf_zero.Checkpoint",
          "tf_zero_async": "tf_zero.Checkpoint, asynchronous",
          "tf_zero_sha256": 'tf_zero.Checkpoint(integrity="sha256")',
          "keras": "model.save_weights"}


def _print_medians(rows, writers, replicas):
    """Median save and restore seconds per writer and N, and over tf.train.Checkpoint's."""
    import statistics

    for n in replicas:
        median = {(w, name): statistics.median(r[name]["seconds"] for r in rows
                                               if r["writer"] == w and r["n"] == n)
                  for w in writers for name in ("save", "restore")}

        def ratio(w, name):
            return (f" (x{median[w, name] / median['tf', name]:.2f} of tf.train.Checkpoint's)"
                    if "tf" in writers else "")

        for w in writers:
            print(f"median N={n} {LABELS[w]}: save {median[w, 'save']:.2f} s{ratio(w, 'save')}"
                  f" | restore {median[w, 'restore']:.2f} s{ratio(w, 'restore')}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--plot", default=None, help="write a PNG of the extra memory")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--writers", nargs="+", default=["tf", "tf_zero"],
                        choices=["tf", "tf_zero", "tf_zero_sha256", "tf_zero_async", "keras"],
                        help="tf.train.Checkpoint, tf_zero.Checkpoint (CRC32C, or SHA-256), "
                        "Keras' .weights.h5")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the writers in turn this many times; print median times")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.params, args.stage, args.dir, args.phase, args.writers[0])
    print(f"Checkpoint of the {args.params:.3g}-parameter Adam MLP at stage {args.stage}; extra = "
          "peak during the call minus usage before it")
    rows = []
    runs = [(w, n) for _ in range(args.rounds) for n in args.replicas for w in args.writers]
    for writer, n in runs:
        with tempfile.TemporaryDirectory() as directory:
            save, restore = (json.loads(_common.run_child(
                [os.path.abspath(__file__), "--child", str(n), "--params", str(args.params),
                 "--stage", str(args.stage), "--dir", directory, "--phase", phase,
                 "--writers", writer]))
                for phase in ("save", "restore"))
        state = save["state_mib"]
        r = {"writer": writer, "n": n, "state_mib": state, "file_mib": save["file_mib"],
             "identical": save["digest"] == restore["digest"]}
        for name, m in (("save", save), ("restore", restore)):
            r[name] = {k: m[k] for k in ("seconds", "rss_extra_mib", "tf_extra_mib")}
        rows.append(r)
        label = LABELS[writer]
        print(f"{label} N={n}: state {state:.0f} MiB, file {r['file_mib']:.0f} MiB | " + " | ".join(
            f"{name} {r[name]['seconds']:.2f} s, extra RSS {r[name]['rss_extra_mib']:.0f} MiB "
            f"(x{r[name]['rss_extra_mib'] / state:.2f}), TensorFlow's allocator "
            f"{r[name]['tf_extra_mib']:.0f} MiB (x{r[name]['tf_extra_mib'] / state:.2f})"
            for name in ("save", "restore")) + f" | restored identical: {r['identical']}",
            flush=True)
        if "blocked_seconds" in save:
            during = save["step_seconds_during_write"]
            print(f"    asynchronous: training blocked {save['blocked_seconds']:.3f} s of the "
                  f"{save['seconds']:.2f} s save; {save['steps_during_write']} steps trained "
                  "during the write, median step "
                  + (f"{during:.3f} s" if during is not None else "-")
                  + f" (alone {save['step_seconds_alone']:.3f} s); the same steps alone: "
                  f"extra RSS {save['steps_alone_rss_extra_mib']:.0f} MiB, allocator "
                  f"{save['steps_alone_tf_extra_mib']:.0f} MiB", flush=True)
            r["save"]["blocked_seconds"] = save["blocked_seconds"]
    if args.rounds > 1:
        _print_medians(rows, args.writers, args.replicas)
    if args.plot:
        _common.line_plot(args.plot, {
            f"{writer} {name}": [(r["n"], r[name]["tf_extra_mib"] / r["state_mib"])
                                 for r in rows if r["writer"] == writer]
            for writer in args.writers for name in ("save", "restore")},
            "replicas", "extra allocator memory / model state",
            f"tf.train.Checkpoint, {args.params:.3g}-parameter Adam MLP, stage {args.stage}")
    if not all(r["identical"] for r in rows):
        sys.exit("a restored value differs from the saved one")


if __name__ == "__main__":
    main()
