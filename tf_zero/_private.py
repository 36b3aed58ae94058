"""Every private TensorFlow API tf_zero touches, in one place.

TensorFlow exposes no public way to launch a reduce-scatter or all-to-all on
the devices of a `tf.distribute` strategy, to write one replica's component of
a distributed variable, or to choose the local devices of a multi-worker
strategy. The few private entry points used for that are wrapped here, checked
against the TensorFlow versions in `CHECKED_TF_VERSIONS`, and covered by
`tests/test_private.py`. No other tf_zero module imports `tensorflow.python`.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref

import keras
import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as _cars
from tensorflow.python.distribute import distribute_lib as _distribute_lib
from tensorflow.python.distribute import values as _values
from tensorflow.python.ops import collective_ops as _collective_ops
from tensorflow.python.ops import gen_collective_ops as _gen_collective_ops
from tensorflow.python.saved_model import save_context as _save_context

CHECKED_TF_VERSIONS = ("2.21",)
"""TensorFlow minor versions on which every wrapper below was verified."""


def check_tensorflow_version(version: str | None = None) -> None:
    """Fails loudly on a TensorFlow whose private APIs were never checked.

    Raises:
        RuntimeError: the installed TensorFlow minor version is not one of
            `CHECKED_TF_VERSIONS`.
    """
    version = version or tf.__version__
    minor = ".".join(version.split(".")[:2])
    if minor not in CHECKED_TF_VERSIONS:
        raise RuntimeError(
            f"tf_zero was verified on TensorFlow {', '.join(CHECKED_TF_VERSIONS)} "
            f"but TensorFlow {version} is installed. tf_zero uses private "
            "collective APIs that change between releases: install a checked "
            f"version (pip install 'tensorflow=={CHECKED_TF_VERSIONS[-1]}.*')."
        )


check_tensorflow_version()

CollectiveAllReduceStrategyBase = _cars.CollectiveAllReduceStrategy
CollectiveAllReduceExtendedBase = _cars.CollectiveAllReduceExtended
initialize_strategy_base = _distribute_lib.Strategy.__init__

# Collective keys: every collective strategy numbers its collective groups from
# `_collective_key_base`; two strategies with the same base in one process
# collide ("Shape mismatch in the collective instance"). Each new strategy made
# through `next_collective_key_base` gets its own range.
_KEY_STRIDE = 100_000
_key_counter = itertools.count(1)
_key_lock = threading.Lock()


def next_collective_key_base() -> int:
    """A collective-key base no other strategy of this process uses."""
    with _key_lock:
        return next(_key_counter) * _KEY_STRIDE


def _with_own_keys(cls, **kwargs):
    """Constructs a stock collective strategy on a key base of its own."""
    saved = cls._collective_key_base
    cls._collective_key_base = next_collective_key_base()
    try:
        return cls(**kwargs)
    finally:
        cls._collective_key_base = saved


def new_mirrored_strategy(devices=None) -> tf.distribute.MirroredStrategy:
    """A plain `MirroredStrategy` whose collective keys do not collide."""
    return _with_own_keys(tf.distribute.MirroredStrategy, devices=devices)


def new_multi_worker_strategy(cluster_resolver=None, communication_options=None):
    """A plain `MultiWorkerMirroredStrategy` with its own collective keys."""
    return _with_own_keys(tf.distribute.MultiWorkerMirroredStrategy,
                          cluster_resolver=cluster_resolver,
                          communication_options=communication_options)


def in_multi_worker_mode(strategy) -> bool:
    """Whether `strategy` is a collective strategy spanning several workers."""
    extended = strategy.extended
    return isinstance(extended, _cars.CollectiveAllReduceExtended) and bool(
        extended._in_multi_worker_mode())


def local_replica_index() -> int:
    """The index of the current replica among this worker's devices."""
    ctx = tf.distribute.get_replica_context()
    replica_id = ctx._replica_id
    if not isinstance(replica_id, int):
        replica_id = int(tf.get_static_value(replica_id))
    return replica_id


def global_replica_id() -> int:
    """The current replica's id across all workers, as a Python int."""
    ctx = tf.distribute.get_replica_context()
    value = tf.get_static_value(ctx.replica_id_in_sync_group)
    if value is None:
        raise RuntimeError(
            "tf_zero needs the replica id to be known when the step is traced; "
            "run the step with strategy.run inside tf.function.")
    return int(value)


def collective_launcher(strategy):
    """The collective launcher of the current replica, or None.

    Collective strategies (`MultiWorkerMirroredStrategy`, and
    `MirroredStrategy` when it picked collective all-reduce) keep one launcher
    per local device holding the group key, the instance-key counter and the
    ordering token that keep every replica's collectives in the same order.
    """
    cross_device_ops = getattr(strategy.extended, "_cross_device_ops", None)
    launchers = getattr(cross_device_ops, "_launchers", None)
    if not launchers:
        return None
    return launchers[local_replica_index()]


class LaunchParams:
    """What a raw collective op needs, read from a launcher."""

    def __init__(self, launcher, options=None):
        merged = launcher._options.merge(options)
        self.group_size = launcher._group_size
        self.group_key = launcher._group_key
        self.instance_key = launcher._next_instance_key()
        self.ordering_token = launcher._get_ordering_token()
        self.device = launcher._device
        self.hint = merged.implementation.value
        self.timeout = merged.timeout_seconds


def raw_all_reduce(x, params: LaunchParams):
    with tf.device(params.device):
        return _collective_ops.all_reduce_v2(
            x, params.group_size, params.group_key, params.instance_key,
            communication_hint=params.hint, timeout=params.timeout,
            ordering_token=params.ordering_token)


def raw_all_gather(x, params: LaunchParams):
    with tf.device(params.device):
        return _collective_ops.all_gather_v2(
            x, params.group_size, params.group_key, params.instance_key,
            communication_hint=params.hint, timeout=params.timeout,
            ordering_token=params.ordering_token)


def raw_all_to_all(x, params: LaunchParams):
    with tf.device(params.device):
        return _collective_ops.all_to_all_v2(
            x, params.group_size, params.group_key, params.instance_key,
            communication_hint=params.hint, timeout=params.timeout,
            ordering_token=params.ordering_token)


def raw_reduce_scatter(x, params: LaunchParams):
    token = [params.ordering_token] if params.ordering_token is not None else []
    with tf.device(params.device):
        return _gen_collective_ops.collective_reduce_scatter_v2(
            x, group_size=params.group_size, group_key=params.group_key,
            instance_key=params.instance_key, ordering_token=token,
            merge_op="Add", final_op="Id",
            communication_hint=params.hint.lower(),
            timeout_seconds=params.timeout)


def tf_variable(variable):
    """The `tf.Variable` (possibly distributed) behind a Keras variable.

    For a stage-3 sharded weight this is its per-replica shard variable.
    """
    if isinstance(variable, keras.Variable):
        variable = variable._value
    return getattr(variable, "_tf_zero_shard", variable)


def eager_mode():
    """Runs eagerly even inside the graph `tf.saved_model.save` is building."""
    from tensorflow.python.eager import context

    return context.eager_mode()


def in_save_context() -> bool:
    """True while `tf.saved_model.save` traces and writes (stage-3 export)."""
    return _save_context.in_save_context()


def sharded_storage(variable):
    """The `tf_zero.stage3.ShardedVariable` behind a Keras variable, or None."""
    value = getattr(variable, "_value", variable)
    return value if hasattr(value, "_tf_zero_shard") else None


def components(variable):
    """Per-device components of a (Keras or tf) variable, in device order."""
    var = tf_variable(variable)
    if isinstance(var, _values.DistributedVariable):
        return tuple(var.values)
    return (var,)


def local_component(variable):
    """The current replica's component of a distributed variable.

    Writing it from replica context changes only this replica's copy and
    needs no `merge_call`, so it is legal inside a replica-context `tf.cond`.
    """
    var = tf_variable(variable)
    if isinstance(var, _values.DistributedVariable):
        return var._get_on_device_or_primary()
    return var


def is_distributed_variable(variable) -> bool:
    return isinstance(tf_variable(variable), _values.DistributedVariable)


def is_sync_on_read(variable) -> bool:
    return isinstance(tf_variable(variable), _values.SyncOnReadVariable)


class LocalDevicesExtended(_cars.CollectiveAllReduceExtended):
    """Collective strategy internals that can give a CPU worker K replicas.

    TensorFlow's multi-worker strategy gives a worker without GPUs exactly one
    CPU replica. With `devices_per_worker=K`, each worker instead runs K
    replicas on its logical CPU devices `CPU:0 .. CPU:K-1`, which is how
    several replicas per worker are tested on machines without accelerators.
    """

    def __init__(self, container_strategy, cluster_resolver,
                 communication_options, devices=None, devices_per_worker=None):
        self._devices_per_worker = devices_per_worker
        super().__init__(container_strategy, cluster_resolver=cluster_resolver,
                         communication_options=communication_options,
                         devices=devices)

    def _initialize_local_devices(self, cluster_resolver, worker_device):
        if self._devices_per_worker and not tf.config.list_logical_devices("GPU"):
            devices = tuple(f"{worker_device}/device:CPU:{i}"
                            for i in range(self._devices_per_worker))
            return devices, "CPU"
        return super()._initialize_local_devices(cluster_resolver, worker_device)


def local_replica_ranks(strategy) -> list[int]:
    """Global replica ids of this worker's local replicas, in device order."""
    per_worker = len(strategy.extended.worker_devices)
    worker = int(getattr(strategy.extended, "_id_in_cluster", 0) or 0) \
        if in_multi_worker_mode(strategy) else 0
    return [worker * per_worker + i for i in range(per_worker)]


# Keras' TensorFlow optimizer routes `_backend_update_step` through
# `merge_call` + `extended.update`, which would update a shard as if it were
# a mirrored variable. An inner optimizer driven by tf_zero runs the plain
# backend-agnostic loop instead (still calling any subclass override first,
# e.g. Nadam's per-step momentum-product update).
from keras.src.backend.tensorflow import optimizer as _keras_tf_optimizer  # noqa: E402
from keras.src.optimizers import base_optimizer as _keras_base_optimizer  # noqa: E402

_tf_backend_update_step = _keras_tf_optimizer.TFOptimizer._backend_update_step


def _local_backend_update_step(self, grads, trainable_variables, learning_rate):
    if getattr(self, "_tf_zero_local_update", False):
        return _keras_base_optimizer.BaseOptimizer._backend_update_step(
            self, grads, trainable_variables, learning_rate)
    for v in trainable_variables:
        if sharded_storage(v) is not None:
            raise ValueError(
                f"{v.path} is a weight sharded by ZeroStrategy(stage=3); "
                f"{type(self).__name__} cannot update it. Compile with "
                f"tf_zero.ZeroOptimizer({type(self).__name__}(...)).")
    return _tf_backend_update_step(self, grads, trainable_variables, learning_rate)


_keras_tf_optimizer.TFOptimizer._backend_update_step = _local_backend_update_step


def mark_local_update(optimizer) -> None:
    """Makes `optimizer._backend_update_step` update replica-local shards."""
    optimizer._tf_zero_local_update = True


# Checkpointing: the base class of objects that serialize themselves, and the
# key TensorFlow uses for a variable's value.
Trackable = tf.__internal__.tracking.Trackable
VARIABLE_VALUE_KEY = "VARIABLE_VALUE"


def register_keras_saving_skiplist(obj_type: str, extra=()) -> None:
    """Makes Keras' `.keras` / `.weights.h5` walker skip `extra` attributes.

    Keras saves every attribute of an optimizer that is itself saveable; a
    ZeroOptimizer saves its inner optimizer's state itself (unsharded), so
    the walker must not also save the inner optimizer's raw shards.
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    key = f"saving_attr_skiplist_{obj_type}"
    if global_state.get_global_attribute(key, None) is None:
        skipset = set(saving_lib.get_attr_skipset("Optimizer")) | set(extra)
        global_state.set_global_attribute(key, skipset)


def strategy_of(variables):
    """The strategy that created the first distributed variable, or None."""
    for v in variables:
        var = tf_variable(v)
        if isinstance(var, _values.DistributedVariable):
            return var._distribute_strategy
    return None


# Keras' LossScaleOptimizer decides on overflow from replica 0's unreduced
# gradients. When its inner optimizer is a sharded ZeroOptimizer, the inner
# optimizer's `_apply_scaled` runs the whole step instead (see loss_scale.py).
from keras.src.optimizers import loss_scale_optimizer as _keras_lso  # noqa: E402

_keras_lso_tf_apply = _keras_lso.LossScaleOptimizer._tf_apply


def _lso_tf_apply(self, grads, trainable_variables=None):
    handler = getattr(self.inner_optimizer, "_apply_scaled", None)
    if handler is not None and handler(self, grads, trainable_variables):
        return None
    return _keras_lso_tf_apply(self, grads, trainable_variables)


_keras_lso.LossScaleOptimizer._tf_apply = _lso_tf_apply


# Stage 3 reads Keras' mixed-precision autocast scope (to gather weights in
# the compute dtype and to restore the scope when a layer is recomputed) and
# finds the layer whose `add_weight` is creating a variable.
from keras.src.backend.common import variables as _keras_variables  # noqa: E402


def autocast_dtype():
    """The dtype Keras casts float variables to in the current layer call, or None."""
    scope = _keras_variables.get_autocast_scope()
    return None if scope is None else scope.dtype


def autocast_scope(dtype):
    """Keras' autocast context for `dtype` (None: no casting)."""
    return _keras_variables.AutocastScope(dtype)


def layer_adding_weight():
    """(layer, autocast) of the `Layer.add_weight` call on the stack, else (None, True).

    Keras creates a layer's weights through `Layer.add_weight`, which builds a
    `keras.Variable`, whose TensorFlow backend calls `tf.Variable`: a variable
    creator sees the call but not the layer. The layer and the weight's
    `autocast` flag are the caller's arguments, read from its frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "add_weight":
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.layers.Layer):
                return owner, bool(frame.f_locals.get("autocast", True))
        frame = frame.f_back
    return None, True


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


def is_chief(strategy) -> bool:
    """Whether this worker writes checkpoints (TensorFlow's `should_checkpoint`)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def worker_index(strategy) -> int:
    """This worker's index in the cluster (0 without a cluster)."""
    if not in_multi_worker_mode(strategy):
        return 0
    return int(getattr(strategy.extended, "_id_in_cluster", 0) or 0)


def worker_count(strategy) -> int:
    """The number of workers the strategy spans."""
    if not in_multi_worker_mode(strategy):
        return 1
    return int(strategy.num_replicas_in_sync // len(strategy.extended.worker_devices))


# The coordination service's key-value store (started by every multi-worker
# collective strategy) carries the preemption agreement, as it does for
# `tf.distribute.experimental.PreemptionCheckpointHandler`.
def kv_set(key: str, value: str) -> bool:
    """Sets `key` once in the job's key-value store; False if it was already set."""
    from tensorflow.python.eager import context

    try:
        context.context().set_config_key_value(key, value)
        return True
    except tf.errors.AlreadyExistsError:
        return False


def kv_get(key: str, timeout_ms: int = 0) -> str:
    """Blocks until `key` is set in the job's key-value store; returns its value."""
    from tensorflow.python.eager import context

    return context.context().get_config_key_value(key, timeout_in_ms=timeout_ms)


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
