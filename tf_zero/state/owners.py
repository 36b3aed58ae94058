"""The whole-variable partition's state: each variable's optimizer on its owner.

Under `plan_owners` every variable belongs whole to one replica, which alone
keeps its optimizer state and runs its optimizer's own `update_step` on its
copy of the weight (a copy of the inner optimizer, or of a MultiOptimizer's
pick, built on a view named like the model variable). Every worker knows
every slot's name, shape and dtype without building it (`plain_slot_specs`),
which the checkpoint face needs. Split variables live in runs
(`tf_zero.state.runs`). See docs/whole-variable.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.state.runs import build_runs, local_optimizer


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """What every worker knows of a slot, wherever it lives.

    Attributes:
        name: the slot's name (the plain optimizer's).
        shape: its shape.
        dtype: its dtype.
    """

    name: str
    shape: tuple
    dtype: tf.DType

    @classmethod
    def of(cls, variable) -> "SlotSpec":
        return cls(variable.name, tuple(variable.shape), tf.as_dtype(variable.dtype))


def plain_slot_specs(templates, variables) -> tuple:
    """Per variable, the slots a plain optimizer would create for it, in order.

    A plain optimizer built on the model creates its slots variable by
    variable (Lamb, Adafactor and Muon all do; with `use_ema`, after every
    variable's moving average), so a copy of it built on one variable creates
    exactly that variable's slots (Adafactor's factored moments have shapes
    derived from the variable's; Muon chooses its slots by path and shape).
    Both are built here on stand-ins of the variables' names, paths, shapes
    and dtypes in a graph of their own: nothing is allocated, and every
    worker computes the same answer, including for variables other workers
    own, without communicating.

    Args:
        templates: per variable, the optimizer that updates it (the inner
            optimizer, or a MultiOptimizer's pick).
        variables: the model variables.

    Returns:
        A tuple with, for each of `variables`, a tuple of `SlotSpec`s.

    Raises:
        ValueError: a plain optimizer orders its slots otherwise.
    """
    each = {id(t): t for t in templates}  # every optimizer once
    configs = {key: t.get_config() for key, t in each.items()}  # eagerly: reads the rate

    def slots_of(template, var_list):
        optimizer = type(template).from_config(configs[id(template)])
        before = len(optimizer.variables)
        optimizer.build(var_list)
        return [SlotSpec.of(v) for v in optimizer.variables[before:]]

    with tf.Graph().as_default(), _private.keras_tracking():
        stand_ins = [_private.stand_in(v) for v in variables]
        per_variable = tuple(tuple(slots_of(t, [v])) for t, v in zip(templates, stand_ins))
        for template in each.values():
            mine = [i for i, t in enumerate(templates) if t is template]
            plain = slots_of(template, [stand_ins[i] for i in mine])
            joined = [spec for _, spec in plain_order(template, [per_variable[i] for i in mine])]
            if plain != joined:
                raise ValueError(
                    f"{type(template).__name__} does not create its slots variable by "
                    "variable, so tf_zero cannot give its whole-variable checkpoints the "
                    "plain optimizer's order. Train it with ZeroOptimizer(partition="
                    "'element') if it is element-wise, or unwrapped. "
                    f"(plain order {[s.name for s in plain[:4]]}..., per variable "
                    f"{[s.name for s in joined[:4]]}...)")
    return per_variable


def plain_order(template, per_variable) -> list:
    """((k, position), item) for every item of `per_variable`, in the plain
    optimizer's order.

    `per_variable[k]` lists variable k's slots (or their faces) in the
    creation order of an optimizer built on it alone; with `use_ema` the plain
    optimizer creates every variable's average first, then the other slots
    variable by variable.
    """
    lead = 1 if template.use_ema else 0
    first = [((k, p), s) for k, slots in enumerate(per_variable)
             for p, s in enumerate(slots[:lead])]
    rest = [((k, p + lead), s) for k, slots in enumerate(per_variable)
            for p, s in enumerate(slots[lead:])]
    return first + rest


@dataclasses.dataclass(frozen=True, eq=False)
class OwnedVariables:
    """One local replica's whole variables and their optimizers.

    Attributes:
        rank: the replica's global rank (under hybrid sharding it owns what
            shard `rank % K` owns).
        device: its device.
        views: variable index -> `keras.Variable` over the replica's copy.
        optimizers: variable index -> the optimizer that updates it.
        slot_lists: variable index -> that optimizer's slots, in the order
            it created them.
        runs: the replica's runs of split variables (`tf_zero.state.runs`).
    """

    rank: int
    device: str
    views: dict
    optimizers: dict
    slot_lists: dict
    runs: dict = dataclasses.field(default_factory=dict)
    """Variable index -> `tf_zero.state.runs.Run`: this replica's runs of split variables."""

    def slots(self, index: int) -> list:
        """The optimizer state of variable `index`, in its creation order."""
        return self.slot_lists[index]


def build_owned(templates, variables, plan, strategy, slot_specs,
                shard_group_size=None) -> dict:
    """{global rank: OwnedVariables} for the replicas of this worker.

    Runs in cross-replica context under `strategy.scope()`. Variables owned
    by another worker's replicas get nothing here. Under hybrid sharding
    (`shard_group_size` K, a plan of K owners) replica `r` takes owner
    `r % K`'s part: every shard group holds one copy of the state.

    Args:
        templates: per variable, the optimizer whose config and step counter
            its owner's copy takes (`tf_zero.state.partition.variable_optimizers`).
        slot_specs: `plain_slot_specs(templates, variables)`; each optimizer
            built here on a whole variable must create what it says.
    """
    ranks = _private.local_replica_ranks(strategy)
    owned = {}
    for local, rank in enumerate(ranks):
        device = strategy.extended.worker_devices[local]
        owner = rank % shard_group_size if shard_group_size else rank
        views, optimizers, slot_lists = {}, {}, {}
        for i, var in enumerate(variables):
            if plan.is_split(i) or plan.owner(i) != owner:
                continue
            component = _private.components(var)[local]
            views[i] = _private.keras_view(component, like=var)
            template = templates[i]
            optimizers[i], slot_lists[i] = local_optimizer(template, views[i], device)
            built = [SlotSpec.of(v) for v in slot_lists[i]]
            if built != list(slot_specs[i]):
                raise ValueError(
                    f"{type(template).__name__} created the slots {built} for {var.path} "
                    f"on its owner but {list(slot_specs[i])} on a stand-in of it; "
                    "tf_zero cannot checkpoint its whole-variable state. Train it "
                    "unwrapped.")
        owned[rank] = OwnedVariables(rank, device, views, optimizers, slot_lists,
                                     build_runs(templates, variables, plan, owner, device))
    return owned


def state_bytes(slot_specs) -> list:
    """Bytes of optimizer state each variable's optimizer keeps for it.

    From `plain_slot_specs`: exact shapes (Adafactor's factored rows and
    columns, Muon's one or two moments), nothing allocated.
    """
    return [sum(int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.size for spec in specs)
            for specs in slot_specs]
