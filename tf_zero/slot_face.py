"""The checkpoint face of one optimizer slot, whatever stores it.

A checkpoint of a `ZeroOptimizer` holds what the plain inner optimizer would:
one full tensor per slot of each model variable. Where the slot really lives
differs by partition (pieces in every replica's shards; whole on its owner),
so each kind says how to read the full value and how to write one; the rest,
checking and TensorFlow's save/restore protocol, is here.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private


class SlotFace(_private.Trackable):
    """A slot that saves and restores as one full tensor.

    Subclasses set `name`, `shape` and `dtype` and define `value()` (the full
    tensor) and `_write(value)` (a full tensor of the right shape).
    """

    name: str
    shape: tuple
    dtype: tf.DType
    _index: int

    @property
    def variable_index(self) -> int:
        """Index of the model variable whose slot this is."""
        return self._index

    def value(self) -> tf.Tensor:
        raise NotImplementedError

    def _write(self, value: tf.Tensor) -> None:
        raise NotImplementedError

    def numpy(self):
        return self.value().numpy()

    def assign(self, value):
        """Writes a full slot value where the slot lives.

        Raises:
            ValueError: `value` has another shape (a different model).
        """
        value = tf.convert_to_tensor(value)
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"Checkpoint value for optimizer slot {self.name} has shape "
                f"{tuple(value.shape)} but this optimizer's slot has shape "
                f"{self.shape}: the checkpoint belongs to a different model.")
        self._write(value)

    def _serialize_to_tensors(self):
        return {_private.VARIABLE_VALUE_KEY: self.value()}

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors[_private.VARIABLE_VALUE_KEY])
        return tf.no_op()


def gather_parts(strategy, parts: dict, dtype) -> tf.Tensor:
    """The replicas' `parts`, flattened and joined in rank order, on every
    worker (a collective: every worker must call it for the same slot).

    Args:
        strategy: the (multi-worker) strategy.
        parts: {rank: variable} for this worker's replicas that hold a part;
            every other replica contributes an empty tensor (which
            `strategy.gather` pads on the wire: saves are rare, and the result
            is the parts bit for bit).
        dtype: the parts' dtype.
    """

    def part(ctx):
        variable = parts.get(ctx.replica_id_in_sync_group)
        if variable is not None:
            return tf.reshape(variable.value, [-1])
        return tf.zeros([0], dtype)

    return strategy.gather(strategy.experimental_distribute_values_from_function(part), axis=0)
