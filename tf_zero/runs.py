"""Split variables inside the whole-variable partition: each replica's run.

A variable that its optimizer updates element by element (the embeddings,
vectors and norms Muon leaves to its AdamW, or a variable a MultiOptimizer
gives to an element-wise optimizer) need not be owned whole:
`plan_owners(split=...)` pours such variables into the replicas' streams
after the whole ones, so each replica holds one contiguous run of some of
them, and a large embedding no longer sets the busiest replica's share.

For each of its runs a replica keeps a flat copy of that part of the weight
(a plain variable on its device) and an optimizer built on it: a copy of the
variable's optimizer, on a view named like the model variable, so its slots
carry the plain optimizer's names, with the run's length. The copy is
refreshed from the model's weights before every update (they stay the source
of truth), updated by the optimizer's own `update_step`, and published by the
all-gather. A checkpoint sees each slot whole (`RunSlot`).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.slot_face import SlotFace, gather_parts


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Replica-local state of one run of a split variable.

    Attributes:
        variable: index of the model variable.
        start, size: the run, in the flattened variable.
        weight: flat `keras.Variable` view of this replica's copy of the run.
        optimizer: the copy of the variable's optimizer that updates it.
        slots: that optimizer's slots, in creation order (the run's length,
            or scalars).
    """

    variable: int
    start: int
    size: int
    weight: object
    optimizer: object
    slots: list


def build_runs(templates, variables, plan, rank, device) -> dict:
    """{variable index: Run} for replica `rank`'s runs of split variables.

    Runs in cross-replica context under the strategy's scope.
    """
    runs = {}
    for i, var in enumerate(variables):
        if not plan.is_split(i):
            continue
        start, size = plan.run(i, rank)
        if not size:
            continue
        # This worker's own copy (reading the variable itself would be a
        # collective, and workers build different numbers of runs).
        value = np.asarray(_private.components(var)[0].numpy()).reshape(-1)[start:start + size]
        with tf.variable_creator_scope(_private.local_variable_creator(device)):
            flat = tf.Variable(value, trainable=False, name=var.name.split(":")[0])
        weight = _private.keras_view(flat, like=var)
        opt, slots = local_optimizer(templates[i], weight, device)
        runs[i] = Run(i, start, size, weight, opt, slots)
    return runs


def local_optimizer(template, weight, device):
    """(optimizer, its slots): a copy of `template` built on `weight` alone,
    every variable of it a plain one on `device`, counting steps in
    `template.iterations`, updating locally.

    (Plain variables: under a multi-worker strategy a distributed variable's
    creation is a collective, and each worker builds different copies.)
    """
    with _private.keras_tracking(), \
            tf.variable_creator_scope(_private.local_variable_creator(device)):
        opt = type(template).from_config(template.get_config())
        _private.share_iterations(opt, _private.iterations_variable(template))
        _private.mark_local_update(opt)
        _private.detach_from_strategy(opt)
        before = len(opt.variables)
        opt.build([weight])
    return opt, list(opt.variables[before:])


def refresh(runs: dict, variables) -> None:
    """Copies each run of the model's weights (this replica's copy) into its run."""
    for run in runs.values():
        local = _private.local_component(variables[run.variable])
        run.weight.assign(tf.reshape(local.read_value(), [-1])[run.start:run.start + run.size])


class RunSlot(SlotFace):
    """Checkpoint face of one slot of a split variable, seen whole.

    Each replica holding a run of the variable keeps that run of the slot;
    saving concatenates the runs in order, restoring writes each replica its
    run. Scalar slots (the same on every run) are read from the first run.
    Across workers saving is collective: every replica's run is gathered.

    Args:
        shards: the sharded state (`partition == "whole"`).
        variable_index: index of the model variable.
        position: the slot's position among each run's slots.
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

    def _runs(self):
        runs = [owned.runs[self._index] for owned in self._shards.owners.values()
                if self._index in owned.runs]
        return sorted(runs, key=lambda run: run.start)

    def value(self) -> tf.Tensor:
        strategy = self._shards.strategy
        if _private.in_multi_worker_mode(strategy):
            # Collective: every replica gives its run (empty where it has none),
            # in rank order, which is the runs' order in the variable.
            if self._gather is None:
                parts = {rank: owned.runs[self._index].slots[self._position]
                         for rank, owned in self._shards.owners.items()
                         if self._index in owned.runs}
                self._gather = tf.function(
                    lambda: gather_parts(strategy, parts, self.dtype), autograph=False)
            flat = self._gather()
            with tf.device("/cpu:0"):
                return tf.reshape(flat if self.shape else flat[:1], self.shape)
        runs = self._runs()
        slots = [run.slots[self._position] for run in runs]
        with tf.device("/cpu:0"):
            if not self.shape or len(slots[0].shape) == 0:
                return tf.reshape(tf.identity(slots[0].value), self.shape)
            flat = tf.concat([tf.identity(s.value) for s in slots], 0)
            return tf.reshape(flat, self.shape)

    def _write(self, value):
        flat = tf.reshape(tf.cast(value, self.dtype), [-1])
        for run in self._runs():
            slot = run.slots[self._position]
            if len(slot.shape) == 0:
                slot.assign(flat[0] if self.shape else tf.reshape(flat, []))
            else:
                slot.assign(flat[run.start:run.start + run.size])
