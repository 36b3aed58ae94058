"""The whole-variable partition's state: each variable's optimizer on its owner.

Lamb's trust ratio, Adafactor's factored moments and Muon's
orthogonalization need a variable's whole tensor. Under `plan_owners` every
variable belongs whole to one replica; that replica alone keeps the
variable's optimizer state and runs the inner optimizer's own `update_step`
on it, on its local copy of the weight (every replica still holds the full
weights at stages 1 and 2; the owner's copy is the one updated, then
published by the all-gather).

Each owned variable gets an optimizer of its own, a copy of the inner
optimizer (under a MultiOptimizer: of the optimizer its map picks) from its
config that counts steps in that optimizer's `iterations`, built on a view
of the owner's copy of the weight (same name and path as the model's
variable, so slot names and Muon's path rules are the plain optimizer's). Its slots are plain variables on the owner's device:
no other replica holds them.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.runs import RunSlot, build_runs
from tf_zero.slot_face import SlotFace


@dataclasses.dataclass(frozen=True, eq=False)
class OwnedVariables:
    """One local replica's whole variables and their optimizers.

    Attributes:
        rank: the replica's global rank.
        device: its device.
        views: variable index -> `keras.Variable` over the replica's copy.
        optimizers: variable index -> the optimizer that updates it.
        slot_lists: variable index -> that optimizer's slots, in the order
            it created them.
        runs: the replica's runs of split variables (`tf_zero.runs`).
    """

    rank: int
    device: str
    views: dict
    optimizers: dict
    slot_lists: dict
    runs: dict = dataclasses.field(default_factory=dict)
    """Variable index -> `tf_zero.runs.Run`: this replica's runs of split variables."""

    def slots(self, index: int) -> list:
        """The optimizer state of variable `index`, in its creation order."""
        return self.slot_lists[index]


def build_owned(templates, variables, plan, strategy) -> dict:
    """{rank: OwnedVariables} for the replicas of this worker.

    `templates` gives, per variable, the optimizer whose config and step
    counter its owner's copy takes (`tf_zero.support.variable_optimizers`).
    Runs in cross-replica context under `strategy.scope()`.
    """
    ranks = _private.local_replica_ranks(strategy)
    owned = {}
    for local, rank in enumerate(ranks):
        device = strategy.extended.worker_devices[local]
        views, optimizers, slot_lists = {}, {}, {}
        for i, var in enumerate(variables):
            if plan.is_split(i) or plan.owner(i) != rank:
                continue
            component = _private.components(var)[local]
            views[i] = _private.keras_view(component, like=var)
            template = templates[i]
            with _private.keras_tracking():
                opt = type(template).from_config(template.get_config())
                _private.share_iterations(opt, _private.iterations_variable(template))
                _private.mark_local_update(opt)
                _private.detach_from_strategy(opt)
                before = len(opt.variables)
                with tf.variable_creator_scope(_private.local_variable_creator(device)):
                    opt.build([views[i]])
            optimizers[i] = opt
            slot_lists[i] = opt.variables[before:]
        owned[rank] = OwnedVariables(rank, device, views, optimizers, slot_lists,
                                     build_runs(templates, variables, plan, rank, device))
    return owned


# Distinct dimensions for the stand-ins of `state_bytes`: a slot's shape then
# says which of its variable's axes it keeps.
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def state_bytes(templates, variables) -> list:
    """Bytes of optimizer state each variable's optimizer would keep for it.

    A copy of the variable's optimizer is built on a tiny stand-in of the same
    name, path and rank, each axis a distinct prime long; every slot's shape
    then names the axes it keeps (Adafactor's factored rows and columns,
    Muon's momentum, a scalar placeholder), and its size at the real shape
    follows without allocating it. Deterministic: every worker gets the same.

    Args:
        templates: per variable, the optimizer that updates it.
        variables: the model variables (or anything with `shape`, `dtype`,
            `name` and `path`).
    """
    costs = []
    for template, var in zip(templates, variables):
        shape = tuple(int(d) for d in var.shape)
        if len(shape) > len(_PRIMES):
            costs.append(2 * int(np.prod(shape)) * tf.as_dtype(var.dtype).size)
            continue
        axis = {p: a for a, p in enumerate(_PRIMES[:len(shape)])}
        proxy = keras.Variable(np.zeros(_PRIMES[:len(shape)], np.float32), name=var.name,
                               trainable=False, dtype=var.dtype)
        view = _private.keras_view(_private.tf_variable(proxy), like=var)
        with _private.keras_tracking():
            probe = type(template).from_config(template.get_config())
            before = len(probe.variables)
            probe.build([view])
        total = 0
        for slot in probe.variables[before:]:
            dims = [shape[axis[d]] if d in axis else d for d in slot.shape]
            total += int(np.prod(dims, dtype=np.int64)) * tf.as_dtype(slot.dtype).size
        costs.append(total)
    return costs


class OwnedSlot(SlotFace):
    """Checkpoint face of one slot of a variable owned whole by one replica.

    The slot lives only on the owner (`tf_zero.owners`); saving reads it
    there, restoring writes it there. At another replica count the owner
    changes, and the value lands on the new one.

    Args:
        shards: the sharded optimizer state (`partition == "whole"`).
        variable_index: index of the model variable.
        position: the slot's position among that variable's slots.
        slot: the slot variable itself (on its owner).
    """

    def __init__(self, shards, variable_index, position, slot):
        self._shards = shards
        self._index = variable_index
        self._position = position
        self.name = slot.name
        self.shape = tuple(slot.shape)
        self.dtype = tf.as_dtype(slot.dtype)

    def _slot(self):
        owned = self._shards.owners[self._shards.plan.owner(self._index)]
        return owned.slots(self._index)[self._position]

    def value(self) -> tf.Tensor:
        with tf.device("/cpu:0"):
            return tf.identity(self._slot().value)

    def _write(self, value):
        self._slot().assign(tf.cast(value, self.dtype))


def owned_slots(inner, shards, indices=None) -> list:
    """Checkpoint items for the slots of whole variables, in the plain order.

    A plain optimizer built on the model would create its slots variable by
    variable (Lamb, Adafactor and Muon all do), so its order is each
    variable's slots in turn (after every variable's moving average, with
    `use_ema`). That is checked against a plain copy of the
    optimizer built on tiny stand-ins of the same names, paths and ranks.

    Args:
        inner: the optimizer that updates the variables `indices`.
        shards: the sharded state (`partition == "whole"`).
        indices: the variables `inner` updates; default: all of them.

    Raises:
        ValueError: the plain optimizer orders its slots otherwise.
    """
    indices = range(len(shards.variables)) if indices is None else indices
    per_variable = []
    for i in indices:
        if shards.plan.is_split(i):  # spread over several replicas' runs
            first = min((o.runs[i] for o in shards.owners.values() if i in o.runs),
                        key=lambda run: run.start)
            per_variable.append([
                RunSlot(shards, i, position, slot.name,
                        shards.variables[i].shape if len(slot.shape) else (), slot.dtype)
                for position, slot in enumerate(first.slots)])
            continue
        owned = shards.owners[shards.plan.owner(i)]
        per_variable.append([OwnedSlot(shards, i, position, slot)
                             for position, slot in enumerate(owned.slots(i))])
    # With use_ema the base optimizer creates every variable's average first.
    lead = 1 if inner.use_ema else 0
    items = [s for slots in per_variable for s in slots[:lead]]
    items += [s for slots in per_variable for s in slots[lead:]]
    names = [item.name for item in items]
    proxies = []
    for v in (shards.variables[i] for i in indices):
        proxy = keras.Variable(np.zeros((1,) * len(v.shape), np.float32), name=v.name,
                               trainable=False)
        proxies.append(_private.keras_view(_private.tf_variable(proxy), like=v))
    with _private.keras_tracking():
        probe = type(inner).from_config(inner.get_config())
        before = len(probe.variables)
        probe.build(proxies)
    plain = [v.name for v in probe.variables[before:]]
    if plain != names:
        raise ValueError(
            f"{type(inner).__name__} does not create its slots variable by "
            "variable, so tf_zero cannot give its whole-variable checkpoints the "
            "plain optimizer's order. Train it with ZeroOptimizer(partition="
            "'element') if it is element-wise, or unwrapped. "
            f"(plain order {plain[:4]}..., per variable {names[:4]}...)")
    return items
