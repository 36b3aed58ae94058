"""A multi-worker training job that saves one way and can be killed (a test's worker).

    python -m tf_zero.launch --workers 2 --devices-per-worker 2 tests/fault_job.py \
        --save keras_backup --dir D [--kill 1:2:0:KILL] [--out OUT]

--save picks how the job saves: keras_backup (keras.callbacks.BackupAndRestore),
zero_backup (tf_zero.callbacks.BackupAndRestore), checkpoint_h5 / checkpoint_keras /
checkpoint_best (keras.callbacks.ModelCheckpoint; a relaunch loads the newest file
and continues from its epoch), user_save (model.save and model.save_weights on every
worker after fit), none. --kill W:E:B:SIG sends SIG (KILL or TERM) to worker W when
batch B of epoch E begins. Each worker writes its final weights to OUT/workerI.npz.
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
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_zero  # noqa: E402
import multi_worker as example  # noqa: E402

EPOCHS = 3


class SignalAt(keras.callbacks.Callback):
    """Sends `sig` to this process when batch `batch` of epoch `epoch` begins."""

    def __init__(self, epoch, batch, sig, delay=0.0):
        super().__init__()
        self.at, self.sig, self.delay, self.epoch = (epoch, batch), sig, delay, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
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
    """(path, epoch) of the newest `e{epoch}` file in `directory`, or (None, 0)."""
    found = []
    for path in glob.glob(os.path.join(directory, "e*")):
        m = re.match(r"e(\d+)\.", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        return None, 0
    epoch, path = max(found)
    return path, epoch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", default="zero_backup")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--config", default="adam:2")
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    strategy = tf_zero.ZeroStrategy(communication_options=options)
    task = strategy.cluster_resolver.task_id or 0
    model = example.build(strategy, example.parse_config(args.config))
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    callbacks, initial_epoch = [Trace(task, args.pause)], 0
    if args.save == "keras_backup":
        callbacks.append(keras.callbacks.BackupAndRestore(args.dir, save_freq=save_freq))
    elif args.save == "zero_backup":
        callbacks.append(tf_zero.callbacks.BackupAndRestore(args.dir, save_freq=save_freq))
    elif args.save.startswith("checkpoint_"):
        suffix = ".keras" if args.save == "checkpoint_keras" else ".weights.h5"
        path, initial_epoch = newest_checkpoint(args.dir)
        if path is not None and path.endswith(".keras"):
            with strategy.scope():
                model = keras.models.load_model(path)
        elif path is not None:
            model.load_weights(path)
        best = args.save == "checkpoint_best"
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(args.dir, "e{epoch}" + suffix), save_best_only=best,
            monitor="loss", save_weights_only=suffix != ".keras"))
    if args.kill:
        worker, epoch, batch, sig = args.kill.split(":")
        if int(worker) == task:
            callbacks.append(SignalAt(int(epoch), int(batch), getattr(signal, "SIG" + sig)))
    model.fit(example.make_dataset(), epochs=EPOCHS, initial_epoch=initial_epoch, verbose=0,
              callbacks=callbacks)
    if args.save == "user_save":
        os.makedirs(args.dir, exist_ok=True)
        model.save(os.path.join(args.dir, "final.keras"))
        model.save_weights(os.path.join(args.dir, "final.weights.h5"))
    print(f"worker {task}: published {json.dumps(tf_zero.saving.published_files())}",
          flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"worker{task}.npz"), *model.get_weights())


if __name__ == "__main__":
    main()
