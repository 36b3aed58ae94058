"""Keras trainer internals: the symbolic build of `fit`, saves under several
workers, resuming mid-epoch, and clean-up when `fit` ends."""

from __future__ import annotations

import contextlib
import threading
import weakref

import tensorflow as tf

from tf_zero._private.keras_optimizer import can_update, refuse_sharded_weights

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
    if strategy is None or not hasattr(strategy, "zero_config"):
        return _keras_maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)
    for item in iterator if iterator is not None else ():
        it = epoch_item(item, iterator.steps_per_execution)[2]
        data_batch = tf.nest.map_structure(
            lambda v: (strategy.experimental_local_results(v)[0]
                       if isinstance(v, tf.distribute.DistributedValues) else v),
            next(it))
        break
    with strategy.scope(), _unbuilt_optimizer_left_to_training(self):
        self._symbolic_build(data_batch=data_batch)


def epoch_item(item, steps_per_execution):
    """An epoch iterator's item as (first step, last step, data iterator).

    Keras 3.11 and later yield that triple; Keras 3.10 yields (first step,
    data iterator), one item per `steps_per_execution` steps.
    """
    if len(item) == 3:
        return item
    begin, iterator = item
    return begin, begin + steps_per_execution - 1, iterator


# Keras' symbolic build also builds the compiled optimizer, for evaluate and
# predict too. A plain Keras optimizer cannot be built on weights stored as
# shards (stage 3; see keras_optimizer.refuse_sharded_weights), yet a model
# compiled with one only to evaluate (as tutorials reload and compile a model)
# needs no optimizer: it is left unbuilt there, and training refuses it
# (`make_train_function`, or its build in a custom loop) with the fix.

@contextlib.contextmanager
def _unbuilt_optimizer_left_to_training(model):
    optimizer = model.optimizer
    if optimizer is None or optimizer.built:
        yield
        return
    optimizer.built = True  # hidden from Keras' build
    try:
        yield
    finally:
        optimizer.built = False
    if can_update(optimizer, model.trainable_variables):
        optimizer.build(model.trainable_variables)


_keras_make_train_function = _keras_tf_trainer.TensorFlowTrainer.make_train_function


def _make_train_function(self, force=False):
    if self.optimizer is not None:
        refuse_sharded_weights(self.optimizer, self.trainable_variables)
    return _keras_make_train_function(self, force=force)



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


routed_save_weights_only = _routed("weights", _keras_saving_lib.save_weights_only)
routed_save_model = _routed("model", _keras_saving_lib.save_model)
routed_save_model_to_hdf5 = _routed("legacy_h5", _keras_legacy_h5.save_model_to_hdf5)


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
    for item in _skipping_enumerate_iterator(self):  # Keras' items, as its version yields them
        _hold_iterators(self, epoch_item(item, self.steps_per_execution)[2])
        yield item
        # Resumed: the caller has let go of the iterators it was given before.
        _release_dropped_iterators(self)
    _hold_iterators(self, None)  # the iterator Keras made for the next epoch
    _release_dropped_iterators(self)


# Releasing a dataset iterator waits for tf.data's autotuning thread of every
# pipeline in it to end. TensorFlow wakes that thread when the iterator is
# cancelled, but the thread can look at the cancellation before it is recorded
# (`CancellationManager` marks itself cancelled only after running its
# callbacks) and then sleeps out its optimization period, which doubles up to
# a minute (`Model::OptimizeLoop`; its log says "Waiting for 37125 ms." at the
# release). Keras makes a distributed iterator per epoch (and one more at the
# end of each epoch, which the next epoch replaces), and the last references
# to the old ones went away on the training thread as the next epoch began:
# epochs after the first started with a stall of up to a minute per pipeline,
# under any strategy. So the epoch iterator keeps every iterator Keras made,
# and those Keras no longer uses are released on threads of their own. They
# are not daemons: the interpreter waits for a release in progress before it
# finalizes, so no TensorFlow destructor is still running while the process
# exits (an earlier release on a daemon thread was followed by a SIGABRT).
def _hold_iterators(epoch_iterator, yielded) -> None:
    held = getattr(epoch_iterator, "_tf_zero_held", None)
    if held is None:
        held = epoch_iterator._tf_zero_held = []
        # An epoch iterator dies with `fit` (or evaluate, predict), whose
        # frame may still hold the last iterator: what it held is released
        # once that call has returned. Not at exit, when no thread may start.
        weakref.finalize(epoch_iterator, _orphaned_iterators.extend, held).atexit = False
    for iterator in (yielded, epoch_iterator._current_iterator):
        if iterator is not None and not any(iterator is h for h in held):
            held.append(iterator)
    if yielded is not None:
        epoch_iterator._tf_zero_in_use = weakref.ref(yielded)


_orphaned_iterators = []


def _release_dropped_iterators(epoch_iterator) -> None:
    held = epoch_iterator._tf_zero_held
    in_use = getattr(epoch_iterator, "_tf_zero_in_use", lambda: None)()
    current = epoch_iterator._current_iterator
    dropped = [h for h in held if h is not in_use and h is not current]
    held[:] = [h for h in held if h is in_use or h is current]
    del in_use, current
    _release_off_thread(dropped)


def _release_off_thread(iterators: list) -> None:
    """Drops the last references to `iterators`, each on a new, non-daemon thread.

    One thread apiece: their waits overlap instead of adding up.
    """
    taken = iterators[:]
    del iterators[:len(taken)]  # a finalizer may append meanwhile
    while taken:
        box = [taken.pop()]
        threading.Thread(target=box.pop, name="tf_zero_iterator_release").start()
        del box


def releasing_orphaned_iterators(method):
    """`TensorFlowTrainer.evaluate` or `.predict`, releasing off the calling
    thread the iterators of epoch iterators that died since (see `_fit`)."""

    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            _release_off_thread(_orphaned_iterators)

    call.__wrapped__ = method
    return call


def _skipping_enumerate_iterator(self):
    model = getattr(self, "_tf_zero_model", None)
    skip = getattr(model, "_tf_zero_skip_batches", 0) if model is not None else 0
    if not skip:
        yield from _keras_enumerate_iterator(self)
        return
    model._tf_zero_skip_batches = 0
    for item in _keras_enumerate_iterator(self):
        begin, end, iterator = epoch_item(item, self.steps_per_execution)
        if begin >= skip:
            yield item
            continue
        if end >= skip:
            raise ValueError(
                f"The backup was taken after batch {skip} but steps_per_execution="
                f"{self.steps_per_execution} groups batches {begin}..{end}: resume "
                "with the steps_per_execution the backup was written with.")
        for _ in range(end - begin + 1):
            next(iterator)  # the batch was trained on before the backup



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
        _release_off_thread(_orphaned_iterators)



def set_initial_epoch(model, epoch: int) -> None:
    """The next `fit` of `model` starts at `epoch` (as `initial_epoch` would)."""
    model._initial_epoch = int(epoch)


# The step `fit` runs. `model.make_train_function()` leaves a Python closure
# in `model.train_function` that hands a distributed iterator to a
# `tf.function` (`multi_step_on_iterator`: `steps_per_execution` calls of a
# second `tf.function` running `strategy.run(train_step)` and Keras'
# reduction of the results). Tracing that function on an iterator gives the
# graph `fit` executes, without running it. Keras traces with
# `reduce_retracing=True`: a function once traced on a batch of unknown size
# relaxes every later trace to unknown sizes, so each call here makes the
# functions anew and leaves the model's own as they were.
def train_step_function(model):
    """A new `tf.function` like the one Keras' `fit` calls on each iterator.

    Raises:
        ValueError: the model runs eagerly (there is no traced step).
        RuntimeError: Keras' train function no longer has the shape read here.
    """
    if model.run_eagerly:
        raise ValueError(
            "The model was compiled with run_eagerly=True, so fit runs no traced "
            "step to read. Compile it without run_eagerly.")
    previous = model.train_function
    try:
        model.make_train_function(force=True)
        function = model.train_function
    finally:
        model.train_function = previous
    names = getattr(getattr(function, "__code__", None), "co_freevars", ())
    cells = dict(zip(names, getattr(function, "__closure__", None) or ()))
    step = cells["multi_step_on_iterator"].cell_contents if (
        "multi_step_on_iterator" in cells) else None
    if step is None or not hasattr(step, "get_concrete_function"):
        raise RuntimeError(
            "Keras' train function does not hold the tf.function tf_zero reads "
            "(checked on Keras 3.15). Trace the step yourself: pass a tf.function "
            "that calls strategy.run(model.train_step, ...) and its arguments.")
    return step


def symbolic_build(model, data_spec) -> None:
    """Builds the model, its metrics, loss and optimizer as `fit` would, from
    a batch's structure of `tf.TensorSpec`s, without data or communication."""
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=data_spec)
