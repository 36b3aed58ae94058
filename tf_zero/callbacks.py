"""Keras callbacks that stay correct with several workers."""

from __future__ import annotations

import json
import os
import tempfile

import keras


def _is_chief(model) -> bool:
    strategy = model.distribute_strategy
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _task_id(model) -> int:
    resolver = getattr(model.distribute_strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


class BackupAndRestore(keras.callbacks.Callback):
    """Resumable training that survives a killed worker and loses nothing.

    Like `keras.callbacks.BackupAndRestore`, with three differences that
    matter under multi-worker and sharded training:

    * every worker joins the save (gathering the shards is collective) but
      only the chief writes into `backup_dir`; the others write to a
      temporary file that is removed at once;
    * a backup is a pair (weights file, metadata) published by atomically
      replacing `latest.json`: a crash at any moment leaves the previous
      complete backup, never a half-written file or weights from one epoch
      paired with the epoch number of another;
    * backups are taken at epoch ends only. (Keras' `save_freq=<int>` saves
      mid-epoch but resumes at the start of that epoch, replaying batches
      onto weights that already saw them.)

    Args:
        backup_dir: directory shared by all workers.
        delete_checkpoint: remove the backups when training ends normally.
    """

    def __init__(self, backup_dir, delete_checkpoint=True, save_freq="epoch"):
        super().__init__()
        if not backup_dir:
            raise ValueError("BackupAndRestore needs a backup_dir.")
        if save_freq != "epoch":
            raise ValueError(
                "tf_zero.callbacks.BackupAndRestore saves at epoch ends only "
                "(save_freq='epoch'): Keras resumes a mid-epoch backup at the "
                "start of its epoch, which would replay batches. Use shorter "
                "epochs (steps_per_epoch) for more frequent backups.")
        self.backup_dir = backup_dir
        self.delete_checkpoint = delete_checkpoint
        self._pointer = os.path.join(backup_dir, "latest.json")

    def on_train_begin(self, logs=None):
        if not os.path.exists(self._pointer):
            return
        with open(self._pointer) as f:
            latest = json.load(f)
        weights = os.path.join(self.backup_dir, latest["weights"])
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.model._initial_epoch = latest["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        chief = _is_chief(self.model)
        generation = f"backup-{epoch + 1:06d}.weights.h5"
        if chief:
            os.makedirs(self.backup_dir, exist_ok=True)
            target = os.path.join(self.backup_dir, generation)
            self.model.save_weights(target, overwrite=True)
            previous = None
            if os.path.exists(self._pointer):
                with open(self._pointer) as f:
                    previous = json.load(f)["weights"]
            fd, tmp = tempfile.mkstemp(dir=self.backup_dir, suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"epoch": epoch + 1, "weights": generation}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._pointer)  # the backup becomes visible here
            if previous and previous != generation:
                try:
                    os.remove(os.path.join(self.backup_dir, previous))
                except FileNotFoundError:
                    pass
        else:
            fd, tmp = tempfile.mkstemp(suffix=f".worker{_task_id(self.model)}.weights.h5")
            os.close(fd)
            try:
                self.model.save_weights(tmp, overwrite=True)
            finally:
                os.remove(tmp)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and _is_chief(self.model) and os.path.isdir(self.backup_dir):
            for name in os.listdir(self.backup_dir):
                os.remove(os.path.join(self.backup_dir, name))
            os.rmdir(self.backup_dir)
