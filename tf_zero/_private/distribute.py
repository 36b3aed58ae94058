"""tf.distribute internals: collective keys and launchers, raw collective
ops, replica ids, per-replica components, local devices, the coordination
service's key-value store."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops as _multi_device_iterator_ops
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


# Sub-groups (hybrid sharding): a strategy's own group keys count up from its
# key base, a few per device set; tf_zero's sub-groups take the upper half of
# the base's stride. Their instance keys are counted per (group, device) here,
# in trace order, as the launcher counts its own group's.
SUBGROUP_KEY_OFFSET = _KEY_STRIDE // 2
_subgroup_instance_keys = {}


def collective_key_base(strategy) -> int:
    """The key base of a collective strategy (its first group key - 1)."""
    return int(strategy._collective_key_base)


def _next_subgroup_instance_key(group_key, device) -> int:
    with _key_lock:
        counter = _subgroup_instance_keys.setdefault((group_key, device), itertools.count(1))
        return next(counter)


class LaunchParams:
    """What a raw collective op needs, read from a launcher.

    `group` = (size, key) launches on a sub-group of the strategy's replicas
    instead of all of them; the launcher's ordering token still chains every
    collective of the device, whatever its group (without it, collectives of
    a new group key hang on logical CPU devices).
    """

    def __init__(self, launcher, options=None, group=None):
        merged = launcher._options.merge(options)
        if group is None:
            self.group_size = launcher._group_size
            self.group_key = launcher._group_key
            self.instance_key = launcher._next_instance_key()
        else:
            self.group_size, self.group_key = int(group[0]), int(group[1])
            self.instance_key = _next_subgroup_instance_key(self.group_key, launcher._device)
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

    For a weight tf_zero stores, what every replica keeps of it: a stage-3
    weight's per-replica shard variable, a working weight's 16-bit copy.
    """
    if isinstance(variable, keras.Variable):
        variable = variable._value
    return getattr(variable, "_tf_zero_variable", variable)


def eager_mode():
    """Runs eagerly even inside the graph `tf.saved_model.save` is building."""
    from tensorflow.python.eager import context

    return context.eager_mode()


def in_save_context() -> bool:
    """True while `tf.saved_model.save` traces and writes (stage-3 export)."""
    return _save_context.in_save_context()


def sharded_storage(variable):
    """The `tf_zero.weights.storage.ShardedStorage` behind a Keras variable (a
    stage-3 `ShardedVariable` or a `WorkingVariable`), or None."""
    value = getattr(variable, "_value", variable)
    return value if hasattr(value, "_tf_zero_shard") else None


def is_sharded(variable) -> bool:
    """Whether a Keras or TensorFlow variable is a stage-3 sharded weight."""
    storage = sharded_storage(variable)
    return storage is not None and storage.gathers_on_read


def components(variable):
    """Per-device components of a (Keras or tf) variable, in device order."""
    var = tf_variable(variable)
    if isinstance(var, _values.DistributedVariable):
        return tuple(var.values)
    return (var,)


def uninitialized(variables) -> list:
    """Those of `variables` (Keras or tf) with a component holding no value yet.

    A variable first created inside a `tf.function` being traced (a model
    without an `Input`, built by its first call in the traced step) gets its
    initial value only when the function runs; read eagerly before that it
    has none. Eager (lifted out of any function being traced).
    """
    with tf.init_scope():
        return [v for v in variables
                if not all(bool(c.is_initialized()) for c in components(v))]


def own_buffers(variables, min_bytes: int = 1 << 16) -> None:
    """Gives every component of `variables` a buffer of its own, allocated now.

    TensorFlow lets a variable share its buffer with the tensor it was last
    assigned from: the one initial value of a mirrored variable's copies,
    the zeros Keras initializes slots with, a slice of a larger tensor (a
    stage-3 shard of its full initial value). The first write then copies
    it. Inside the first training step that copy is allocated among the
    step's temporaries, and TensorFlow's BFC allocator hands out a free block
    whole unless it is at least twice the request (or 128 MiB larger), so a
    variable can keep up to twice its size for the rest of the run (measured
    in docs/benchmarks.md). Copied here, before any step, every buffer is allocated in a pool
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


def replace_buffer(component, make_value) -> None:
    """Assigns `make_value()` (a tensor of the component's shape and dtype)
    to a variable component without ever holding both values: the old
    buffer is dropped first (TensorFlow frees it when nothing else holds it)
    by assigning an empty value, and the variable adopts the new one. Eager.
    If `make_value` fails, the component is left empty and the error raised.
    """
    with tf.device(component.device):
        tf.raw_ops.AssignVariableOp(resource=component.handle,
                                    value=tf.zeros([0], component.dtype), validate_shape=False)
    value = make_value()
    if value.shape != component.shape or value.dtype != component.dtype:
        raise ValueError(f"replace_buffer: {value.dtype}{value.shape} for a variable of "
                         f"{component.dtype}{component.shape}")
    with tf.device(component.device):
        tf.raw_ops.AssignVariableOp(resource=component.handle, value=value,
                                    validate_shape=False)


def host_copy(piece, size: int) -> tf.Tensor:
    """A tensor of `size` elements: NumPy array `piece` (a view into a larger
    array is fine), flattened and zero-padded, copied once on the host.

    A variable assigned a tensor adopts its buffer. `tf.convert_to_tensor`
    would hold two copies of the values on the host, and a tensor wrapping
    `piece`'s own memory (DLPack) would keep the whole array it views alive
    in the variable. So the values are copied once into a 64-byte aligned
    NumPy buffer of exactly this tensor's size (TensorFlow's kernels need
    the alignment), which the tensor wraps without a copy. On a GPU the
    assignment then copies it to the device and frees it. Dtypes DLPack does
    not carry (bfloat16) are converted instead.
    """
    piece = np.asarray(piece).reshape([-1])
    align = 64
    raw = np.empty(size * piece.itemsize + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    out = raw[offset:offset + size * piece.itemsize].view(piece.dtype)
    out[:piece.size] = piece
    out[piece.size:] = 0
    try:
        capsule = out.__dlpack__()
    except (BufferError, TypeError, ValueError):
        return tf.convert_to_tensor(out)
    with tf.device("/cpu:0"):
        return tf.experimental.dlpack.from_dlpack(capsule)


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


@contextlib.contextmanager
def _without_log_message(prefix: str):
    """Drops TensorFlow's Python log records that start with `prefix`."""
    logger = tf.get_logger()
    drop = _DropMessage(prefix)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropMessage(logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self._prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self._prefix)


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

    def _initialize_local(self, cluster_resolver, devices=None):
        # A one-worker collective strategy asks TensorFlow for the scoped
        # allocator rewrite of `CollectiveReduce`, which can only be configured
        # before the eager context starts; later (always, once logical devices
        # are listed) it warns "Collective ops is not configured at program
        # startup". The rewrite is for that op; tf.distribute's collectives
        # are `CollectiveReduceV2` and tf_zero's are V2 ops too, so nothing
        # is lost and the warning is dropped.
        with _without_log_message("Collective ops is not configured at program startup"):
            super()._initialize_local(cluster_resolver, devices=devices)

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


# A distributed dataset's iterator feeds each local device through a pipeline
# of its own (a generator pulling from the shared source, then `prefetch(1)`),
# which by default runs a tf.data autotuning thread although it has nothing
# to tune. Releasing an iterator waits for each such thread, up to a minute
# apiece (see `keras_training`), and a process holds four of them per
# iterator on 4 local devices: the per-device pipelines are built without
# autotuning. The source pipeline, the user's, keeps its options.
def device_dataset_without_autotuning(create_device_dataset):
    """`multi_device_iterator_ops._create_device_dataset`, with autotuning off."""

    def create(*args, **kwargs):
        dataset = create_device_dataset(*args, **kwargs)
        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.with_options(options)

    create.__wrapped__ = create_device_dataset
    return create
