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

import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.slot_face import PlacedSlot


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


class RunSlot(PlacedSlot):
    """Checkpoint face of one slot of a split variable, seen whole.

    Each replica holding a run of the variable keeps that run of the slot;
    saving joins the runs in order (across workers, a collective gather of
    every replica's run), restoring writes each local replica its run.
    Scalar slots (the same on every run) are read from the first run.
    """

    def _runs(self) -> dict:
        """{rank: Run} of this worker's replicas, in rank order (= run order)."""
        return {rank: owned.runs[self._index]
                for rank, owned in sorted(self._shards.owners.items())
                if self._index in owned.runs}

    def _parts(self) -> dict:
        return {rank: run.slots[self._position] for rank, run in self._runs().items()}

    def value(self) -> tf.Tensor:
        if _private.in_multi_worker_mode(self._shards.strategy):
            flat = self._gathered()
        else:
            with tf.device("/cpu:0"):
                slots = list(self._parts().values())
                flat = tf.concat([tf.reshape(s.value, [-1]) for s in slots], 0)
        with tf.device("/cpu:0"):
            return tf.reshape(flat if self.shape else flat[:1], self.shape)

    def _write(self, value):
        flat = tf.reshape(tf.cast(value, self.dtype), [-1])
        for run in self._runs().values():
            slot = run.slots[self._position]
            if len(slot.shape) == 0:
                slot.assign(flat[0] if self.shape else tf.reshape(flat, []))
            else:
                slot.assign(flat[run.start:run.start + run.size])
