"""Every change tf_zero makes to Keras' (and tf.data's) classes and modules, in one table.

Each row replaces one attribute process-wide, and each replacement is
guarded at call time: it acts only for a tf_zero optimizer, a `ZeroStrategy`
or a multi-worker model, and otherwise calls what it replaced. The one
exception is the release of dataset iterators (rows marked "always"): the
epoch-start stall it removes is TensorFlow's, under any strategy. `install()`
applies the table once (`import tf_zero` calls it); `PATCHES` lists it, and
`tests/test_private_api.py` checks that list.
"""

from __future__ import annotations

import dataclasses

from tf_zero._private import (distribute, keras_callbacks, keras_layers, keras_optimizer,
                               keras_training)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replaced attribute.

    Attributes:
        owner: the class or module whose attribute is replaced.
        name: the attribute.
        make: given the original, returns the replacement.
        when: when the replacement differs from the original.
    """

    owner: object
    name: str
    make: object
    when: str

    @property
    def target(self) -> str:
        return f"{getattr(self.owner, '__module__', '')}.{self.owner.__name__}.{self.name}" \
            if isinstance(self.owner, type) else f"{self.owner.__name__}.{self.name}"


def _same(replacement):
    return lambda original: replacement


_ko, _kt, _kc = keras_optimizer, keras_training, keras_callbacks

PATCHES = (
    Patch(_ko._keras_tf_optimizer.TFOptimizer, "_backend_update_step",
          _same(_ko._local_backend_update_step),
          "an inner optimizer tf_zero drives updates its replica-local shards; "
          "a plain optimizer given a stage-3 weight raises"),
    Patch(_ko._keras_tf_optimizer.TFOptimizer, "build", _same(_ko._build_refusing_sharded),
          "a Keras optimizer tf_zero does not drive, built on weights stored as shards: "
          "raises naming ZeroOptimizer"),
    Patch(_ko._keras_lso.LossScaleOptimizer, "_tf_apply", _same(_ko._lso_tf_apply),
          "its inner optimizer is a sharded ZeroOptimizer: overflow agreed on reduced shards"),
    Patch(_kt._keras_tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build",
          _same(_kt._maybe_symbolic_build),
          "under a ZeroStrategy: the symbolic build uses the first replica's part of a "
          "batch and leaves to training an optimizer that cannot be built on sharded weights"),
    Patch(keras_layers.KERAS_TF_VARIABLE, "assign", keras_layers.assign_arrays_to_shards,
          "a NumPy value (a weight read from a file) assigned to a weight tf_zero stores "
          "as shards: each replica's shard written from a view of it, no full tensor copy"),
    Patch(_kt._keras_tf_trainer.TensorFlowTrainer, "make_train_function",
          _same(_kt._make_train_function),
          "the compiled optimizer is a Keras optimizer tf_zero does not drive and "
          "weights are stored as shards: raises naming ZeroOptimizer"),
    Patch(_kt._keras_tf_trainer.TensorFlowTrainer, "fit", _same(_kt._fit),
          "a callback registered a release function for the fit in progress; "
          "always: the iterators left by the finished fit are released off its thread"),
    Patch(_kt._TFEpochIterator, "_enumerate_iterator", _same(_kt._enumerate_iterator),
          "a backup callback restored a mid-epoch backup: its batches are skipped; "
          "always: the iterators Keras no longer uses are released off the training thread"),
    Patch(_kt._keras_tf_trainer.TensorFlowTrainer, "evaluate", _kt.releasing_orphaned_iterators,
          "always: the iterators left by a finished evaluate are released off its thread"),
    Patch(_kt._keras_tf_trainer.TensorFlowTrainer, "predict", _kt.releasing_orphaned_iterators,
          "always: the iterators left by a finished predict are released off its thread"),
    Patch(distribute._multi_device_iterator_ops, "_create_device_dataset",
          distribute.device_dataset_without_autotuning,
          "always: a distributed dataset's per-device pipelines run without tf.data autotuning"),
    Patch(_kt._keras_saving_lib, "save_weights_only", _same(_kt.routed_save_weights_only),
          "the model spans several workers: written once, published atomically"),
    Patch(_kt._keras_saving_lib, "save_model", _same(_kt.routed_save_model),
          "the model spans several workers: written once, published atomically"),
    Patch(_kt._keras_legacy_h5, "save_model_to_hdf5", _same(_kt.routed_save_model_to_hdf5),
          "the model spans several workers: refused with the format to use"),
    *(Patch(_kc.KERAS_BACKUP, hook, lambda original, hook=hook: _kc.backup_hook(hook, original),
            "under a ZeroStrategy: served by tf_zero.callbacks.BackupAndRestore")
      for hook in _kc.BACKUP_HOOKS),
    Patch(_kc.KERAS_MODEL_CHECKPOINT, "on_train_begin", _kc.model_checkpoint_begin,
          "the model spans several workers: refuses legacy HDF5, creates the directory once"),
)

_installed = False


def install(*, backup_engine, save_router) -> None:
    """Applies `PATCHES` once per process.

    Args:
        backup_engine: the class serving Keras' `BackupAndRestore` under a
            ZeroStrategy (`tf_zero.callbacks.BackupAndRestore`).
        save_router: `(kind, writer, model, filepath, args, kwargs) -> result`,
            where Keras' writers go (`tf_zero.fault.saving.route`).
    """
    global _installed
    keras_callbacks.register_backup_engine(backup_engine)
    keras_training.route_keras_saves(save_router)
    if _installed:
        return
    for patch in PATCHES:
        setattr(patch.owner, patch.name, patch.make(getattr(patch.owner, patch.name)))
    _installed = True
