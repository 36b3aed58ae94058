"""tf.distribute internals: collective keys and launchers, raw collective
ops, replica ids, per-replica components, local devices, the coordination
service's key-value store."""

from __future__ import annotations

import itertools
import threading

import keras
import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as _cars
from tensorflow.python.distribute import distribute_lib as _distribute_lib
from tensorflow.python.distribute import values as _values
from tensorflow.python.ops import collective_ops as _collective_ops
from tensorflow.python.ops import gen_collective_ops as _gen_collective_ops
from tensorflow.python.saved_model import save_context as _save_context

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


def own_buffers(variables, min_bytes: int = 1 << 16) -> None:
    """Gives every component of `variables` a buffer of its own, allocated now.

    TensorFlow lets a variable share its buffer with the tensor it was last
    assigned from: the one initial value of a mirrored variable's copies,
    the zeros Keras initializes slots with, a slice of a larger tensor (a
    stage-3 shard of its full initial value). The first write then copies
    it. Inside the first training step that copy is allocated among the
    step's temporaries, and TensorFlow's BFC allocator hands out a free block
    whole unless it is at least twice the request (or 128 MiB larger), so a
    variable can keep up to twice its size for the rest of the run: on a
    1B-parameter Llama at stage 3, 3.3 GiB beyond the 11.3 GiB of weights and
    slots. Copied here, before any step, every buffer is allocated in a pool
    without temporaries and later writes happen in place. Eager; float
    components of at least `min_bytes`; values unchanged.
    """
    done = set()
    with tf.init_scope():
        for variable in variables:
            for comp in components(variable):
                if (id(comp) in done or not comp.dtype.is_floating
                        or not comp.shape.is_fully_defined()
                        or comp.shape.num_elements() * comp.dtype.size < min_bytes):
                    continue
                done.add(id(comp))
                with tf.device(comp.device):
                    comp.assign(tf.raw_ops.DeepCopy(x=comp.read_value()))


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


def strategy_of(variables):
    """The strategy that created the first distributed variable, or None."""
    for v in variables:
        var = tf_variable(v)
        if isinstance(var, _values.DistributedVariable):
            return var._distribute_strategy
    return None


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


def launcher_device(launcher) -> str:
    """The device a collective launcher runs its ops on."""
    return launcher._device


def unique_id(variable):
    """The id TensorFlow's tape and checkpoints key a variable by."""
    return variable._unique_id


def export_to_saved_model_graph(variable, object_map, tensor_map, options, **kwargs):
    """A variable's own SavedModel export (its resources in the new graph)."""
    return variable._export_to_saved_model_graph(object_map, tensor_map, options, **kwargs)


def write_object_proto(variable, proto, options):
    """A variable's own SavedModel object proto."""
    return variable._write_object_proto(proto, options)


def local_variable_creator(device: str):
    """A variable creator for state that lives on one replica's device only.

    Under a strategy's scope every new variable is distributed (a component
    per replica). The whole-variable partition keeps an optimizer slot only
    on the replica that owns the variable: this creator builds a plain
    resource variable on `device` directly, bypassing the strategy's creator.
    """
    from tensorflow.python.ops import resource_variable_ops

    accepted = ("initial_value", "trainable", "name", "dtype", "constraint",
                "shape", "caching_device", "validate_shape")

    def creator(next_creator, **kwargs):
        args = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
        with tf.device(device):
            return resource_variable_ops.ResourceVariable(**args)

    return creator


def is_composite_tensor(value) -> bool:
    """A `tf.SparseTensor`, `tf.RaggedTensor` or other composite tensor."""
    return isinstance(value, tf.__internal__.CompositeTensor)
