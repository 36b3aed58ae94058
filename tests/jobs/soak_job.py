"""A multi-worker job with a batch-level backup that kills itself where it is told (the soak).

    python -m tf_zero.launch --workers 2 tests/jobs/soak_job.py --dir D --log L \
        [--fault W:WHERE:SIGNAL] [--out OUT]

It trains examples/multi_worker.py's model (Adam, stage 2) for 3 epochs of 6
batches with tf_zero's BackupAndRestore(save_freq=3) in D, and appends to
L/worker<i>.log its pid, then `begin E B TIME` and `end E B` for every batch it
trains, so a test can tell what each launch trained. `--fault` makes worker W
do SIGNAL once in this launch, at WHERE:

    batch_begin:E:B   when batch B of epoch E begins
    batch_end:E:B     when it has ended, before the backup callback sees it
    save:N            inside this launch's N-th backup write (1 is the first),
                      after half the file is written (the chief's temporary
                      file; another worker's scratch copy)

SIGNAL is KILL (SIGKILL to this worker), TERM (SIGTERM to the launcher, which
forwards it to every worker: they save and exit 75) or KILL_JOB (SIGKILL to
the other workers, the launcher and this worker: the machine is gone). Each
worker writes its final weights to OUT/worker<i>.npz.
"""

import argparse
import glob
import os
import signal
import time
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_zero  # noqa: E402
import multi_worker as example  # noqa: E402

EPOCHS, STEPS, SAVE_FREQ, GLOBAL_BATCH = 3, 6, 3, 12


def make_dataset():
    return example.make_dataset(global_batch=GLOBAL_BATCH, n=GLOBAL_BATCH * STEPS)


class Log(keras.callbacks.Callback):
    """Appends what this worker trains to its log file, one line at a time."""

    def __init__(self, path):
        super().__init__()
        self.file, self.epoch = open(path, "a", buffering=1), 0
        self.file.write(f"pid {os.getpid()}\n")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.file.write(f"begin {self.epoch} {batch} {time.time():.2f}\n")

    def on_train_batch_end(self, batch, logs=None):
        self.file.write(f"end {self.epoch} {batch}\n")


def do(action, log_dir):
    print(f"fault: {action} now", flush=True)
    if action == "TERM":
        os.kill(os.getppid(), signal.SIGTERM)  # the launcher
        return
    if action == "KILL_JOB":
        for path in glob.glob(os.path.join(log_dir, "worker*.log")):
            pids = [int(line.split()[1]) for line in open(path) if line.startswith("pid ")]
            if pids and pids[-1] != os.getpid():
                os.kill(pids[-1], signal.SIGKILL)
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultAt(keras.callbacks.Callback):
    """Does `action` when batch `at` = (epoch, batch) begins or ends."""

    def __init__(self, when, at, action, log_dir):
        super().__init__()
        self.when, self.at, self.action, self.log_dir, self.epoch = when, at, action, log_dir, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.when == "batch_begin" and (self.epoch, batch) == self.at:
            do(self.action, self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        if self.when == "batch_end" and (self.epoch, batch) == self.at:
            do(self.action, self.log_dir)


def fault_in_save(model, n, action, log_dir):
    """Does `action` in the n-th backup write, once half the file is on disk."""
    save_weights, count = model.save_weights, [0]

    def save_weights_then_fault(path, *args, **kwargs):
        result = save_weights(path, *args, **kwargs)
        if os.path.basename(path).startswith("backup-") or ".backup-" in path:
            count[0] += 1
            if count[0] == n:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                do(action, log_dir)
        return result

    object.__setattr__(model, "save_weights", save_weights_then_fault)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fault", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    strategy = tf_zero.ZeroStrategy(communication_options=options)
    task = strategy.cluster_resolver.task_id or 0
    model = example.build(strategy, example.parse_config("adam:2"))
    os.makedirs(args.log, exist_ok=True)
    callbacks = [Log(os.path.join(args.log, f"worker{task}.log"))]
    if args.fault:
        worker, where, *at, action = args.fault.split(":")
        if int(worker) == task and where == "save":
            fault_in_save(model, int(at[0]), action, args.log)
        elif int(worker) == task:
            callbacks.append(FaultAt(where, (int(at[0]), int(at[1])), action, args.log))
    # After the fault, so a fault at a batch's end comes before that batch's backup.
    callbacks.append(tf_zero.callbacks.BackupAndRestore(args.dir, save_freq=SAVE_FREQ))
    model.fit(make_dataset(), epochs=EPOCHS, verbose=0, callbacks=callbacks)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, f"worker{task}.npz"), *model.get_weights())


if __name__ == "__main__":
    main()
