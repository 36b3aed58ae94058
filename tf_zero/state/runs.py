"""Split variables inside the whole-variable partition: each replica's run.

A variable its optimizer updates element by element (the embeddings and
vectors Muon leaves to its AdamW, or a MultiOptimizer's element-wise picks)
is poured by `plan_owners(split=...)` in runs over the replicas. For each run
a replica keeps a flat copy of that part of the weight, refreshed from the
model before every update, and a copy of the variable's optimizer built on it
(slots named as the plain optimizer's). See docs/whole-variable.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tf_zero import _private


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
    """{variable index: Run} for the runs of split variables that the plan
    gives `rank` (a shard rank: the replica's, modulo K under hybrid sharding).

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
