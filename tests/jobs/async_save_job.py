"""A multi-worker job saving `tf_zero.Checkpoint` in the background every 2 batches
(a test's worker), with faults injected into the background write.

    python -m tf_zero.launch --workers 2 --devices-per-worker 2 tests/jobs/async_save_job.py \
        --dir D [--stage 2] [--fail W:K] [--signal W:K:SIG] [--backup] [--resume]

Each save K (1, 2, ...) prints `saved K <digest>`, the digest of this worker's
weights and optimizer state at the call. --fail W:K: on worker W, the
background write of save K raises OSError; each worker prints `raised K <error>`
when a later save or `sync` raises it. --signal W:K:SIG: on worker W, the
background write of save K sends SIG (KILL or TERM) to its own process, then
takes 2 more seconds before writing (a write in flight); saves are counted
in this worker's background writes, a sharded backup's included. --backup
[h5|sharded_async] adds tf_zero's BackupAndRestore (every 2 batches; .weights.h5
files, or tf_zero.Checkpoint backups written in the background). --resume restores the newest
checkpoint first and prints `restored <path> <digest>`. Each worker prints
`final <digest>` after fit and writes nothing else.
"""

import argparse
import hashlib
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_zero  # noqa: E402
from tf_zero import _private  # noqa: E402
from tf_zero.checkpoint import parallel  # noqa: E402

ASYNC = tf.train.CheckpointOptions(enable_async=True)
EPOCHS, BATCHES, BATCH = 2, 6, 16


def local_state(model):
    """This worker's weights and its own optimizer state, as arrays."""
    optimizer = model.optimizer
    shards = optimizer.shards
    stored = [v for b, v in zip(shards.plan.buckets, shards.storage) if shards.is_stored(b)]
    local = [c.numpy() for v in [*stored, *(s for b in shards.slots for s in b)]
             for c in _private.components(v)]
    weights = [] if stored else [np.asarray(w) for w in model.get_weights()]
    return weights + local + [optimizer.iterations.numpy()]


def digest(model):
    h = hashlib.sha256()
    for a in local_state(model):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class AsyncSaves(keras.callbacks.Callback):
    def __init__(self, manager):
        super().__init__()
        self.manager, self.count = manager, 0

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % 2:
            return
        self.count += 1
        try:
            self.manager.save(checkpoint_number=self.count, options=ASYNC)
        except Exception as e:  # noqa: BLE001  (the previous save's failure)
            print(f"raised {self.count - 1} {type(e).__name__}: {e}", flush=True)
            self.manager.save(checkpoint_number=self.count, options=ASYNC)
        print(f"saved {self.count} {digest(self.model)}", flush=True)


def inject(worker, fail, sig):
    """Faults in this worker's background writes (save numbers from 1)."""
    write, count = parallel._write_entries, [0]
    lock = threading.Lock()

    def faulty(*args, **kwargs):
        with lock:
            count[0] += 1
            k = count[0]
        if fail and fail == (worker, k):
            raise OSError(f"disk full on worker {worker} (injected) in save {k}")
        if sig and sig[:2] == (worker, k):
            print(f"signal {sig[2]} at save {k} in flight", flush=True)
            os.kill(os.getpid(), getattr(signal, f"SIG{sig[2]}"))
            time.sleep(2.0)
        return write(*args, **kwargs)

    parallel._write_entries = faulty


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--fail", default=None)
    parser.add_argument("--signal", default=None)
    parser.add_argument("--backup", nargs="?", const="h5", default=None,
                        choices=["h5", "sharded_async"])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    strategy = tf_zero.ZeroStrategy(**({"persistence_threshold": 0} if args.stage == 3 else {}))
    worker = _private.worker_index(strategy)
    fail = tuple(int(v) for v in args.fail.split(":")) if args.fail else None
    sig = args.signal.split(":") if args.signal else None
    inject(worker, fail, (int(sig[0]), int(sig[1]), sig[2]) if sig else None)
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(48, activation="tanh"),
                                  keras.layers.Dense(4)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01),
                                                      stage=args.stage), loss="mse")
        model.optimizer.build(model.trainable_variables)
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(args.dir, "ckpt"), 10)
    if args.resume:
        path = manager.latest_checkpoint
        checkpoint.restore(path).assert_consumed()
        print(f"restored {os.path.basename(path)} {digest(model)}", flush=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES * BATCH, 12)).astype("float32")
    y = rng.normal(size=(BATCHES * BATCH, 4)).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).with_options(options)
    callbacks = [AsyncSaves(manager)]
    if args.backup:
        sharded = args.backup == "sharded_async"
        callbacks.insert(0, tf_zero.callbacks.BackupAndRestore(
            os.path.join(args.dir, "backup"), save_freq=2, sharded=sharded,
            asynchronous=sharded))
    model.fit(data, epochs=EPOCHS, callbacks=callbacks, verbose=0)
    try:
        checkpoint.sync()
    except Exception as e:  # noqa: BLE001
        print(f"raised {callbacks[-1].count} {type(e).__name__}: {e}", flush=True)
    print(f"final {digest(model)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
