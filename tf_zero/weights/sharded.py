"""A stage-3 weight's storage: a 1/N shard on each replica, gathered on read.

A read in replica context all-gathers the shards inside a
`tf.custom_gradient` whose backward pass reduce-scatters, so the tape
returns each replica's summed shard gradient; under a mixed policy the shard
is cast to the compute dtype before the gather. Under hybrid sharding the
gather and the reduce-scatter span the replica's shard group of K, and the
shard gradient is then all-reduced across the groups. See docs/stage3.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.weights import prefetch
from tf_zero.weights.storage import ShardedStorage, gather_as


class ShardedVariable(ShardedStorage):
    """Storage of one stage-3 weight: a 1/N shard on each replica, gathered on read.

    Code does not normally touch it; `tf_zero.is_sharded(weight)` tells
    whether a Keras weight is stored this way. See `ShardedStorage` for its
    attributes.
    """

    gathers_on_read = True

    @property
    def _tf_zero_variable(self):
        return self.shard  # what every replica keeps of the weight

    def _replica_read(self):
        with tf.name_scope("zero_gather"):
            return self._gather_in_scope()

    # ---- the gather with its reduce-scatter gradient ---------------------

    def _gather_dtype(self):
        compute = _private.autocast_dtype()
        if self._autocast and compute is not None:
            return tf.as_dtype(compute)
        return self._dtype

    def _gather_in_scope(self):
        size, shape = self.size, self._shape
        padded = self.shard_size * self.num_shards
        gather_dtype = self._gather_dtype()
        shard_dtype = self._dtype
        # float32 (or the variable's wider dtype) unless reduce_dtype says otherwise.
        reduce_dtype = tf.as_dtype(self._config.reduce_dtype or (
            shard_dtype if shard_dtype.size >= 4 else tf.float32))
        within = self.shard_group
        with tf.control_dependencies(prefetch.dependencies()):
            local = _private.local_component(self.shard).read_value()

        @tf.custom_gradient
        def gather(shard):
            full = gather_as(shard, gather_dtype, within, self._config.weight_quantization)

            def grad(dfull):
                with tf.name_scope("zero_gather_grad"):
                    flat = collectives.pad(
                        tf.cast(collectives.dense_flat(dfull, shape), reduce_dtype), padded)
                    # Hybrid: then the shard's sum over every group.
                    summed = collectives.shard_sum(flat, None, self.groups,
                                                   self._config.gradient_quantization)
                    return tf.cast(summed, shard_dtype)

            return tf.reshape(full[:size], shape), grad

        return gather(local)

    def __repr__(self):
        return (f"<tf_zero.ShardedVariable {self._name} shape={tuple(self._shape)} "
                f"shards={self.num_shards}x{self.shard_size}>")


def is_sharded(variable) -> bool:
    """Whether a Keras or TensorFlow variable is a stage-3 sharded weight."""
    return _private.is_sharded(variable)
