"""Sharded optimizer state that saves and restores as if it were unsharded.

TensorFlow saves a sync-on-read variable as replica 0's component and
restores that value on every replica, so a naively checkpointed shard loses
N-1 of its N pieces. Each `UnshardedSlot` here stands for one slot (say, Adam's
momentum) of one model variable, saved under the plain optimizer's key with
the full, unpadded shape. A TensorFlow checkpoint (`tf.train.Checkpoint`)
stores it as slices: each replica's pieces of the slot are written straight
from its shard, as slices of the full tensor (`tf_zero.slices`), and a
restore reads, for each replica, only the slices of its own pieces, from
whatever split the checkpoint holds. Keras' single-file formats read the
full value (`value()`), assembled from the shards. A checkpoint therefore
has the same keys, shapes and values as the plain inner optimizer's, and
restores at any replica count or stage, or into the plain optimizer.

`slot_layout` recovers the order in which the plain optimizer would create its
slot variables, which fixes their position in `optimizer.variables` (the key
of Keras' `.weights.h5` files and of `tf.train.Checkpoint`'s `_variables/i`).
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private, owners, slices
from tf_zero.slot_face import SlotFace


def variable_path(variable) -> str:
    """A Keras variable's path; for a raw `tf.Variable`, its name without ":0"."""
    path = getattr(variable, "path", None)
    return path if path is not None else variable.name.split(":")[0]


class UnshardedSlot(SlotFace):
    """Checkpoint face of slot `slot_name` of model variable `variable_index`.

    Args:
        shards: the sharded optimizer state (`tf_zero.shards.Shards`).
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
        self.name = f"{variable_path(variable).replace('/', '_')}_{slot_name}"

    def _bucket_slot(self, bucket_index):
        return self._shards.slots[bucket_index][self._position]

    def _local_pieces(self):
        """(component, piece) for every piece of this slot in this worker's shards."""
        plan = self._shards.plan
        ranks = _private.local_replica_ranks(self._shards.strategy)
        for b, _ in plan.variable_segments(self._index):
            comps = _private.components(self._bucket_slot(b))
            for rank, comp in zip(ranks, comps):
                for piece in plan.buckets[b].shard_pieces(rank):
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

    def local_runs(self):
        """(component, first element, elements, offset in the shard) of each
        piece of this slot on this worker's replicas."""
        return [(comp, piece.start, piece.size, piece.offset)
                for comp, piece in self._local_pieces()]

    def local_slices(self, max_elements=None):
        """(spec, read, dtype, device) of the slices of this worker's pieces,
        each piece split into runs of at most `max_elements` first."""
        return local_slices(self.local_runs(), self.shape, max_elements)

    def restore_slices(self, restored: dict) -> None:
        """Writes restored slices ({spec: tensor}, or {"": full value}) into this
        worker's pieces; pieces whose slices are not given are left as they are."""
        if "" in restored:
            self.check_shape(restored[""])  # a whole tensor: the restore op did not compare shapes
        write_slices(self.local_runs(), self.shape, restored)

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
                full = gather_components(strategy, slot)
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
            flat = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
            return tf.reshape(flat, self.shape)

    # -- writing ----------------------------------------------------------

    def _write(self, value):
        """Writes a full slot value into the shards of this worker's replicas."""
        write_slices(self.local_runs(), self.shape, {"": value})


def local_slices(runs, shape, max_elements=None) -> list:
    """(spec, read, dtype, device) of every checkpoint slice of `runs`
    ([(component, first element, elements, offset in the component)])."""
    out = []
    for comp, start, size, offset in runs:
        for a, b in slices.split_run(start, start + size, max_elements):
            for s in slices.flat_slices(shape, a, b):
                out.append((s.spec, functools.partial(read_slice, comp, offset + s.flat_start - start, s),
                            comp.dtype, comp.device))
    return out


def write_slices(runs, shape, restored: dict) -> None:
    """Writes restored slices ({spec: tensor}; "" for the whole tensor) into the
    parts of `runs` they cover, each straight into its place: no joined copy."""
    for spec, value in restored.items():
        if not spec:
            flat = tf.reshape(value, [-1])
            for comp, start, size, offset in runs:
                write_run(comp, offset, flat[start:start + size])
            continue
        first, count = slices.parse_spec(spec, shape)
        for comp, start, size, offset in runs:
            if start <= first and first + count <= start + size:
                write_run(comp, offset + first - start, value)
                break
        else:
            raise ValueError(f"checkpoint slice {spec!r} is not within this worker's pieces")


def write_run(component, offset, value) -> None:
    """Writes `value`, flattened, into `component[offset:]` in place.

    (`component[a:b].assign(...)` reads the variable first, and the read keeps
    its buffer shared: TensorFlow then copies the whole variable to write.)
    """
    value = tf.reshape(value, [-1])
    with tf.device(component.device):
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=component.handle, begin=[offset], end=[offset + int(value.shape[0])],
            strides=[1], value=tf.cast(value, component.dtype))


def read_slice(component, offset, piece_slice):
    """One checkpoint slice, read from a replica's shard without a copy."""
    with tf.device(component.device):
        flat = component.read_value()[offset:offset + piece_slice.size]
        return tf.reshape(flat, piece_slice.extent)


def gather_components(strategy, variable):
    """All replicas' components of a per-replica variable, in rank order."""
    comps = _private.components(variable)
    offset = _private.local_replica_ranks(strategy)[0]
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: comps[ctx.replica_id_in_sync_group - offset].read_value())
    return strategy.gather(per_replica, axis=0)


def slot_layout(inner_optimizer, probe_variables):
    """Order of the plain optimizer's slots, learned from a 2-variable probe.

    Keras optimizers create slots in calls to `add_optimizer_variables` /
    `add_variable_from_reference`, each call looping over the variables with
    a list of slot names (Adam: momentum, velocity; then, with amsgrad, a
    second call for velocity_hat). A fresh copy of the optimizer is built on
    two tiny variables and its slot sequence parsed into such call groups.

    Args:
        inner_optimizer: the optimizer whose config is probed.
        probe_variables: two 1-element Keras variables named "a" and "b".

    Returns:
        A list of groups, each a list of slot names; the plain optimizer's
        slots are, group by group, for each variable, for each name.

    Raises:
        ValueError: the sequence does not follow this pattern.
    """
    probe = type(inner_optimizer).from_config(inner_optimizer.get_config())
    before = len(probe.variables)
    probe.build(probe_variables)
    sequence = []
    refs = [v.path.replace("/", "_") + "_" for v in probe_variables]
    for var in probe.variables[before:]:
        owner = next((i for i, r in enumerate(refs) if var.name.startswith(r)), None)
        if owner is None:
            raise ValueError(f"cannot place optimizer variable {var.name}")
        sequence.append((owner, var.name[len(refs[owner]):]))
    groups, i = [], 0
    while i < len(sequence):
        names = []
        while i < len(sequence) and sequence[i][0] == 0:
            names.append(sequence[i][1])
            i += 1
        second = [n for _, n in sequence[i:i + len(names)]]
        if not names or second != names or any(o != 1 for o, _ in sequence[i:i + len(names)]):
            raise ValueError(
                f"{type(inner_optimizer).__name__} creates its slots in an order "
                "tf_zero cannot reproduce for checkpoints.")
        i += len(names)
        groups.append(names)
    return groups


class CheckpointList(_private.Trackable):
    """A list whose items are checkpoint dependencies named "0", "1", ...

    Appending an item resolves any restore that was waiting for that name,
    so a checkpoint read before the optimizer was built lands on build.
    """

    def __init__(self, items=()):
        self._items = []
        for item in items:
            self.append(item)

    def append(self, item):
        self._items.append(item)
        self._track_trackable(item, name=str(len(self._items) - 1), overwrite=True)

    def __setitem__(self, index, item):
        self._items[index] = item
        self._track_trackable(item, name=str(index), overwrite=True)

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return {str(i): item for i, item in enumerate(self._items)}


def as_numpy(item):
    return np.asarray(item.numpy())


def unsharded_slots(inner, shards) -> list:
    """Checkpoint items for the slots, in the plain optimizer's order."""
    probe_vars = [keras.Variable(np.zeros(1, np.float32), name=n, trainable=False)
                  for n in ("a", "b")]
    groups = slot_layout(inner, probe_vars)
    prefixes = [s.path.replace("/", "_") + "_" for s in shards.storage]
    names = [[slot.name[len(prefixes[b]):] for slot in slots]
             for b, slots in enumerate(shards.slots)]
    items = []
    for group in groups:
        positions = [names[0].index(name) if names else 0 for name in group]
        for k in range(len(shards.variables)):
            for name, position in zip(group, positions):
                items.append(UnshardedSlot(shards, k, position, name))
    return items


def _load_values(items, values, optimizer_name, inner_name) -> None:
    """Assigns `values` ({"0": array, ...}) to `items`, after checking all of them.

    Raises:
        ValueError: another number of values or other shapes than `items`
            (the values come from a different optimizer or model).
    """
    items = list(items)
    if len(values) != len(items):
        raise ValueError(
            f"The saved optimizer state has {len(values)} variables but "
            f"{optimizer_name} ({inner_name} on this model) has "
            f"{len(items)}: the checkpoint comes from a different optimizer "
            "or model. Load it into the optimizer and model it was saved from.")
    for i, item in enumerate(items):
        value = values[str(i)]
        if tuple(value.shape) != tuple(item.shape):
            raise ValueError(
                f"Saved optimizer variable {i} has shape {tuple(value.shape)} "
                f"but {item.name} has shape {tuple(item.shape)}: the "
                "checkpoint comes from a different model or optimizer.")
    for i, item in enumerate(items):
        item.assign(values[str(i)])



class CheckpointFace:
    """What a `ZeroOptimizer`'s checkpoints hold: the plain inner optimizer's state.

    `items` are the inner optimizer's variables in its own order (iterations,
    learning rate, then each slot of each model variable: `UnshardedSlot`
    views when sharded), `model_variables` the variables it trains. Created
    before the build so that a restore can wait on the names "0", "1", ...

    Args:
        inner: the inner Keras optimizer.
    """

    def __init__(self, inner):
        learning_rate = _private.learning_rate_variable(inner)
        self.items = CheckpointList([_private.iterations_variable(inner)]
                                    + ([learning_rate] if learning_rate is not None else []))
        self.model_variables = CheckpointList()

    def add_unsharded(self, inner, var_list) -> None:
        """The state of an inner optimizer that was built on the model itself."""
        for v in inner.variables[len(self.items):]:
            self.items.append(v)
        for v in _private.trained_variables(inner) or var_list:
            self.model_variables.append(v)

    def add_sharded(self, inner, shards) -> None:
        """The state of an inner optimizer built on `shards`, seen unsharded."""
        self.items[0] = _private.iterations_variable(inner)
        if _private.learning_rate_variable(inner) is not None:
            self.items[1] = _private.learning_rate_variable(inner)
        for v in shards.variables:
            self.model_variables.append(v)
        if not shards.whole:
            items = unsharded_slots(inner, shards)
        elif not isinstance(inner, keras.optimizers.MultiOptimizer):
            items = owners.owned_slots(inner, shards)
        else:
            # A MultiOptimizer's variables: its own, then each optimizer's
            # counter, learning rate and slots, optimizer by optimizer.
            items = []
            for opt in inner.optimizers:
                indices = [i for i, o in enumerate(shards.optimizers) if o is opt]
                items += [*opt.variables, *owners.owned_slots(opt, shards, indices)]
        for item in items:
            self.items.append(item)

    def children(self, inner, save_type, **kwargs) -> dict:
        """The dependencies of a plain `inner` optimizer, with `items` as its variables.

        A SavedModel is for serving: it keeps the step, not the sharded slots
        (checkpoints carry the full training state).
        """
        iterations = _private.iterations_variable(inner)
        if str(save_type).lower().endswith("savedmodel"):
            return {"_iterations": iterations}
        children = {"_iterations": iterations, "_variables": self.items}
        learning_rate = _private.learning_rate_variable(inner)
        if learning_rate is not None:
            children["_learning_rate"] = learning_rate
        if len(self.model_variables):
            children["_trainable_variables"] = self.model_variables
        known = {id(v) for v in inner.variables}
        for name, child in _private.trackable_children(inner, save_type, **kwargs).items():
            if isinstance(child, (keras.Variable, tf.Variable)) and id(child) not in known:
                children.setdefault(name, child)  # e.g. Nadam's _u_product
        return children

    def save(self, store) -> None:
        """Writes every item, unsharded, under "0", "1", ... (Keras' store)."""
        for i, item in enumerate(self.items):
            store[str(i)] = as_numpy(item)

    def load(self, values, optimizer_name, inner_name) -> None:
        """Assigns `values` ({"0": array, ...}) to the items, after checking all."""
        _load_values(self.items, values, optimizer_name, inner_name)
