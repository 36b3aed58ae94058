"""Time a `BackupAndRestore` backup costs training, against the checkpoint's write.

For each backup kind, a fresh process builds the benchmark MLP (Adam, N
logical CPU replicas, stage 2 by default), fits `--steps` steps with
`tf_zero.callbacks.BackupAndRestore(save_freq=1)` and records the time each
backup holds the training loop; then, as many times, trains a step, writes
the state with `tf_zero.Checkpoint.write` and removes the previous write (the
backups' pattern, whose earlier writes the kernel writes back meanwhile). Kinds: `h5` (the default `.weights.h5`
backups), `sharded` (`sharded=True`: a `tf_zero.Checkpoint`), `sharded_async`
(`sharded=True, asynchronous=True`: written in the background; a backup
waits for the previous one, so back-to-back backups hold the loop for the
rest of the previous write).

    python benchmarks/backup.py [--params 3e5 50e6] [--replicas 4] [--stage 2] [--steps 4]
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

KINDS = {"h5": {}, "sharded": {"sharded": True},
         "sharded_async": {"sharded": True, "asynchronous": True}}


def child(n, params, stage, steps, kind, directory):
    devices = _common.configure_cpus(n)
    import keras  # noqa: F401

    import tf_zero
    from tf_zero import callbacks

    _, model = _common.make_strategy_and_model(f"stage{stage}", devices, _common.hidden_for(params))
    x, y = _common.make_data(16 * n * steps)
    save, held = callbacks.BackupAndRestore._save, []

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        save(self, *args, **kwargs)
        held.append(time.perf_counter() - start)

    callbacks.BackupAndRestore._save = timed
    backup = callbacks.BackupAndRestore(os.path.join(directory, "backup"), save_freq=1,
                                        **KINDS[kind])
    os.sync()  # both series start with nothing of earlier runs waiting to be written back
    model.fit(x, y, batch_size=16 * n, epochs=1, callbacks=[backup], verbose=0)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()
    # The same writes as the backups, in the same pattern: a step, a
    # checkpoint, the previous one removed (the kernel's write-back of the
    # earlier writes runs on the same cores).
    writes = []
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    for i in range(steps):
        model.train_on_batch(x[:16 * n], y[:16 * n])
        start = time.perf_counter()
        checkpoint.write(os.path.join(directory, f"ckpt-{i}"))
        for path in glob.glob(os.path.join(directory, f"ckpt-{i - 1}.*")):
            os.remove(path)
        writes.append(time.perf_counter() - start)
    print(json.dumps({"params": model.count_params(), "held": held, "writes": writes}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, nargs="+", default=[3e5, 50e6])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as directory:
            return child(args.replicas, args.params[0], args.stage, args.steps, args.child,
                         directory)
    print(f"BackupAndRestore(save_freq=1), Adam MLP, N={args.replicas}, stage {args.stage}: "
          "seconds each backup held the training loop (the first includes tracing), and "
          "tf_zero.Checkpoint.write of the same state a step apart, the previous one removed")
    for params in args.params:
        for kind in args.kinds:
            r = json.loads(_common.run_child(
                [os.path.abspath(__file__), "--child", kind, "--params", str(params),
                 "--replicas", str(args.replicas), "--stage", str(args.stage),
                 "--steps", str(args.steps)]))
            print(f"{r['params']:,} parameters, {kind}: backups "
                  + ", ".join(f"{t:.3f}" for t in r["held"]) + " s | checkpoint write "
                  + ", ".join(f"{t:.2f}" for t in r["writes"]) + " s", flush=True)


if __name__ == "__main__":
    main()
