"""Multi-worker ZeRO training, run through the local launcher.

    python -m tf_zero.launch --workers 2 --devices-per-worker 2 examples/multi_worker.py

Each worker reads TF_CONFIG (set by the launcher, or by your cluster), builds
a ZeroStrategy over all workers' replicas, and trains with model.fit on a
tf.data pipeline that Keras shards across workers. BackupAndRestore lets a
relaunched job resume after a worker dies.

Options:
    --configs adam:2 sgd:1 ...   optimizer:stage[:accumulation][:f16] to train in turn
    --epochs E --backup DIR      epochs; backup directory (resume on relaunch)
    --out DIR                    write each worker's final weights there (npz)
    --save DIR                   save the final model and optimizer there, as CONFIG.weights.h5,
                                 a tf.train.Checkpoint CONFIG/ckpt (every worker joins) and a
                                 tf_zero.Checkpoint CONFIG/sharded (every worker writes its shards)
    --save-configs adam:2 ...    only these configs (default: all)
    --timeout S                  collective timeout (a dead peer becomes an error)
    --crash-worker I --crash-epoch E   SIGKILL worker I when epoch E begins (tests)
"""

import argparse
import json
import os
import shutil
import signal
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC CPU allocator keeps large buffers between steps (its default
# one returns them and page-faults them back every step); set before TF starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_zero  # noqa: E402
from tf_zero.callbacks import BackupAndRestore  # noqa: E402

OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
              "adam": lambda: keras.optimizers.Adam(0.01),
              # Partitioned by whole variables: each variable's state on one replica.
              "lamb": lambda: keras.optimizers.Lamb(0.01),
              "adafactor": lambda: keras.optimizers.Adafactor(0.01),
              "muon": lambda: keras.optimizers.Muon(0.01)}


def make_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(7, activation="tanh"),
                             keras.layers.Dense(3),
                             keras.layers.Activation("linear", dtype="float32")])


def make_dataset(global_batch=24, n=96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).with_options(options)


def parse_config(text):
    parts = text.split(":")
    return {"optimizer": parts[0], "stage": int(parts[1]) if len(parts) > 1 else 2,
            "accumulation": int(parts[2]) if len(parts) > 2 else 1,
            "policy": "mixed_float16" if "f16" in parts[3:] else "float32"}


def build(strategy, config):
    keras.mixed_precision.set_global_policy(config["policy"])
    with strategy.scope():
        model = make_model()
        opt = tf_zero.ZeroOptimizer(OPTIMIZERS[config["optimizer"]](), stage=config["stage"],
                                    accumulation_steps=config["accumulation"])
        model.compile(optimizer=opt, loss="mse")
    return model


def save(model, strategy, directory, name):
    """Every worker saves (the optimizer's slots are gathered); one file is written.

    `model.save_weights` publishes one file under several workers by itself
    (tf_zero.saving); a `tf.train.Checkpoint` follows TensorFlow's rule: the
    chief writes it, the other workers write to a scratch directory.
    """
    model.save_weights(os.path.join(directory, f"{name}.weights.h5"))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    if strategy.extended.should_checkpoint:
        checkpoint.write(os.path.join(directory, name, "ckpt"))
    else:
        scratch = tempfile.mkdtemp()
        try:
            checkpoint.write(os.path.join(scratch, "ckpt"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    # Every worker writes its own shards into one checkpoint on the shared
    # directory; the chief publishes it once all parts are written.
    tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(
        os.path.join(directory, name, "sharded"))


class CrashAt(keras.callbacks.Callback):
    def __init__(self, worker, epoch):
        super().__init__()
        self.worker, self.epoch = worker, epoch

    def on_epoch_begin(self, epoch, logs=None):
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index", 0)
        if epoch == self.epoch and task == self.worker:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["adam:2"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backup", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--save-configs", nargs="+", default=None)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--crash-worker", type=int, default=None)
    parser.add_argument("--crash-epoch", type=int, default=None)
    parser.add_argument("--strategy-stage", type=int, default=2,
                        help="3: create the weights sharded (every weight, threshold 0); "
                             "configs then use stage 3")
    args = parser.parse_args()

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=args.timeout)
    strategy = tf_zero.ZeroStrategy(stage=args.strategy_stage, persistence_threshold=0,
                                    communication_options=options)
    task = strategy.cluster_resolver.task_id or 0
    print(f"worker {task}: {strategy.num_replicas_in_sync} replicas in sync", flush=True)
    for text in args.configs:
        config = parse_config(text)
        model = build(strategy, config)
        callbacks = []
        if args.backup:
            callbacks.append(BackupAndRestore(os.path.join(args.backup, text.replace(":", "_"))))
        if args.crash_worker is not None:
            callbacks.append(CrashAt(args.crash_worker, args.crash_epoch))
        history = model.fit(make_dataset(), epochs=args.epochs, verbose=0, callbacks=callbacks)
        print(f"worker {task}: {text} loss {history.history['loss'][-1]:.6f}", flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            np.savez(os.path.join(args.out, f"{text.replace(':', '_')}.worker{task}.npz"),
                     *model.get_weights())
        if args.save and (args.save_configs is None or text in args.save_configs):
            os.makedirs(args.save, exist_ok=True)
            start = time.monotonic()
            save(model, strategy, args.save, text.replace(":", "_"))
            print(f"worker {task}: {text} saved in {time.monotonic() - start:.1f}s", flush=True)
        keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
