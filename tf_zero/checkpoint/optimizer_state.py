"""A `ZeroOptimizer`'s checkpoints hold the plain inner optimizer's state.

`CheckpointFace` lists the inner optimizer's variables in the plain
optimizer's own order (iterations, learning rate, then each slot of each
model variable, as faces of the sharded slots: `tf_zero.checkpoint.faces`),
which is the key of Keras' `.weights.h5` files and of `tf.train.Checkpoint`'s
`_variables/i`. `slot_layout` recovers that order from a two-variable probe.
See docs/checkpoints.md.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.checkpoint import faces, slices
from tf_zero.checkpoint.faces import OwnedSlot, RunSlot, UnshardedSlot
from tf_zero.state.owners import plain_order


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
    refs = [_private.slot_prefix(v) for v in probe_variables]
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
        _private.track_trackable(self, item, str(len(self._items) - 1))

    def __setitem__(self, index, item):
        self._items[index] = item
        _private.track_trackable(self, item, str(index))

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
    prefixes = [_private.slot_prefix(s) for s in shards.storage]
    names = [[slot.name[len(prefixes[b]):] for slot in slots]
             for b, slots in enumerate(shards.slots)]
    items = []
    for group in groups:
        positions = [names[0].index(name) if names else 0 for name in group]
        for k in range(len(shards.variables)):
            for name, position in zip(group, positions):
                items.append(UnshardedSlot(shards, k, position, name))
    return items


def owned_slots(inner, shards, indices=None) -> list:
    """Checkpoint items for the slots of whole variables, in the plain order.

    Args:
        inner: the optimizer that updates the variables `indices`.
        shards: the sharded state (`Partition.WHOLE`).
        indices: the variables `inner` updates; default: all of them.
    """
    indices = list(range(len(shards.variables)) if indices is None else indices)
    faces = []
    for i in indices:
        face = RunSlot if shards.plan.is_split(i) else OwnedSlot  # runs, or one owner
        faces.append([face(shards, i, position, spec)
                      for position, spec in enumerate(shards.slot_specs[i])])
    return [item for _, item in plain_order(inner, faces)]


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
    # Slots of a bucket of several variables arrive in parts: assembled,
    # each replica's shard is written whole (`slices.write_run`).
    with slices.assembling([item.local_runs() for item in items
                            if hasattr(item, "local_runs")]):
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
        elif not _private.is_multi_optimizer(inner):
            items = owned_slots(inner, shards)
        else:
            # A MultiOptimizer's variables: its own, then each optimizer's
            # counter, learning rate and slots, optimizer by optimizer.
            items = []
            for opt in inner.optimizers:
                indices = [i for i, o in enumerate(shards.optimizers) if o is opt]
                items += [*opt.variables, *owned_slots(opt, shards, indices)]
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
        with faces.one_gather_per_bucket():
            for i, item in enumerate(self.items):
                store[str(i)] = as_numpy(item)

    def load(self, values, optimizer_name, inner_name) -> None:
        """Assigns `values` ({"0": array, ...}) to the items, after checking all."""
        _load_values(self.items, values, optimizer_name, inner_name)
