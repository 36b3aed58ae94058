"""The whole-variable partition's state: each variable's optimizer on its owner.

Lamb's trust ratio, Adafactor's factored moments and Muon's
orthogonalization need a variable's whole tensor. Under `plan_owners` every
variable belongs whole to one replica; that replica alone keeps the
variable's optimizer state and runs the inner optimizer's own `update_step`
on it, on its local copy of the weight (every replica still holds the full
weights at stages 1 and 2; the owner's copy is the one updated, then
published by the all-gather).

Each owned variable gets an optimizer of its own, a copy of the inner
optimizer from its config that counts steps in the inner optimizer's
`iterations`, built on a view of the owner's copy of the weight (same name
and path as the model's variable, so slot names and Muon's path rules are
the plain optimizer's). Its slots are plain variables on the owner's device:
no other replica holds them.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tf_zero import _private


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
    """

    rank: int
    device: str
    views: dict
    optimizers: dict
    slot_lists: dict

    def slots(self, index: int) -> list:
        """The optimizer state of variable `index`, in its creation order."""
        return self.slot_lists[index]


def build_owned(inner, variables, plan, strategy) -> dict:
    """{rank: OwnedVariables} for the replicas of this worker.

    Runs in cross-replica context under `strategy.scope()`.
    """
    ranks = _private.local_replica_ranks(strategy)
    owned = {}
    iterations = _private.iterations_variable(inner)
    for local, rank in enumerate(ranks):
        device = strategy.extended.worker_devices[local]
        views, optimizers, slot_lists = {}, {}, {}
        for i, var in enumerate(variables):
            if plan.owner(i) != rank:
                continue
            component = _private.components(var)[local]
            views[i] = _private.keras_view(component, like=var)
            with _private.keras_tracking():
                opt = type(inner).from_config(inner.get_config())
                _private.share_iterations(opt, iterations)
                _private.mark_local_update(opt)
                _private.detach_from_strategy(opt)
                before = len(opt.variables)
                with tf.variable_creator_scope(_private.local_variable_creator(device)):
                    opt.build([views[i]])
            optimizers[i] = opt
            slot_lists[i] = opt.variables[before:]
        owned[rank] = OwnedVariables(rank, device, views, optimizers, slot_lists)
    return owned
