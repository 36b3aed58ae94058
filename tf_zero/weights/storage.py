"""What the weights stored by tf_zero share: a float32 master kept as a flat
1/N shard on each replica, assembled outside replica context, checkpointed by
slices and exported as one plain variable.

`tf_zero.weights.sharded.ShardedVariable` (stage 3) gathers the shards on
every read; `tf_zero.weights.working.WorkingVariable` (stages 1-2 under a
mixed policy) is read from a 16-bit working copy on every replica. See
docs/stage3.md and docs/mixed-precision.md.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.checkpoint.faces import ShardedWeightFace


def gather_as(local_shard, dtype, group=None, quantization=None) -> tf.Tensor:
    """Every replica's master shard (of `group`, a shard group under hybrid
    sharding), all-gathered cast to `dtype` first: a 16-bit read of a float32
    master moves 2 bytes per element (the stage-3 gather and the publish of
    working copies); with `quantization` (a `BlockQuantization`) it moves
    block-quantized and is dequantized into `dtype`. Replica context."""
    if quantization is not None:
        return collectives.quantized_all_gather(local_shard, quantization, dtype, group)
    return collectives.all_gather(tf.cast(local_shard, dtype), group=group)


def in_replica_context_of(strategy):
    """True inside `strategy.run` (replica context of a distributed strategy)."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return tf.distribute.get_strategy() is strategy


class ShardedStorage(ShardedWeightFace):
    """A weight whose float32 master is a 1/N shard on each replica.

    It stands where a `tf.Variable` would stand inside a `keras.Variable`;
    Keras keeps the weight's shape, dtype, name, constraint and regularizer.
    Replica `r` holds elements `[r * shard_size, (r + 1) * shard_size)` of
    the flattened, zero-padded weight: the one-variable bucket of
    `tf_zero.plan`, which `ZeroOptimizer` updates in place. Subclasses say
    how the weight is read in replica context (`_replica_read`) and which
    variable the tape differentiates (`handle`).

    Attributes:
        shard: the sync-on-read `tf.Variable` of `shard_size` elements per
            replica.
        shape, dtype, name: the full weight's.
        size: number of elements of the full weight.
        shard_size: `ceil(size / num_shards)`.
    """

    gathers_on_read = False
    """Whether a read in replica context all-gathers the shards (stage 3)."""

    def __init__(self, shard, shape, dtype, name, strategy, config, autocast):
        self._tf_zero_shard = shard
        self._shape = tf.TensorShape(shape)
        self._dtype = tf.as_dtype(dtype)
        self._name = name
        self._strategy = strategy
        self._config = config
        self._autocast = autocast
        self.size = int(self._shape.num_elements())
        group_size = config.shard_group_size
        self.num_shards = group_size or strategy.num_replicas_in_sync
        self.shard_size = math.ceil(self.size / self.num_shards)
        # Hybrid sharding: (shard group, replica group); the K replicas of a
        # group hold the K shards, every group a copy.
        self.groups = collectives.shard_groups(strategy, group_size) if group_size else None

    def shard_index(self, rank: int) -> int:
        """The shard global replica `rank` holds."""
        return rank % self.num_shards

    @property
    def shard_group(self):
        """The `Subgroup` its gathers span (None: every replica)."""
        return self.groups[0] if self.groups else None

    # ---- what a tf.Variable answers --------------------------------------

    @property
    def shard(self):
        return self._tf_zero_shard

    @property
    def strategy(self):
        """The strategy that created the weight."""
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

    def __tf_tensor__(self, dtype=None, name=None):
        value = self.read_value()
        if dtype is not None and tf.as_dtype(dtype) != value.dtype:
            value = tf.cast(value, dtype)
        return value

    def value(self):
        return self.read_value()

    def read_value(self):
        """In replica context, the subclass's read; outside, the full master."""
        if in_replica_context_of(self._strategy):
            return self._replica_read()
        if not tf.executing_eagerly() and not tf.distribute.has_strategy():
            return self._serving_read()
        return self.full_value()

    @property
    def handle(self):
        # The tape differentiates with respect to what this replica keeps: a
        # stage-3 shard (the gather's custom gradient turns the full gradient
        # into its shard) or a working copy. Outside any strategy, a save
        # (tf.saved_model, export) sees the full float32 weight.
        if not tf.distribute.has_strategy() and _private.in_save_context():
            return self._export().handle
        return self._tf_zero_variable.handle

    def _replica_read(self):
        raise NotImplementedError

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
        """Concatenation of every replica's shard, unpadded and reshaped (under
        hybrid sharding the first group's shards come first: they suffice)."""
        flat = collectives.full_value(self._strategy, self.shard)
        with tf.device("/cpu:0"):
            return tf.reshape(flat[:self.size], self._shape)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        """Writes a full value into this worker's shards (cross-replica context).

        Each replica's shard is written from its own slice of `value`, one
        slice at a time, never from a padded or per-replica full copy. An
        eager or NumPy `value` (a weight read from a file: `load_weights`,
        `from_preset`) is viewed as a flat array, and each shard's old buffer
        is released before its slice is copied in, so the host holds nothing
        beside `value` and the shards (`_write_from_host`). In a graph each
        shard is assigned its padded slice.
        """
        if in_replica_context_of(self._strategy):
            raise ValueError(
                f"{self._name} is stored by tf_zero as 1/N shards; it cannot be assigned "
                "inside strategy.run. Assign it outside (model.set_weights, "
                "variable.assign) or train it with tf_zero.ZeroOptimizer.")
        if not isinstance(value, np.ndarray):
            value = tf.convert_to_tensor(value, dtype=self._dtype)
        if tuple(value.shape) != tuple(self._shape):
            raise ValueError(
                f"Cannot assign a value of shape {tuple(value.shape)} to {self._name} "
                f"of shape {tuple(self._shape)}.")
        if isinstance(value, np.ndarray):
            flat = value.reshape([-1])
        elif tf.executing_eagerly():
            # A view of the tensor's buffer: slices of a tensor would alias it,
            # and shards that alias one buffer keep all of it alive until the
            # last is rewritten, and are rewritten into new buffers (at the
            # next load, one more full tensor on the host).
            flat = np.reshape(value.numpy(), [-1])
        else:
            flat = tf.reshape(value, [-1])
        ranks = _private.local_replica_ranks(self._strategy)
        for rank, comp in zip(ranks, _private.components(self.shard)):
            if isinstance(flat, np.ndarray):
                self._write_from_host(comp, flat, self.shard_index(rank))
            else:
                comp.assign(self._shard_of(flat, self.shard_index(rank)))
        self._assigned(value)
        return self

    def _write_from_host(self, comp, flat, index) -> None:
        """Writes shard `index` of a flat NumPy value into replica component
        `comp`, holding no more than the shard did: its old buffer is
        released first, then its slice of the value is copied once into a
        buffer of the shard's size (`_private.host_copy`), which the
        variable adopts (`_private.replace_buffer`)."""
        start, stop = self._shard_range(index)
        piece = np.asarray(flat[start:stop], dtype=self._dtype.as_numpy_dtype)
        try:
            _private.replace_buffer(comp, lambda: _private.host_copy(piece, self.shard_size))
        except Exception as error:
            raise RuntimeError(
                f"Writing {self._name} into its shards failed, and replica shard {index} has "
                "lost its value; load the weights again.") from error

    def _shard_range(self, index) -> tuple[int, int]:
        """[start, stop) of shard `index` in the flat full value (unpadded)."""
        start = min(index * self.shard_size, self.size)
        return start, min(start + self.shard_size, self.size)

    def _shard_of(self, flat, index) -> tf.Tensor:
        """Shard `index` of the flat full value (a tensor), zero-padded at the end."""
        start, stop = self._shard_range(index)
        with tf.device("/cpu:0"):
            piece = tf.cast(flat[start:stop], self._dtype)
            return collectives.pad(piece, self.shard_size)

    def _assigned(self, value) -> None:
        """Called with every full value written into the shards."""

    def _refuse_update(self, *args, **kwargs):
        raise ValueError(
            f"{self._name} is stored by tf_zero as 1/N shards (ZeroStrategy); only "
            "tf_zero.ZeroOptimizer updates it. Compile the model with "
            "tf_zero.ZeroOptimizer(your_optimizer).")

    assign_add = _refuse_update
    assign_sub = _refuse_update
