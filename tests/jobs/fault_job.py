"""A multi-worker training job that saves one way and can be killed (a test's worker).

    python -m tf_zero.launch --workers 2 --devices-per-worker 2 tests/jobs/fault_job.py \
        --save keras_backup --dir D [--kill 1:2:0:KILL] [--out OUT]

--save lists how the job saves (comma-separated): keras_backup
(keras.callbacks.BackupAndRestore), zero_backup (tf_zero.callbacks.BackupAndRestore),
checkpoint_h5 / checkpoint_keras / checkpoint_best (keras.callbacks.ModelCheckpoint into
D/<kind>/e{epoch}...), none. --resume <kind> continues from the newest file of that
ModelCheckpoint (load_model for .keras, load_weights otherwise). --user-save calls
model.save and model.save_weights on every worker after fit. --try-legacy-h5 first
tries the legacy .h5 format, which must be refused before any step. --kill W:E:B:SIG
sends SIG (KILL or TERM) to worker W when batch B of epoch E begins. Each worker
writes its final weights to OUT/workerI.npz.
"""

import argparse
import glob
import json
import os
import re
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_zero  # noqa: E402
import multi_worker as example  # noqa: E402

EPOCHS = 3


class SignalAt(keras.callbacks.Callback):
    """Sends `sig` to this process when batch `batch` of epoch `epoch` begins."""

    def __init__(self, epoch, batch, sig):
        super().__init__()
        self.at, self.sig, self.epoch = (epoch, batch), signal.Signals(sig), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            print(f"signal {self.sig.name} sent at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), self.sig)


class Trace(keras.callbacks.Callback):
    """Prints each batch it trains (epoch, batch), so tests see what ran."""

    def __init__(self, task, pause):
        super().__init__()
        self.task, self.pause, self.epoch = task, pause, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        print(f"worker {self.task}: batch {self.epoch}:{batch}", flush=True)
        if self.pause:
            time.sleep(self.pause)


def newest_checkpoint(directory):
    """(path, epoch) of the newest `e{epoch}` file in `directory`."""
    found = []
    for path in glob.glob(os.path.join(directory, "e*")):
        m = re.match(r"e(\d+)\.", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    epoch, path = max(found)
    return path, epoch


def checkpoint_callback(kind, directory):
    suffix = ".keras" if kind == "checkpoint_keras" else ".weights.h5"
    return keras.callbacks.ModelCheckpoint(
        os.path.join(directory, kind, "e{epoch}" + suffix), monitor="loss",
        save_best_only=kind == "checkpoint_best", save_weights_only=suffix != ".keras")


def refuse_legacy_h5(model, directory):
    """The legacy .h5 format is refused before anything is trained or written."""
    for attempt in (lambda: model.save(os.path.join(directory, "legacy.h5")),
                    lambda: model.fit(example.make_dataset(), epochs=1, verbose=0, callbacks=[
                        keras.callbacks.ModelCheckpoint(os.path.join(directory, "e.h5"))])):
        try:
            attempt()
        except ValueError as e:
            print(f"refused: {str(e)[:160]}", flush=True)
    print(f"steps trained: {int(model.optimizer.iterations.numpy())}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", default="zero_backup", help="comma-separated")
    parser.add_argument("--resume", default=None, help="checkpoint_* to continue from")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--config", default="adam:2")
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--user-save", action="store_true")
    parser.add_argument("--try-legacy-h5", action="store_true")
    args = parser.parse_args()

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    strategy = tf_zero.ZeroStrategy(communication_options=options)
    task = strategy.cluster_resolver.task_id or 0
    model = example.build(strategy, example.parse_config(args.config))
    if args.try_legacy_h5:
        refuse_legacy_h5(model, args.dir)
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    callbacks, initial_epoch = [Trace(task, args.pause)], 0
    for kind in args.save.split(","):
        if kind == "keras_backup":
            callbacks.append(keras.callbacks.BackupAndRestore(args.dir, save_freq=save_freq))
        elif kind == "zero_backup":
            callbacks.append(tf_zero.callbacks.BackupAndRestore(args.dir, save_freq=save_freq))
        elif kind.startswith("checkpoint_"):
            callbacks.append(checkpoint_callback(kind, args.dir))
    if args.resume:
        path, initial_epoch = newest_checkpoint(os.path.join(args.dir, args.resume))
        if path.endswith(".keras"):
            with strategy.scope():
                model = keras.models.load_model(path)
        else:
            model.load_weights(path)
        print(f"worker {task}: continuing from {os.path.basename(path)}", flush=True)
    if args.kill:
        worker, epoch, batch, sig = args.kill.split(":")
        if int(worker) == task:
            callbacks.append(SignalAt(int(epoch), int(batch), getattr(signal, "SIG" + sig)))
    model.fit(example.make_dataset(), epochs=EPOCHS, initial_epoch=initial_epoch, verbose=0,
              callbacks=callbacks)
    if args.user_save:
        model.save(os.path.join(args.dir, "final.keras"))
        model.save_weights(os.path.join(args.dir, "final.weights.h5"))
    print(f"worker {task}: published {json.dumps(tf_zero.saving.published_files())}",
          flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"worker{task}.npz"), *model.get_weights())


if __name__ == "__main__":
    main()
