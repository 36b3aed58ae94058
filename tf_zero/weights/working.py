"""A weight at stages 1-2 under a mixed policy: a 16-bit working copy on every
replica over its float32 master, kept only as 1/N shards.

The layer reads the working copy, which holds exactly what Keras' policy
would compute, `cast(master, compute dtype)`; the tape differentiates it, so
the gradient is the one Keras returns for that cast. `ZeroOptimizer` updates
the master shards in place and publishes them already cast to the compute
dtype, so the all-gather moves 16-bit values. Outside replica context the
weight is its float32 master: `get_weights`, checkpoints and exports see
float32. See docs/mixed-precision.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private
from tf_zero.weights.storage import ShardedStorage, gather_as, in_replica_context_of


class WorkingVariable(ShardedStorage):
    """A float32 weight stored as a 16-bit working copy plus 1/N master shards.

    Attributes:
        working: the mirrored 16-bit `tf.Variable` every replica reads.
        working_dtype: its dtype (the layer's compute dtype).
        (and `ShardedStorage`'s: `shard` holds the float32 master)
    """

    def __init__(self, shard, working, shape, dtype, name, strategy, config):
        super().__init__(shard, shape, dtype, name, strategy, config, autocast=True)
        self.working = working
        self.working_dtype = tf.as_dtype(working.dtype)

    @property
    def _tf_zero_variable(self):
        return self.working  # what every replica keeps of the weight, in full

    def _replica_read(self):
        """The working copy; in the declared dtype outside a 16-bit autocast scope
        (a read that Keras would not cast sees the same values in float32)."""
        value = _private.local_component(self.working).read_value()
        compute = _private.autocast_dtype()
        if compute is not None and tf.as_dtype(compute) == self.working_dtype:
            return value
        return tf.cast(value, self._dtype)

    def _assigned(self, value) -> None:
        """A full value written into the master: the working copy follows."""
        self.working.assign(tf.cast(value, self.working_dtype))

    def slices_restored(self) -> None:
        """The master was restored slice by slice: the working copy follows."""
        self._assigned(self.full_value())

    def publish(self) -> None:
        """All-gathers the updated master shards cast to the working dtype into
        this replica's working copy (replica context)."""
        gathered = gather_as(_private.local_component(self.shard).read_value(),
                             self.working_dtype, self.shard_group,
                             self._config.weight_quantization)
        _private.local_component(self.working).assign(
            tf.reshape(gathered[:self.size], self._shape))

    def __repr__(self):
        return (f"<tf_zero.WorkingVariable {self._name} shape={tuple(self._shape)} "
                f"{self.working_dtype.name} working copy, float32 master "
                f"shards={self.num_shards}x{self.shard_size}>")


def has_working_copy(variable) -> bool:
    """Whether a Keras or TensorFlow variable is kept as a 16-bit working copy
    over float32 master shards (stages 1-2 under a mixed policy)."""
    storage = _private.sharded_storage(variable)
    return storage is not None and not storage.gathers_on_read


__all__ = ["WorkingVariable", "has_working_copy", "in_replica_context_of"]
