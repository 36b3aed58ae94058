"""Backups that survive killed and preempted workers, resuming at the exact step.

`BackupAndRestore` here is what `keras.callbacks.BackupAndRestore` becomes
under a `ZeroStrategy` (the Keras class delegates to it; see `_adopt_keras`):

* Every worker joins a save (gathering the shards is collective); only the
  chief writes (`tf_zero.saving.publish`). A backup is a weights file named
  after its position plus `latest.json`, replaced atomically last and
  holding the position (epoch, batches done in it), the file's size and
  SHA-256, a signature of the model and optimizer, and the id of the job
  that wrote it. A crash at any moment leaves the previous complete backup.
* Restoring resumes at that position: `fit` starts at the epoch and skips
  the batches already trained on (they are drawn from the dataset, not
  trained on again), so no batch is replayed or skipped. Keras' own
  `save_freq=<int>` restarts the epoch on mid-epoch weights instead.
* SIGTERM on any worker: all workers agree on a step boundary
  (`tf_zero.preemption`), save a backup of that step and exit with status
  `PREEMPTED_EXIT_CODE` (75). Relaunching resumes there.
* A restore refuses, naming the cause, a truncated or corrupted file, a
  backup of another model or optimizer, or a directory that another job
  wrote while this one was training; a backup written at another replica
  count or stage restores normally (checkpoints are unsharded).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private, preemption, saving

PREEMPTED_EXIT_CODE = preemption.PREEMPTED_EXIT_CODE
_POINTER = "latest.json"
_FORMAT = 1


def _inner_optimizer_name(optimizer):
    while optimizer is not None and hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return type(optimizer).__name__ if optimizer is not None else None


def model_signature(model) -> dict:
    """What a backup must match to be restored into `model`.

    The weights' shapes and dtypes in order (Keras restores by position, and
    layer names change from process to process) and the innermost optimizer
    class: not the replica count, stage or strategy, which checkpoints do not
    depend on.
    """
    weights = [[[int(d) for d in w.shape], str(w.dtype)] for w in model.weights]
    digest = hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]
    return {"weights": digest, "num_weights": len(weights),
            "parameters": int(sum(np.prod(w.shape, dtype=np.int64) for w in model.weights)),
            "optimizer": _inner_optimizer_name(model.optimizer)}


def _describe(signature):
    return (f"{signature['num_weights']} weights, {signature['parameters']:,} parameters, "
            f"shapes {signature['weights']}, optimizer {signature['optimizer']}")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BackupAndRestore(keras.callbacks.Callback):
    """Resumable training that survives killed and preempted workers.

    Args:
        backup_dir: directory shared by all workers, used by this job only.
        save_freq: "epoch" (a backup at each epoch end) or an int N (a backup
            every N batches, resumed at that exact batch).
        delete_checkpoint: remove the backups when training ends normally.

    Raises:
        ValueError: invalid arguments; at `fit` start, a backup that cannot
            be restored into this model (the message names the cause).
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__()
        if not backup_dir:
            raise ValueError("BackupAndRestore needs a backup_dir.")
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(
                f"save_freq must be 'epoch' or a positive number of batches, got {save_freq!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self._pointer = os.path.join(self.backup_dir, _POINTER)
        self._watch = None
        self.last_preemption_seconds = None

    # -- restore ---------------------------------------------------------------

    def _read_pointer(self, starting=False):
        if not tf.io.gfile.exists(self._pointer):
            if starting:
                self._check_no_other_backup()
            return None
        try:
            with open(self._pointer) as f:
                latest = json.load(f)
            latest["epoch"], latest["batch"], latest["weights"]  # noqa: B018
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self._pointer} is not a tf_zero backup pointer ({e}): the backup "
                "directory is damaged or holds another program's files. Restore it from "
                "a copy, or delete the directory to start from scratch.") from None
        return latest

    def _check_no_other_backup(self):
        """Without latest.json: refuse Keras' own layout; say if a save was cut short."""
        if not tf.io.gfile.isdir(self.backup_dir):
            return
        names = tf.io.gfile.listdir(self.backup_dir)
        keras_files = [n for n in names if n.startswith(("latest.weights.h5",
                                                         "training_metadata.json"))]
        if keras_files:
            raise ValueError(
                f"{self.backup_dir} holds {', '.join(sorted(keras_files))}: a backup in Keras' "
                "own layout (keras.callbacks.BackupAndRestore without a ZeroStrategy), which "
                "records neither the batch nor a checksum, and which several workers may have "
                "written at once. Load it yourself (model.load_weights, fit(initial_epoch=...)) "
                "and move it away, or delete the directory to start from scratch.")
        if any(n.startswith("backup-") for n in names):
            print(f"[tf_zero] {self.backup_dir} has weights files but no latest.json: the "
                  "first backup was cut short, so there is nothing complete to restore; "
                  "starting from scratch.", flush=True)

    def on_train_begin(self, logs=None):
        self._strategy = self.model.distribute_strategy
        self._chief = _private.is_chief(self._strategy)
        self._worker = _private.worker_index(self._strategy)
        self._job = uuid.uuid4().hex
        self._signature = model_signature(self.model)
        self._epoch, self._batches_done, self._since_save = 0, 0, 0
        self._resume = None
        latest = self._read_pointer(starting=True)
        self._expected_owner = latest.get("job") if latest else None
        if latest is not None:
            self._restore(latest)
        self._watch = preemption.PreemptionWatch(self._strategy)
        self._watch.start()

    def _restore(self, latest):
        if latest.get("model") != self._signature:
            saved = latest.get("model")
            raise ValueError(
                f"The backup in {self.backup_dir} was written for another model "
                f"({_describe(saved) if saved else 'unknown'}); this model has "
                f"{_describe(self._signature)}. Give this training its own backup_dir, "
                "or delete that directory to start from scratch.")
        path = os.path.join(self.backup_dir, latest["weights"])
        if not tf.io.gfile.exists(path):
            raise ValueError(
                f"{self._pointer} names {latest['weights']}, which is missing: another "
                "job or a person removed it. Give each job its own backup_dir.")
        size = tf.io.gfile.stat(path).length
        if size != latest.get("bytes") or _sha256(path) != latest.get("sha256"):
            raise ValueError(
                f"The backup {path} is truncated or corrupted ({size} bytes, "
                f"{latest.get('bytes')} written; checksum "
                f"{'differs' if size == latest.get('bytes') else 'not checked'}). Restore "
                "the file from a copy, or delete the directory to start from scratch.")
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(path)
        except (OSError, KeyError) as e:
            raise ValueError(f"The backup {path} cannot be read ({e}): the file is "
                             "corrupted. Restore it from a copy, or delete the directory "
                             "to start from scratch.") from e
        _private.set_initial_epoch(self.model, int(latest["epoch"]))
        self._resume = (int(latest["epoch"]), int(latest["batch"]))
        _private.set_batches_to_skip(self.model, int(latest["batch"]))

    # -- progress ----------------------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batches_done = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if (self._epoch, batch) != (epoch, skip):
                raise RuntimeError(
                    f"Resuming at epoch {epoch} batch {skip}, fit started at epoch "
                    f"{self._epoch} batch {batch}: the training loop did not skip the "
                    "batches of the backup. Use model.fit with a tf.data dataset or arrays.")

    def on_train_batch_end(self, batch, logs=None):
        self._batches_done = batch + 1
        saved = False
        if self.save_freq != "epoch":
            self._since_save += 1
            if self._since_save >= self.save_freq:
                self._save(self._epoch, self._batches_done)
                saved = True
        if self._watch is not None and self._watch.step_boundary():
            if not saved:
                self._save(self._epoch, self._batches_done)
            self._exit_preempted()

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.delete_checkpoint and self._chief and tf.io.gfile.isdir(self.backup_dir):
            for name in tf.io.gfile.listdir(self.backup_dir):
                if name == _POINTER or name.startswith("backup-"):
                    tf.io.gfile.remove(os.path.join(self.backup_dir, name))
            if not tf.io.gfile.listdir(self.backup_dir):
                tf.io.gfile.rmtree(self.backup_dir)

    # -- saving ------------------------------------------------------------------

    def _save(self, epoch, batch):
        self._since_save = 0
        name = f"backup-{epoch:06d}-{batch:06d}.weights.h5"
        target = os.path.join(self.backup_dir, name)
        if self._chief:
            tf.io.gfile.makedirs(self.backup_dir)
        saving.publish(self.model, target, lambda path: self.model.save_weights(path),
                       atomic=True)
        previous = {}

        def write_pointer(path):
            if not self._chief:
                return
            current = self._read_pointer()
            owner = current.get("job") if current else None
            if owner not in (self._expected_owner, self._job):
                raise RuntimeError(
                    f"{self.backup_dir} is also written by another job: its latest.json "
                    f"now names {current['weights']} from job {owner}. Give each job its "
                    "own backup_dir (this job's backups stop here).")
            previous["weights"] = current["weights"] if current else None
            record = {"format": _FORMAT, "epoch": epoch, "batch": batch, "weights": name,
                      "bytes": tf.io.gfile.stat(target).length, "sha256": _sha256(target),
                      "model": self._signature, "job": self._job, "time": time.time()}
            with open(path, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())

        saving.publish(self.model, self._pointer, write_pointer, atomic=True)
        self._expected_owner = self._job
        old = previous.get("weights")
        if self._chief and old and old != name:
            try:
                tf.io.gfile.remove(os.path.join(self.backup_dir, old))
            except tf.errors.NotFoundError:
                pass

    def _exit_preempted(self):
        watch, self._watch = self._watch, None
        watch.stop()
        watch.leave_together()
        start = watch.signal_time
        seconds = None if start is None else time.monotonic() - start
        self.last_preemption_seconds = seconds
        took = "" if seconds is None else f" {seconds:.2f}s after this worker's SIGTERM;"
        print(f"[tf_zero] worker {self._worker}: preempted; saved a backup at epoch "
              f"{self._epoch} after {self._batches_done} batches in {self.backup_dir};{took} "
              f"exiting with status {PREEMPTED_EXIT_CODE}. Relaunch to resume there.",
              flush=True)
        if _private.in_multi_worker_mode(self._strategy):
            # The backup is complete on every worker. Python's shutdown would
            # now wait for TensorFlow's coordination service, whose leader
            # (the chief) may already be gone: seconds of the grace period.
            sys.stderr.flush()
            os._exit(PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)


# -- Keras' own callbacks under a ZeroStrategy -----------------------------------

_KERAS_HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
                "on_train_batch_end", "on_train_end")


def _uses_zero_strategy(model):
    return hasattr(getattr(model, "distribute_strategy", None), "zero_config")


def _adopt_keras():
    """Makes `keras.callbacks.BackupAndRestore` run as `BackupAndRestore` under a ZeroStrategy.

    Keras' callback writes its weights and its epoch number as two files on
    every worker (neither atomic, nor once), resumes a mid-epoch backup at the
    start of its epoch, and ignores SIGTERM. Under a `ZeroStrategy` each of its
    hooks is served by a tf_zero `BackupAndRestore` with the same `backup_dir`,
    `save_freq` and `delete_checkpoint`; elsewhere it is unchanged.
    """
    cls = keras.callbacks.BackupAndRestore
    if getattr(cls, "_tf_zero_adopted", False):
        return
    for hook in _KERAS_HOOKS:
        original = getattr(cls, hook)

        def delegate(self, *args, _hook=hook, _original=original, **kwargs):
            if _hook == "on_train_begin":
                self._tf_zero_engine = None
                if _uses_zero_strategy(self.model):
                    if not self.model.built:
                        return _original(self, *args, **kwargs)  # Keras' own error
                    engine = BackupAndRestore(self.backup_dir, save_freq=self.save_freq,
                                              delete_checkpoint=self.delete_checkpoint)
                    engine.set_model(self.model)
                    self._tf_zero_engine = engine
            engine = getattr(self, "_tf_zero_engine", None)
            if engine is None:
                return _original(self, *args, **kwargs)
            return getattr(engine, _hook)(*args, **kwargs)

        setattr(cls, hook, delegate)
    cls._tf_zero_adopted = True

    checkpoint = keras.callbacks.ModelCheckpoint
    original_begin = checkpoint.on_train_begin

    def multi_worker_begin(self, logs=None):
        if saving.is_multi_worker(self.model):
            if not self.save_weights_only and str(self.filepath).endswith((".h5", ".hdf5")):
                raise ValueError(
                    f"ModelCheckpoint({self.filepath!r}) would save the legacy HDF5 format, "
                    "which cannot be written once and atomically under a multi-worker "
                    "strategy. Use a '.keras' filepath (or save_weights_only=True with "
                    "'.weights.h5').")
            # Keras creates a missing directory on every worker at the first save
            # (os.makedirs without exist_ok): all but one fail with FileExistsError.
            directory = os.path.dirname(str(self.filepath))
            if directory and "{" not in directory and "://" not in directory:
                os.makedirs(directory, exist_ok=True)
        return original_begin(self, logs)

    checkpoint.on_train_begin = multi_worker_begin


_adopt_keras()
