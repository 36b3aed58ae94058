"""A stage-3 weight's storage: a 1/N shard on each replica, gathered on read.

`ShardedVariable` stands where a `tf.Variable` would stand inside a
`keras.Variable`. Its shard is a flat, zero-padded sync-on-read variable of
`ceil(P / N)` elements per replica, replica `r` holding elements
`[r * ceil(P / N), (r + 1) * ceil(P / N))`: the one-variable bucket of
`tf_zero.plan`, so the optimizer updates it in place.

Reading it in replica context all-gathers the shards inside a
`tf.custom_gradient` whose backward pass reduce-scatters the full gradient
(float32, or the configured `reduce_dtype`), so `tape.gradient` returns each
replica's summed shard gradient. Under a mixed-precision policy the shard is
cast to the compute dtype before the gather. Outside replica context a read
concatenates the shards. The gather waits for the dependencies the prefetch
window (`tf_zero.prefetch`) gives it.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_zero import _private, collectives, prefetch, slices
from tf_zero.flat import dense_flat
from tf_zero.sharded_state import gather_components, local_slices, write_slices


def in_replica_context_of(strategy):
    """True inside `strategy.run` (replica context of a distributed strategy)."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return tf.distribute.get_strategy() is strategy


class ShardedVariable:
    """Storage of one stage-3 weight: a 1/N shard on each replica.

    It stands where a `tf.Variable` would stand inside a `keras.Variable`;
    Keras keeps the weight's shape, dtype, name, constraint and regularizer.
    Code does not normally touch it; `tf_zero.is_sharded(weight)`
    tells whether a Keras weight is stored this way.

    Attributes:
        shard: the sync-on-read `tf.Variable` of `shard_size` elements per
            replica.
        shape, dtype, name: the full weight's.
        size: number of elements of the full weight.
        shard_size: `ceil(size / num_shards)`.
    """

    def __init__(self, shard, shape, dtype, name, strategy, config, autocast):
        self._tf_zero_shard = shard
        self._shape = tf.TensorShape(shape)
        self._dtype = tf.as_dtype(dtype)
        self._name = name
        self._strategy = strategy
        self._config = config
        self._autocast = autocast
        self.size = int(self._shape.num_elements())
        self.num_shards = strategy.num_replicas_in_sync
        self.shard_size = math.ceil(self.size / self.num_shards)
        self._export_variable = None

    # ---- what a tf.Variable answers --------------------------------------

    @property
    def shard(self):
        return self._tf_zero_shard

    @property
    def strategy(self):
        """The stage-3 strategy that created the weight."""
        return self._strategy

    @property
    def config(self):
        """The strategy's `ZeroConfig` (reduce dtype, prefetch depth, recompute)."""
        return self._config

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    @property
    def name(self):
        return self._name

    @property
    def trainable(self):
        return True

    @property
    def device(self):
        return self.shard.device

    def get_shape(self):
        return self._shape

    @property
    def _unique_id(self):
        return _private.unique_id(self.shard)

    @property
    def handle(self):
        # The tape differentiates with respect to this replica's shard: the
        # gather's custom gradient turns the full gradient into its shard.
        if not tf.distribute.has_strategy() and _private.in_save_context():
            return self._export().handle
        return self.shard.handle

    def __tf_tensor__(self, dtype=None, name=None):
        value = self.read_value()
        if dtype is not None and tf.as_dtype(dtype) != value.dtype:
            value = tf.cast(value, dtype)
        return value

    def value(self):
        return self.read_value()

    def read_value(self):
        """The full weight: gathered in replica context, concatenated outside."""
        if in_replica_context_of(self._strategy):
            return self._gather()
        if not tf.executing_eagerly() and not tf.distribute.has_strategy():
            return self._serving_read()
        return self.full_value()

    def _serving_read(self):
        # A function traced outside the strategy (model.export, a
        # tf.saved_model signature, tf.function(model)) reads one plain
        # variable holding the full weight; a SavedModel can hold that, not
        # the per-replica shards. While saving it is refreshed once, eagerly;
        # elsewhere every call refreshes it first, so it is never stale.
        export = self._export()
        if _private.in_save_context():
            return export.read_value()
        with tf.control_dependencies([export.assign(self.full_value())]):
            return export.read_value()

    def numpy(self):
        return self.full_value().numpy()

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    # ---- the full value, outside replica context ------------------------

    def full_value(self) -> tf.Tensor:
        """Concatenation of every replica's shard, unpadded and reshaped."""
        if _private.in_multi_worker_mode(self._strategy):
            flat = gather_components(self._strategy, self.shard)
        else:
            comps = _private.components(self.shard)
            parts = []
            for comp in comps:
                with tf.device(comp.device):
                    parts.append(tf.identity(comp.read_value()))
            with tf.device("/cpu:0"):
                flat = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
        with tf.device("/cpu:0"):
            return tf.reshape(flat[:self.size], self._shape)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        """Writes a full value into this worker's shards (cross-replica context)."""
        if in_replica_context_of(self._strategy):
            raise ValueError(
                f"{self._name} is a stage-3 sharded weight; it cannot be assigned "
                "inside strategy.run. Assign it outside (model.set_weights, "
                "variable.assign) or train it with tf_zero.ZeroOptimizer.")
        value = tf.convert_to_tensor(value, dtype=self._dtype)
        if tuple(value.shape) != tuple(self._shape):
            raise ValueError(
                f"Cannot assign a value of shape {tuple(value.shape)} to {self._name} "
                f"of shape {tuple(self._shape)}.")
        flat = tf.reshape(value, [-1])
        padding = self.shard_size * self.num_shards - self.size
        if padding:
            flat = tf.concat([flat, tf.zeros([padding], self._dtype)], 0)
        ranks = _private.local_replica_ranks(self._strategy)
        for rank, comp in zip(ranks, _private.components(self.shard)):
            comp.assign(flat[rank * self.shard_size:(rank + 1) * self.shard_size])
        return self

    def _refuse_update(self, *args, **kwargs):
        raise ValueError(
            f"{self._name} is a weight sharded by ZeroStrategy(stage=3); only "
            "tf_zero.ZeroOptimizer updates it. Compile the model with "
            "tf_zero.ZeroOptimizer(your_optimizer).")

    assign_add = _refuse_update
    assign_sub = _refuse_update

    # ---- the gather with its reduce-scatter gradient ---------------------

    def _gather_dtype(self):
        compute = _private.autocast_dtype()
        if self._autocast and compute is not None:
            return tf.as_dtype(compute)
        return self._dtype

    def _gather(self):
        with tf.name_scope("zero_gather"):
            return self._gather_in_scope()

    def _gather_in_scope(self):
        size, shape = self.size, self._shape
        padded = self.shard_size * self.num_shards
        gather_dtype = self._gather_dtype()
        shard_dtype = self._dtype
        # float32 (or the variable's wider dtype) unless reduce_dtype says otherwise.
        reduce_dtype = tf.as_dtype(self._config.reduce_dtype or (
            shard_dtype if shard_dtype.size >= 4 else tf.float32))
        with tf.control_dependencies(prefetch.dependencies()):
            local = _private.local_component(self.shard).read_value()

        @tf.custom_gradient
        def gather(shard):
            full = collectives.all_gather(tf.cast(shard, gather_dtype))

            def grad(dfull):
                with tf.name_scope("zero_gather_grad"):
                    flat = tf.cast(dense_flat(dfull, shape), reduce_dtype)
                    if padded > size:
                        flat = tf.concat([flat, tf.zeros([padded - size], reduce_dtype)], 0)
                    return tf.cast(collectives.reduce_scatter(flat), shard_dtype)

            return tf.reshape(full[:size], shape), grad

        return gather(local)

    # ---- checkpoints and SavedModel --------------------------------------

    def _serialize_to_tensors(self):
        if slices.deferred():
            # tf_zero.checkpoint writes and reads the shards' slices itself;
            # the object graph still records the entry.
            return {_private.VARIABLE_VALUE_KEY: {}}
        return {_private.VARIABLE_VALUE_KEY: self.full_value()}

    @property
    def storage_dtype(self) -> tf.DType:
        return tf.as_dtype(self.shard.dtype)

    def local_runs(self):
        """(component, first element, elements, 0) of each local replica's
        unpadded shard."""
        runs = []
        ranks = _private.local_replica_ranks(self._strategy)
        for rank, comp in zip(ranks, _private.components(self.shard)):
            lo = rank * self.shard_size
            hi = min(lo + self.shard_size, self.size)
            if lo < hi:
                runs.append((comp, lo, hi - lo, 0))
        return runs

    def local_slices(self, max_elements=None):
        """(spec, read, dtype, device) of the slices of this worker's shards."""
        return local_slices(self.local_runs(), tuple(self._shape.as_list()), max_elements)

    def restore_slices(self, restored: dict) -> None:
        """Writes restored slices ({spec: tensor}) into this worker's shards."""
        write_slices(self.local_runs(), tuple(self._shape.as_list()), restored)

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors[_private.VARIABLE_VALUE_KEY])
        return tf.no_op()

    def _export(self):
        """A plain variable holding the full value (refreshed, eagerly)."""
        with tf.init_scope():
            value = self.full_value()
            if self._export_variable is None:
                with tf.device("/cpu:0"):
                    self._export_variable = tf.Variable(value, trainable=False,
                                                        name=self._name)
            else:
                self._export_variable.assign(value)
        return self._export_variable

    @property
    def _shared_name(self):
        # Checkpoints ask every variable for a name; answering must not gather.
        return self._name

    def _export_to_saved_model_graph(self, object_map, tensor_map, options, **kwargs):
        with _private.eager_mode():
            export = self._export()
        resources = _private.export_to_saved_model_graph(export, object_map, tensor_map,
                                                         options, **kwargs)
        object_map[self] = object_map[export]
        return resources

    def _write_object_proto(self, proto, options):
        # The export variable was refreshed by _export_to_saved_model_graph.
        export = self._export_variable if self._export_variable is not None else self._export()
        return _private.write_object_proto(export, proto, options)

    def _copy_trackable_to_cpu(self, object_map):
        object_map[self] = tf.Variable(self.full_value())

    def __repr__(self):
        return (f"<tf_zero.ShardedVariable {self._name} shape={tuple(self._shape)} "
                f"shards={self.num_shards}x{self.shard_size}>")


def is_sharded(variable) -> bool:
    """Whether a Keras or TensorFlow variable is a stage-3 sharded weight."""
    return _private.sharded_storage(variable) is not None
