"""Keras trainer internals: the symbolic build of `fit`, saves under several
workers, resuming mid-epoch, and clean-up when `fit` ends."""

from __future__ import annotations

import weakref

import tensorflow as tf

# Keras' TensorFlow trainer builds the model symbolically from the first batch
# of fit/evaluate/predict, and to turn a distributed batch into one it
# all-reduces the data (MEAN) across replicas: a batch that does not split
# evenly over the replicas ([11, 11, 10] rows) then fails, and under a
# collective strategy the failed collective poisons every later one. Only the
# batch's structure and shapes matter there, so under a ZeroStrategy the first
# local replica's part is used instead: no communication, no failure.
from keras.src.backend.tensorflow import trainer as _keras_tf_trainer  # noqa: E402

_keras_maybe_symbolic_build = _keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if iterator is not None:
        iterator._tf_zero_model = weakref.proxy(self)  # see set_batches_to_skip
    strategy = self._distribute_strategy
    if iterator is None or strategy is None or not hasattr(strategy, "zero_config"):
        return _keras_maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:
        data_batch = tf.nest.map_structure(
            lambda v: (strategy.experimental_local_results(v)[0]
                       if isinstance(v, tf.distribute.DistributedValues) else v),
            next(it))
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


_keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build


# Saving under several workers. Keras' `model.save_weights` / `model.save`
# write the file on every worker that calls them: two workers writing one
# path collide (HDF5's file lock fails on one of them, whose peer is then left
# in the middle of a collective gather with a half-written file). The three
# writers below are routed through `tf_zero.saving.publish` once it registers
# itself: the chief writes a temporary file and renames it into place, the
# other workers join the collectives and write nothing.
from keras.src.legacy.saving import legacy_h5_format as _keras_legacy_h5  # noqa: E402
from keras.src.saving import saving_lib as _keras_saving_lib  # noqa: E402

_save_router = None  # set by tf_zero.saving: (kind, writer, model, filepath, args) -> result


def route_keras_saves(router) -> None:
    """Sends Keras' weight, model and legacy-HDF5 saves through `router`."""
    global _save_router
    _save_router = router


def _routed(kind, writer):
    def save(model, filepath, *args, **kwargs):
        if _save_router is None:
            return writer(model, filepath, *args, **kwargs)
        return _save_router(kind, writer, model, filepath, args, kwargs)

    save.__wrapped__ = writer
    return save


_keras_saving_lib.save_weights_only = _routed("weights", _keras_saving_lib.save_weights_only)
_keras_saving_lib.save_model = _routed("model", _keras_saving_lib.save_model)
_keras_legacy_h5.save_model_to_hdf5 = _routed("legacy_h5", _keras_legacy_h5.save_model_to_hdf5)


# Resuming in the middle of an epoch: Keras' `fit` can start at an epoch
# (`_initial_epoch`) but not at a batch. A backup callback that restores a
# mid-epoch backup leaves the number of batches to skip on the model; the
# training epoch iterator then draws those batches from the dataset (so the
# data lines up) without training on them, and numbers the rest as Keras
# would have.
_TFEpochIterator = _keras_tf_trainer.TFEpochIterator
_keras_enumerate_iterator = _TFEpochIterator._enumerate_iterator


def set_batches_to_skip(model, batches: int) -> None:
    """The next `fit` of `model` starts its first epoch after `batches` batches."""
    model._tf_zero_skip_batches = int(batches)


def _enumerate_iterator(self):
    model = getattr(self, "_tf_zero_model", None)
    skip = getattr(model, "_tf_zero_skip_batches", 0) if model is not None else 0
    if not skip:
        yield from _keras_enumerate_iterator(self)
        return
    model._tf_zero_skip_batches = 0
    for begin, end, iterator in _keras_enumerate_iterator(self):
        if begin >= skip:
            yield begin, end, iterator
            continue
        if end >= skip:
            raise ValueError(
                f"The backup was taken after batch {skip} but steps_per_execution="
                f"{self.steps_per_execution} groups batches {begin}..{end}: resume "
                "with the steps_per_execution the backup was written with.")
        for _ in range(end - begin + 1):
            next(iterator)  # the batch was trained on before the backup


_TFEpochIterator._enumerate_iterator = _enumerate_iterator


# Keras calls `on_train_end` only when `fit` completes; a callback that holds
# a resource for the duration of `fit` (a SIGTERM handler, a watcher thread)
# registers a release function here, run however `fit` ends.
_keras_fit = _keras_tf_trainer.TensorFlowTrainer.fit
_fit_cleanups = []


def on_fit_exit(release) -> None:
    """Runs `release()` when the `fit` in progress returns or raises."""
    _fit_cleanups.append(release)


def _fit(self, *args, **kwargs):
    depth = len(_fit_cleanups)
    try:
        return _keras_fit(self, *args, **kwargs)
    finally:
        while len(_fit_cleanups) > depth:
            _fit_cleanups.pop()()


_keras_tf_trainer.TensorFlowTrainer.fit = _fit


def set_initial_epoch(model, epoch: int) -> None:
    """The next `fit` of `model` starts at `epoch` (as `initial_epoch` would)."""
    model._initial_epoch = int(epoch)
