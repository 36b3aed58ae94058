"""Keras' own saving callbacks under tf_zero: `BackupAndRestore` served by
tf_zero's backup engine under a `ZeroStrategy`, `ModelCheckpoint` made safe
under several workers. The replacements are installed by `patches`."""

from __future__ import annotations

import os

import keras

from tf_zero._private.distribute import in_multi_worker_mode

BACKUP_HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
                "on_train_batch_end", "on_train_end")

_backup_engine = None  # tf_zero.callbacks.BackupAndRestore, registered by patches.install


def register_backup_engine(engine_class) -> None:
    """The class whose instance serves Keras' `BackupAndRestore` under a ZeroStrategy."""
    global _backup_engine
    _backup_engine = engine_class


def _uses_zero_strategy(model) -> bool:
    return hasattr(getattr(model, "distribute_strategy", None), "zero_config")


def backup_hook(name, original):
    """Keras' `BackupAndRestore.<name>`, served by tf_zero's engine under a ZeroStrategy.

    Keras' callback writes its weights and its epoch number as two files on
    every worker (neither atomic, nor once), resumes a mid-epoch backup at the
    start of its epoch, and ignores SIGTERM. Under a `ZeroStrategy` each of its
    hooks is served by a tf_zero `BackupAndRestore` with the same `backup_dir`,
    `save_freq` and `delete_checkpoint`; elsewhere it is unchanged.
    """

    def hook(self, *args, **kwargs):
        if name == "on_train_begin":
            self._tf_zero_engine = None
            if _backup_engine is not None and _uses_zero_strategy(self.model):
                if not self.model.built:
                    return original(self, *args, **kwargs)  # Keras' own error
                engine = _backup_engine(self.backup_dir, save_freq=self.save_freq,
                                        delete_checkpoint=self.delete_checkpoint)
                engine.set_model(self.model)
                engine.set_params(self.params)
                self._tf_zero_engine = engine
        engine = getattr(self, "_tf_zero_engine", None)
        if engine is None:
            return original(self, *args, **kwargs)
        return getattr(engine, name)(*args, **kwargs)

    hook.__wrapped__ = original
    return hook


def model_checkpoint_begin(original):
    """`ModelCheckpoint.on_train_begin`, refusing what several workers cannot
    publish once and creating the directory once."""

    def on_train_begin(self, logs=None):
        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is not None and in_multi_worker_mode(strategy):
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
        return original(self, logs)

    on_train_begin.__wrapped__ = original
    return on_train_begin


KERAS_BACKUP = keras.callbacks.BackupAndRestore
KERAS_MODEL_CHECKPOINT = keras.callbacks.ModelCheckpoint
