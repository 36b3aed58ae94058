"""Backups that survive killed and preempted workers, resuming at the exact step.

`BackupAndRestore` saves at epoch ends or every `save_freq` batches; every
worker joins a save and only the chief writes, publishing `latest.json` last,
atomically; a restore resumes at the exact batch, and SIGTERM on any worker
saves the current step on all of them and exits with `PREEMPTED_EXIT_CODE`.
Under a `ZeroStrategy`, `keras.callbacks.BackupAndRestore` runs as this
class. See docs/checkpoints.md ("Backups") and docs/multi-worker.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
import uuid
import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.checkpoint import parallel
from tf_zero.fault import preemption, saving
from tf_zero.fault.coordination import PREEMPTED_EXIT_CODE, sha256_file

_POINTER = "latest.json"
_FORMAT = 1
_WEIGHTS_NAME = re.compile(r"backup-(\d+)-(\d+)(\.weights\.h5)?")  # a file, or a checkpoint's prefix


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


class BackupAndRestore(keras.callbacks.Callback):
    """Resumable training that survives killed and preempted workers.

    Args:
        backup_dir: directory shared by all workers, used by this job only.
        save_freq: "epoch" (a backup at each epoch end) or an int N (a backup
            every N batches, resumed at that exact batch).
        delete_checkpoint: remove the backups when training ends normally.
        sharded: write each backup as a `tf_zero.Checkpoint` (every worker
            its own shards and slots, nothing gathered) instead of a
            `.weights.h5` file the chief assembles. Either kind restores.
        asynchronous: with `sharded`, write each backup in the background
            (`tf.train.CheckpointOptions(enable_async=True)`): training goes on
            once every worker has a snapshot; `latest.json` names the backup
            once it is published. The next backup waits for the previous one,
            a failure is raised by the next backup or at the end of `fit`,
            and a preemption's backup is written in the foreground.

    Raises:
        ValueError: invalid arguments; at `fit` start, a backup that cannot
            be restored into this model (the message names the cause).
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True, *,
                 sharded=False, asynchronous=False):
        super().__init__()
        if not backup_dir:
            raise ValueError("BackupAndRestore needs a backup_dir.")
        if asynchronous and not sharded:
            raise ValueError("Asynchronous backups are written as tf_zero.Checkpoint: pass "
                             "sharded=True with asynchronous=True.")
        self.sharded, self.asynchronous = bool(sharded), bool(asynchronous)
        self._checkpoint = None
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
        self._check_position(latest)
        return latest

    def _check_position(self, latest):
        """The pointer's epoch and batch: whole numbers, and those its weights
        file's name records (the file is named when it is written)."""
        for field in ("epoch", "batch"):
            value = latest[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{self._pointer} has \"{field}\": {json.dumps(value)}, which is not a "
                    "whole number of epochs or batches: the file was edited or damaged. "
                    f"Set it from the weights file's name (backup-EPOCH-BATCH.weights.h5), "
                    "or delete the directory to start from scratch.")
        named = _WEIGHTS_NAME.fullmatch(str(latest["weights"]))
        if named is None:
            raise ValueError(
                f"{self._pointer} names the weights file {latest['weights']!r}, not one of "
                "this callback's backup-EPOCH-BATCH[.weights.h5] backups: the file was edited "
                "or damaged. Restore it from a copy, or delete the directory to start from "
                "scratch.")
        recorded = (int(named.group(1)), int(named.group(2)))
        if recorded != (latest["epoch"], latest["batch"]):
            raise ValueError(
                f"{self._pointer} says epoch {latest['epoch']} batch {latest['batch']}, but "
                f"the weights file it names, {latest['weights']}, was written at epoch "
                f"{recorded[0]} after {recorded[1]} batches: latest.json was edited or is "
                f"stale, and resuming from it would train from the wrong point. Set "
                f"\"epoch\": {recorded[0]} and \"batch\": {recorded[1]} in it, or delete the "
                "directory to start from scratch.")

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
        parallel.wait_for_saves()  # a backup of an earlier fit still being written
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
        if not latest["weights"].endswith(".weights.h5"):
            self._restore_checkpoint(path, latest)
            return
        if not tf.io.gfile.exists(path):
            raise ValueError(
                f"{self._pointer} names {latest['weights']}, which is missing: another "
                "job or a person removed it. Give each job its own backup_dir.")
        size = tf.io.gfile.stat(path).length
        if size != latest.get("bytes") or sha256_file(path) != latest.get("sha256"):
            raise ValueError(
                f"The backup {path} is truncated or corrupted ({size} bytes, "
                f"{latest.get('bytes')} written; checksum "
                f"{'differs' if size == latest.get('bytes') else 'not checked'}). Restore "
                "the file from a copy, or delete the directory to start from scratch.")
        self._build_optimizer()
        try:
            self.model.load_weights(path)
        except (OSError, KeyError) as e:
            raise ValueError(f"The backup {path} cannot be read ({e}): the file is "
                             "corrupted. Restore it from a copy, or delete the directory "
                             "to start from scratch.") from e
        self._resume_at(latest)

    def _build_optimizer(self):
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)

    def _restore_checkpoint(self, path, latest):
        """A sharded backup: `tf_zero.Checkpoint` checks it before restoring."""
        if not tf.io.gfile.exists(path + ".index"):
            raise ValueError(
                f"{self._pointer} names the backup {latest['weights']}, which is missing: "
                "another job or a person removed it. Give each job its own backup_dir.")
        self._build_optimizer()
        self._new_checkpoint().read(path).assert_existing_objects_matched()
        self._resume_at(latest)

    def _new_checkpoint(self):
        return parallel.Checkpoint(model=self.model, optimizer=self.model.optimizer)

    def _resume_at(self, latest):
        steps = (self.params or {}).get("steps")
        if steps and int(latest["batch"]) > steps:
            raise ValueError(
                f"The backup in {self.backup_dir} was taken after {latest['batch']} batches "
                f"of epoch {latest['epoch']}, but this fit's epochs have {steps} batches. "
                "Resume with the dataset, batch size and steps_per_epoch that wrote the "
                "backup, or delete the directory to start from scratch.")
        # Backups written before positions were normalized say (e, N) at an epoch's end.
        epoch, batch = self._position(latest["epoch"], latest["batch"])
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and epoch >= epochs:
            warnings.warn(
                f"The backup in {self.backup_dir} resumes at epoch {epoch} batch {batch}, but "
                f"this fit runs {epochs} epochs (0 to {epochs - 1}): it trains nothing. The "
                "backed-up run had got that far; to train on, raise epochs, or delete the "
                "directory to start from scratch.", stacklevel=2)
        _private.set_initial_epoch(self.model, epoch)
        self._resume = (epoch, batch)
        _private.set_batches_to_skip(self.model, batch)

    def _position(self, epoch, batches_done):
        """Where training resumes after `batches_done` batches of `epoch`.

        After an epoch's last batch that is the start of the next epoch: a
        backup there resumes as `fit(initial_epoch=epoch + 1)` would, with
        nothing to skip.
        """
        steps = (self.params or {}).get("steps")
        if steps and batches_done >= steps:
            return epoch + 1, 0
        return epoch, batches_done

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
                    f"The backup in {self.backup_dir} was taken after {skip} batches of "
                    f"epoch {epoch}, so fit should have resumed at epoch {epoch} batch "
                    f"{skip}, but its first batch is epoch {self._epoch} batch {batch}: the "
                    "training loop did not skip the batches the backup had trained on. "
                    "Resume with the model.fit call (dataset, batch size, steps_per_epoch) "
                    "that wrote the backup.")

    def on_train_batch_end(self, batch, logs=None):
        self._batches_done = batch + 1
        saved = False
        if self.save_freq != "epoch":
            self._since_save += 1
            if self._since_save >= self.save_freq:
                self._save(*self._position(self._epoch, self._batches_done))
                saved = True
        if self._watch is not None and self._watch.step_boundary():
            if not saved:
                self._save(*self._position(self._epoch, self._batches_done), foreground=True)
            self._exit_preempted()

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        if self._checkpoint is not None:
            self._checkpoint.sync()  # the last background backup, and its failure
        if self._watch is not None:
            if self._watch.stop(at_end=True):
                # SIGTERM after the last step: fit is complete; keep that as a
                # backup (a relaunch trains nothing and goes on to what
                # follows fit) instead of removing the backups and exiting.
                self._save(*self._position(self._epoch, self._batches_done), foreground=True)
                self._exit_preempted()
            signalled = self._watch.received
            self._watch = None
            if signalled:
                # Its SIGTERM came as the other workers ended fit (they had
                # agreed to stop): this worker exits as SIGTERM outside a fit.
                preemption.fit_ended(False)
                os.kill(os.getpid(), signal.SIGTERM)
                return
        preemption.fit_ended(bool(self.delete_checkpoint))
        if self.delete_checkpoint and self._chief and tf.io.gfile.isdir(self.backup_dir):
            for name in tf.io.gfile.listdir(self.backup_dir):
                if name == _POINTER or name.startswith("backup-"):
                    tf.io.gfile.remove(os.path.join(self.backup_dir, name))
            if not tf.io.gfile.listdir(self.backup_dir):
                tf.io.gfile.rmtree(self.backup_dir)

    # -- saving ------------------------------------------------------------------

    def _save(self, epoch, batch, foreground=False):
        self._since_save = 0
        if self.sharded:
            return self._save_checkpoint(epoch, batch, foreground)
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
            previous["weights"] = self._current_backup()
            self._write_pointer_file(path, epoch, batch, name,
                                     bytes=tf.io.gfile.stat(target).length,
                                     sha256=sha256_file(target))

        saving.publish(self.model, self._pointer, write_pointer, atomic=True)
        self._expected_owner = self._job
        old = previous.get("weights")
        if self._chief and old and old != name:
            self._remove_backup(old)

    def _current_backup(self):
        """The backup latest.json names (None without one), once it is checked
        that no other job has written latest.json since this one started."""
        current = self._read_pointer()
        owner = current.get("job") if current else None
        if owner not in (self._expected_owner, self._job):
            raise RuntimeError(
                f"{self.backup_dir} is also written by another job: its latest.json "
                f"now names {current['weights']} from job {owner}. Give each job its "
                "own backup_dir (this job's backups stop here).")
        return current["weights"] if current else None

    def _write_pointer_file(self, path, epoch, batch, name, **checksums):
        """Writes latest.json's record of backup `name` to `path`, synced."""
        record = {"format": _FORMAT, "epoch": epoch, "batch": batch, "weights": name,
                  **checksums, "model": self._signature, "job": self._job,
                  "time": time.time()}
        with open(path, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())

    def _remove_backup(self, name):
        path = os.path.join(self.backup_dir, name)
        paths = [path] if name.endswith(".weights.h5") else tf.io.gfile.glob(path + ".*")
        for path in paths:
            try:
                tf.io.gfile.remove(path)
            except tf.errors.NotFoundError:
                pass

    def _save_checkpoint(self, epoch, batch, foreground):
        """A sharded backup: every worker writes its own part; once the chief
        has published it (in the background when asynchronous), the chief
        points latest.json at it and removes the previous backup."""
        name = f"backup-{epoch:06d}-{batch:06d}"
        if self._checkpoint is None:
            self._checkpoint = self._new_checkpoint()
        if self._chief:
            tf.io.gfile.makedirs(self.backup_dir)

        def point_at_it(path):  # on the chief, after the publish
            old = self._current_backup()
            temporary = f"{self._pointer}.tmp-{uuid.uuid4().hex[:8]}"
            self._write_pointer_file(temporary, epoch, batch, name)
            os.replace(temporary, self._pointer)
            self._expected_owner = self._job
            if old and old != name:
                self._remove_backup(old)

        options = tf.train.CheckpointOptions(
            enable_async=self.asynchronous and not foreground,
            experimental_write_callbacks=[point_at_it] if self._chief else None)
        self._checkpoint.write(os.path.join(self.backup_dir, name), options=options)

    def _exit_preempted(self):
        watch, self._watch = self._watch, None
        watch.stop()
        # A tf_zero.Checkpoint saving in the background (the user's own) is
        # finished first, on every worker, before anyone leaves.
        for error in parallel.wait_for_saves():
            print(f"[tf_zero] worker {self._worker}: a background checkpoint save failed "
                  f"before the preemption: {type(error).__name__}: {error}", flush=True)
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
