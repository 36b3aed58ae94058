"""Checkpoint faces: sharded state that saves and restores as unsharded tensors.

A checkpoint of a `ZeroOptimizer` holds what the plain inner optimizer would:
one full tensor per slot of each model variable, under the plain optimizer's
names. Each face here stands for one such tensor wherever its parts live
(`UnshardedSlot`: pieces in every replica's shards; `OwnedSlot`: whole on its
owner; `RunSlot`: runs on some replicas; `ShardedWeightFace`: a stage-3
weight's shards) and says how to read the full value, how to write one, and,
for TensorFlow checkpoints, how to save and restore its own slices. See
docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.checkpoint import slices


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


class UnshardedSlot(SlotFace):
    """Checkpoint face of slot `slot_name` of model variable `variable_index`.

    Args:
        shards: the sharded optimizer state (`tf_zero.state.shards.Shards`).
        variable_index: index of the model variable in the shard plan.
        slot_position: position of the slot in each bucket's slot list.
        slot_name: the slot's name (e.g. "momentum").
    """

    def __init__(self, shards, variable_index, slot_position, slot_name):
        self._shards = shards
        self._index = variable_index
        self._position = slot_position
        self.slot_name = slot_name
        variable = shards.variables[variable_index]
        self.shape = tuple(variable.shape)
        self.dtype = tf.as_dtype(variable.dtype)
        self.name = f"{_private.slot_prefix(variable)}{slot_name}"

    @property
    def strategy(self):
        """The strategy the slot's shards live on."""
        return self._shards.strategy

    def _bucket_slot(self, bucket_index):
        return self._shards.slots[bucket_index][self._position]

    def _local_pieces(self, writers_only=False):
        """(component, piece) for every piece of this slot in this worker's
        shards. Under hybrid sharding every shard group holds each piece:
        `writers_only` keeps the first group's (one copy is saved), restoring
        writes them all."""
        shards = self._shards
        plan = shards.plan
        ranks = _private.local_replica_ranks(shards.strategy)
        for b, _ in plan.variable_segments(self._index):
            comps = _private.components(self._bucket_slot(b))
            for rank, comp in zip(ranks, comps):
                if writers_only and shards.shard_rank(rank) != rank:
                    continue
                for piece in plan.buckets[b].shard_pieces(shards.shard_rank(rank)):
                    if piece.variable == self._index:
                        yield comp, piece

    # -- TensorFlow checkpoints: slices ------------------------------------

    def _gather_saveables_for_checkpoint(self):
        return _private.sliced_saveables(self)

    def checkpoint_slices(self):
        """(spec, read, dtype, device) of each slice TensorFlow's saver saves or
        restores: this worker's pieces; none while `tf_zero.checkpoint`
        handles them (`slices.deferred()`); under several workers otherwise,
        the full value, gathered (every worker joins, and the chief's file is
        complete, as TensorFlow's multi-worker saving expects)."""
        if slices.deferred():
            return []
        if _private.in_multi_worker_mode(self._shards.strategy):
            return [("", self.value(), None, None)]
        return self.local_slices()

    @property
    def storage_dtype(self) -> tf.DType:
        """The dtype the slot is stored (and checkpointed) in."""
        return tf.as_dtype(
            self._bucket_slot(self._shards.plan.variable_segments(self._index)[0][0]).dtype)

    def local_runs(self, writers_only=False):
        """(component, first element, elements, offset in the shard) of each
        piece of this slot on this worker's replicas (`writers_only`: one copy
        of each, see `_local_pieces`)."""
        return [(comp, piece.start, piece.size, piece.offset)
                for comp, piece in self._local_pieces(writers_only)]

    def local_slices(self, max_elements=None, writers_only=True):
        """(spec, read, dtype, device) of the slices of this worker's pieces
        (one copy of each by default: what a save writes), each piece split
        into runs of at most `max_elements` first."""
        return slices.local_slices(self.local_runs(writers_only), self.shape, max_elements)

    def restore_slices(self, restored: dict) -> None:
        """Writes restored slices ({spec: tensor}, or {"": full value}) into this
        worker's pieces; pieces whose slices are not given are left as they are."""
        if "" in restored:
            self.check_shape(restored[""])  # a whole tensor: the restore op did not compare shapes
        slices.write_slices(self.local_runs(), self.shape, restored)

    # -- reading ----------------------------------------------------------

    def value(self) -> tf.Tensor:
        """The full, unpadded slot value, assembled from every shard."""
        plan = self._shards.plan
        strategy = self._shards.strategy
        multi_worker = _private.in_multi_worker_mode(strategy)
        parts = []
        for b, seg in plan.variable_segments(self._index):
            bucket = plan.buckets[b]
            slot = self._bucket_slot(b)
            lo, hi = seg.offset, seg.offset + seg.size
            if multi_worker:
                full = _gathered_bucket_slots(self._shards, b)[self._position]
                parts.append(full[lo:hi])
                continue
            comps = _private.components(slot)
            size = bucket.shard_size
            for rank in range(lo // size, (hi - 1) // size + 1):
                a = max(lo, rank * size) - rank * size
                z = min(hi, (rank + 1) * size) - rank * size
                with tf.device(comps[rank].device):
                    parts.append(tf.identity(comps[rank].read_value()[a:z]))
        if not parts:
            return tf.zeros(self.shape, self.dtype)
        with tf.device("/cpu:0"):
            return tf.reshape(collectives.join(parts), self.shape)

    # -- writing ----------------------------------------------------------

    def _write(self, value):
        """Writes a full slot value into the shards of this worker's replicas."""
        slices.write_slices(self.local_runs(), self.shape, {"": value})


_saving = threading.local()
_slot_gathers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Shards -> {bucket: gather}


@contextlib.contextmanager
def one_gather_per_bucket():
    """Within it, the slots of each bucket are gathered across workers once
    (`UnshardedSlot.value` of each of the bucket's variables reuses them): a
    save reads every slot, and the state does not change while it does."""
    outer = getattr(_saving, "gathered", None)
    if outer is None:
        _saving.gathered = {}
    try:
        yield
    finally:
        if outer is None:
            _saving.gathered = None


def _gathered_bucket_slots(shards, b) -> list[tf.Tensor]:
    """Every slot of bucket `b`, whole (all replicas' shards in rank order), on
    every worker: one collective per dtype, its function traced once."""
    memo = getattr(_saving, "gathered", None)
    key = (id(shards), b)
    if memo is not None and key in memo:
        return memo[key]
    gathers = _slot_gathers.setdefault(shards, {})
    if b not in gathers:
        gathers[b] = collectives.ComponentGather(shards.strategy, shards.slots[b])
    gathered = gathers[b]()
    if memo is not None:
        memo[key] = gathered
    return gathered


class PlacedSlot(SlotFace):
    """A slot of one model variable whose parts live on some replicas: on its
    owner (`OwnedSlot`) or in runs (`RunSlot`).

    Named and shaped by the plain optimizer's slot (its `SlotSpec`), which
    every worker knows, whether or not it holds a part. Subclasses define
    `_parts()`: {rank: slot variable} for this worker's replicas that hold a
    part, in rank order, which is the parts' order in the flattened slot.

    Args:
        shards: the sharded state (`partition == "whole"`).
        variable_index: index of the model variable.
        position: the slot's position among that variable's slots.
        spec: the plain optimizer's slot (`tf_zero.state.owners.SlotSpec`).
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

    def local_runs(self, writers_only=False) -> list:
        """(component, first element, elements, 0) of each part of this slot
        on this worker's replicas (`writers_only`: the first shard group's,
        whose copy is saved)."""
        raise NotImplementedError

    @property
    def strategy(self):
        """The strategy the slot's parts live on."""
        return self._shards.strategy

    @property
    def storage_dtype(self) -> tf.DType:
        return self.dtype

    # -- TensorFlow checkpoints: slices, written by the owners -------------

    def _gather_saveables_for_checkpoint(self):
        return _private.sliced_saveables(self)

    def checkpoint_slices(self):
        """As `UnshardedSlot.checkpoint_slices`: this worker's parts, none while
        `tf_zero.checkpoint` writes them, the gathered value under several
        workers otherwise."""
        if slices.deferred():
            return []
        if _private.in_multi_worker_mode(self._shards.strategy):
            return [("", self.value(), None, None)]
        return self.local_slices()

    def local_slices(self, max_elements=None, writers_only=True):
        """(spec, read, dtype, device) of the slices of this worker's parts."""
        return slices.local_slices(self.local_runs(writers_only), self.shape, max_elements)

    def restore_slices(self, restored: dict) -> None:
        """Writes restored slices ({spec: tensor}, or {"": full value}) into
        every part of this slot on this worker's replicas."""
        if "" in restored:
            self.check_shape(restored[""])
        slices.write_slices(self.local_runs(), self.shape, restored)

    def _write(self, value):
        slices.write_slices(self.local_runs(), self.shape, {"": value})

    def _gathered(self) -> tf.Tensor:
        """Every replica's part, joined in rank order, on every worker.

        A collective (every worker's save reads every slot, in the same
        order), traced once: an eager gather traces a function of its own
        each time, about half a second.
        """
        if self._gather is None:
            strategy, parts, dtype = self._shards.strategy, self._parts(), self.dtype
            self._gather = tf.function(
                lambda: collectives.gather_parts(strategy, parts, dtype), autograph=False)
        return self._gather()


class OwnedSlot(PlacedSlot):
    """Checkpoint face of one slot of a variable owned whole by one replica.

    The slot lives only on the owner (`tf_zero.state.owners`; under hybrid
    sharding, on its owner in each shard group). On one worker, saving reads
    it there (the first group's copy). Across workers, saving is collective:
    each worker gathers from all replicas a value that is the slot on its
    (first group's) owner and empty on every other replica. Restoring writes
    the slot where an owner is local and does nothing on other workers. At
    another replica count the owner changes, and the value lands on the new one.
    """

    def _local_slots(self, writers_only=False) -> dict:
        """{global rank: slot} on this worker's replicas that own the variable:
        its owner, or under hybrid sharding its owner in every shard group
        (`writers_only`: the first group's, whose copy is saved)."""
        shards, owner = self._shards, self._shards.plan.owner(self._index)
        return {rank: owned.slots(self._index)[self._position]
                for rank, owned in sorted(shards.owners.items())
                if shards.shard_rank(rank) == owner and not (writers_only and rank != owner)}

    def _parts(self) -> dict:
        return self._local_slots(writers_only=True)

    def local_runs(self, writers_only=False) -> list:
        size = tf.TensorShape(self.shape).num_elements()
        return [(_private.tf_variable(slot), 0, size, 0)
                for slot in self._local_slots(writers_only).values()]

    def value(self) -> tf.Tensor:
        if _private.in_multi_worker_mode(self._shards.strategy):
            flat = self._gathered()
            with tf.device("/cpu:0"):
                return tf.reshape(flat, self.shape)
        (slot,) = self._local_slots(writers_only=True).values()
        with tf.device("/cpu:0"):
            return tf.identity(slot.value)


class RunSlot(PlacedSlot):
    """Checkpoint face of one slot of a split variable, seen whole.

    Each replica holding a run of the variable keeps that run of the slot;
    saving joins the runs in order (across workers, a collective gather of
    every replica's run), restoring writes each local replica its run.
    Scalar slots (the same on every run) are read from the first run.
    """

    def _runs(self, writers_only=False) -> dict:
        """{global rank: Run} of this worker's replicas, in rank order (= run
        order). Under hybrid sharding every shard group holds each run:
        `writers_only` keeps the first group's (one copy is saved)."""
        shards = self._shards
        return {rank: owned.runs[self._index]
                for rank, owned in sorted(shards.owners.items())
                if self._index in owned.runs
                and not (writers_only and shards.shard_rank(rank) != rank)}

    def _parts(self) -> dict:
        return {rank: run.slots[self._position]
                for rank, run in self._runs(writers_only=True).items()}

    def local_runs(self, writers_only=False) -> list:
        """A run's part of the slot; a scalar slot (the same on every run) is
        the slot's one element, saved from the first run only."""
        out = []
        for run in self._runs(writers_only).values():
            slot = _private.tf_variable(run.slots[self._position])
            if len(slot.shape) == 0:
                if not (writers_only and run.start):
                    out.append((slot, 0, 1, 0))
            else:
                out.append((slot, run.start, run.size, 0))
        return out

    def value(self) -> tf.Tensor:
        if _private.in_multi_worker_mode(self._shards.strategy):
            flat = self._gathered()
        else:
            with tf.device("/cpu:0"):
                flat = collectives.join([tf.reshape(s.value, [-1])
                                         for s in self._parts().values()])
        with tf.device("/cpu:0"):
            return tf.reshape(flat if self.shape else flat[:1], self.shape)


class ShardedWeightFace:
    """The checkpoint and SavedModel protocol of a weight stored as shards.

    Mixed into `tf_zero.weights.storage.ShardedStorage`, which provides
    `shard`, `size`, `shard_size`, `shard_index()`, `_shape`, `_dtype`,
    `_name`, `_strategy` and `full_value()`: a TensorFlow checkpoint holds the full, unpadded
    weight as each replica's slices; a SavedModel holds one plain variable
    with the full value (`_export`), refreshed when it is written.
    """

    _export_variable = None

    def _serialize_to_tensors(self):
        if slices.deferred():
            # tf_zero.checkpoint writes and reads the shards' slices itself;
            # the object graph still records the entry.
            return {_private.VARIABLE_VALUE_KEY: {}}
        return {_private.VARIABLE_VALUE_KEY: self.full_value()}

    @property
    def storage_dtype(self) -> tf.DType:
        return tf.as_dtype(self.shard.dtype)

    def local_runs(self, writers_only=False):
        """(component, first element, elements, 0) of each local replica's
        unpadded shard. Under hybrid sharding every group holds each shard:
        `writers_only` keeps the first group's (one copy is saved), restoring
        writes them all."""
        runs = []
        ranks = _private.local_replica_ranks(self._strategy)
        for rank, comp in zip(ranks, _private.components(self.shard)):
            index = self.shard_index(rank)
            if writers_only and index != rank:
                continue
            lo = index * self.shard_size
            hi = min(lo + self.shard_size, self.size)
            if lo < hi:
                runs.append((comp, lo, hi - lo, 0))
        return runs

    def local_slices(self, max_elements=None, writers_only=True):
        """(spec, read, dtype, device) of the slices of this worker's shards
        (one copy of each by default: what a save writes)."""
        return slices.local_slices(self.local_runs(writers_only),
                                  tuple(self._shape.as_list()), max_elements)

    def restore_slices(self, restored: dict) -> None:
        """Writes restored slices ({spec: tensor}) into this worker's shards
        (`slices_restored()` follows, once every slice is written)."""
        slices.write_slices(self.local_runs(), tuple(self._shape.as_list()), restored)

    def slices_restored(self) -> None:
        """Called once every restored slice is written (a working weight then
        refreshes its 16-bit copy)."""

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
