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
        self.check_shape(value)
        self._write(value)

    def check_shape(self, value) -> None:
        """Raises ValueError if a checkpoint value's shape is not this slot's."""
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"Checkpoint value for optimizer slot {self.name} has shape "
                f"{tuple(value.shape)} but this optimizer's slot has shape "
                f"{self.shape}: the checkpoint belongs to a different model.")

    def _serialize_to_tensors(self):
        return {_private.VARIABLE_VALUE_KEY: self.value()}

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors[_private.VARIABLE_VALUE_KEY])
        return tf.no_op()


class PlacedSlot(SlotFace):
    """A slot of one model variable whose parts live on some replicas: on its
    owner (`tf_zero.owners.OwnedSlot`) or in runs (`tf_zero.runs.RunSlot`).

    Named and shaped by the plain optimizer's slot (its `SlotSpec`), which
    every worker knows, whether or not it holds a part. Subclasses define
    `_parts()`: {rank: slot variable} for this worker's replicas that hold a
    part, in rank order, which is the parts' order in the flattened slot.

    Args:
        shards: the sharded state (`partition == "whole"`).
        variable_index: index of the model variable.
        position: the slot's position among that variable's slots.
        spec: the plain optimizer's slot (`tf_zero.owners.SlotSpec`).
    """

    def __init__(self, shards, variable_index, position, spec):
        self._shards = shards
        self._index = variable_index
        self._position = position
        self.name = spec.name
        self.shape = tuple(spec.shape)
        self.dtype = tf.as_dtype(spec.dtype)
        self._gather = None

    def _parts(self) -> dict:
        raise NotImplementedError

    def _gathered(self) -> tf.Tensor:
        """Every replica's part, joined in rank order, on every worker.

        A collective (every worker's save reads every slot, in the same
        order), traced once: an eager gather traces a function of its own
        each time, about half a second.
        """
        if self._gather is None:
            strategy, parts, dtype = self._shards.strategy, self._parts(), self.dtype
            self._gather = tf.function(lambda: gather_parts(strategy, parts, dtype),
                                       autograph=False)
        return self._gather()


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
