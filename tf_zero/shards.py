"""The sharded optimizer state: shard variables and their slots, per replica.

`build_shards` turns a model's trainable variables into the state record the
sharded step reads and writes (`Shards`). It computes the plan
(`tf_zero.plan.plan_shards`), creates for every bucket a flat shard variable
with one component per local replica (the replica's slice of the bucket,
filled from the model's weights), and builds the inner optimizer on those
shards, so every slot it creates has the shard's shape and exists only for
the slice. A stage-3 weight is a bucket of its own whose shard is the
weight's storage: nothing is copied for it. Any variable at least a bucket
large is a bucket of its own too (`plan.fills_a_bucket`), so that its
gradient and its gathered weight need no copy into or out of a bucket.

Under the whole-variable partition (`plan_owners`, for optimizers that need
whole tensors) there are no shard variables: each variable's optimizer lives
on the replica that owns it (`tf_zero.owners`).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.owners import build_owned, plain_slot_specs, state_bytes
from tf_zero.plan import Bucket, ShardPlan, fills_a_bucket, plan_owners, plan_shards
from tf_zero.sharded_variable import is_sharded
from tf_zero.support import all_optimizers, split_variables, variable_optimizers

# Optimizers whose build() initializes a slot from the variable's value; the
# shards do not hold their values yet when build() runs on all replicas at once.
_SLOTS_INITIALIZED_FROM_VARIABLE = {"ScheduleFreeAdamW": ("momentum",)}


@dataclasses.dataclass(frozen=True, eq=False)
class Shards:
    """The state of a sharded optimizer, read by every part of the step.

    Attributes:
        plan: the shard plan of `variables`.
        variables: the model's trainable float variables, in plan order.
        storage: per bucket, the flat sync-on-read shard variable (one
            component of `bucket.shard_size` elements per local replica).
        slots: per bucket, the inner optimizer's slots of that shard.
        owned: indices of the buckets whose shard is a stage-3 weight's
            storage (updated in place, never all-gathered).
        strategy: the strategy the state lives on.
        reduce_dtype: dtype of the reduce-scatter, or None (the bucket's).
        owners: whole-variable partition only: {local rank:
            `tf_zero.owners.OwnedVariables`}, for this worker's replicas.
        optimizers: whole-variable partition only: per variable, the
            optimizer whose math and settings update it (the inner
            optimizer, or the one a MultiOptimizer picks).
        slot_specs: whole-variable partition only: per variable, the name,
            shape and dtype of each slot its optimizer keeps for it, known on
            every worker (`tf_zero.owners.plain_slot_specs`).
    """

    plan: ShardPlan
    variables: tuple
    storage: tuple
    slots: tuple
    owned: frozenset
    strategy: object
    reduce_dtype: str | None = None
    owners: dict = dataclasses.field(default_factory=dict)
    optimizers: tuple = ()
    slot_specs: tuple = ()

    @property
    def whole(self) -> bool:
        """Whether variables are owned whole (else split element-wise)."""
        return self.plan.partition == "whole"

    @property
    def owned_variables(self) -> frozenset:
        """Indices of the stage-3 weights (each owns one bucket)."""
        return frozenset(self.plan.buckets[b].segments[0].variable for b in self.owned)

    def is_owned(self, bucket: Bucket) -> bool:
        return bucket.index in self.owned

    def read_weight_shard(self, bucket: Bucket, rank: int) -> tf.Tensor:
        """Replica `rank`'s slice of a bucket, read from the model's weights
        (a split variable's run: from the replica's updated copy of it)."""
        parts = []
        pieces = bucket.shard_pieces(rank)
        runs = self.owners[rank].runs if self.owners else {}
        for p in pieces:
            if p.variable in runs:
                run = runs[p.variable]
                lo = p.start - run.start
                parts.append(run.weight.value[lo:lo + p.size])
                continue
            value = _read(self.variables[p.variable])
            parts.append(tf.reshape(value, [-1])[p.start:p.start + p.size])
        covered = sum(p.size for p in pieces)
        if covered < bucket.shard_size:
            parts.append(tf.zeros([bucket.shard_size - covered], bucket.dtype))
        return tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]


def shard_mask(bucket: Bucket, pieces, predicate) -> tf.Tensor:
    """A boolean mask over a shard: True on the pieces `predicate` selects."""
    mask = np.zeros([bucket.shard_size], dtype=bool)
    for p in pieces:
        if predicate(p):
            mask[p.offset:p.offset + p.size] = True
    return tf.constant(mask)


def build_shards(inner, variables, strategy, bucket_size_bytes, reduce_dtype=None,
                 partition="element") -> Shards:
    """Plans `variables`, creates their shards and builds `inner` on them.

    Runs in cross-replica context under `strategy.scope()`. With
    `partition="whole"`, plans owners instead and builds each variable's
    optimizer on its owner (`tf_zero.owners`).

    Raises:
        ValueError: the inner optimizer creates a variable that is not an
            element-wise slot of a shard (it is not element-wise).
    """
    n = strategy.num_replicas_in_sync
    dtypes = [keras.backend.standardize_dtype(v.dtype) for v in variables]
    if partition == "whole":
        optimizers = variable_optimizers(inner, variables)
        specs = plain_slot_specs(optimizers, variables)
        plan = plan_owners([tuple(v.shape) for v in variables], dtypes, n, bucket_size_bytes,
                           costs=state_bytes(specs),
                           split=split_variables(inner, optimizers, variables))
        return Shards(plan=plan, variables=tuple(variables), storage=(), slots=(),
                      owned=frozenset(), strategy=strategy, reduce_dtype=reduce_dtype,
                      owners=build_owned(optimizers, variables, plan, strategy, specs),
                      optimizers=optimizers, slot_specs=specs)
    owned = [is_sharded(v) for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    # A stage-3 weight is its bucket's storage; any variable at least a bucket
    # large is published without a copy from a bucket of its own.
    alone = [o or fills_a_bucket(shape, dtype, bucket_size_bytes)
             for o, shape, dtype in zip(owned, shapes, dtypes)]
    plan = plan_shards(shapes, dtypes, n, bucket_size_bytes, alone=alone)
    owned_buckets = frozenset(
        b.index for b in plan.buckets if owned[b.segments[0].variable])
    storage = []
    for bucket in plan.buckets:
        name = f"zero_shard_{bucket.index}"
        if bucket.index in owned_buckets:
            # A stage-3 weight: its storage already is this bucket's shard.
            shard = _private.sharded_storage(variables[bucket.segments[0].variable]).shard
            storage.append(_private.keras_view(
                shard, name=name, synchronization="on_read", aggregation="only_first_replica"))
            continue
        storage.append(keras.Variable(
            initializer="zeros", shape=(bucket.shard_size,),
            dtype=bucket.dtype, trainable=False, name=name,
            synchronization="on_read", aggregation="only_first_replica"))
    shards = Shards(plan=plan, variables=tuple(variables), storage=tuple(storage), slots=(),
                    owned=owned_buckets, strategy=strategy, reduce_dtype=reduce_dtype)
    _fill_from_model(shards)
    before = len(inner.variables)
    _private.mark_local_update(inner)
    with tf.variable_creator_scope(per_replica_creator):
        inner.build(storage)
    slots = _match_slots(inner, storage, inner.variables[before:])
    for name in _SLOTS_INITIALIZED_FROM_VARIABLE.get(type(inner).__name__, ()):
        for shard, bucket_slots in zip(storage, slots):
            for slot in bucket_slots:
                if slot.name.endswith("_" + name):
                    for src, dst in zip(_private.components(shard), _private.components(slot)):
                        dst.assign(src)
    return dataclasses.replace(shards, slots=tuple(tuple(s) for s in slots))


def inner_in_scope(inner, strategy):
    """The inner optimizer with its own variables owned by `strategy`.

    Raises:
        ValueError: the inner optimizer already holds slots created outside
            the strategy's scope.
    """
    if all(strategy.extended.variable_created_in_scope(_private.tf_variable(o.iterations))
           for o in all_optimizers(inner)):
        return inner
    if inner.built and inner.variables[2:]:
        raise ValueError(
            f"The inner optimizer {inner.name} already holds state created "
            "outside strategy.scope(). Create it inside the scope, or pass a "
            "fresh optimizer: ZeroOptimizer(keras.optimizers.Adam(...)).")
    count = int(inner.iterations.numpy())
    try:
        fresh = type(inner).from_config(inner.get_config())
    except Exception as error:  # e.g. a MultiOptimizer over a plain function
        raise ValueError(
            f"The inner optimizer {inner.name} (or an optimizer it holds) was "
            "created outside strategy.scope(), and it cannot be re-created from "
            f"its config ({error}). Create it, and every optimizer it holds, "
            "inside strategy.scope().") from error
    fresh.iterations.assign(count)
    return fresh


def per_replica_creator(next_creator, **kwargs):
    """Variable creator for state that differs on every replica.

    Slots and buffers of a shard hold different values on every replica:
    sync-on-read, so replica-context writes land on the local copy only.
    """
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    kwargs["trainable"] = False
    return next_creator(**kwargs)


def _read(variable):
    # A Keras variable's value, or a raw tf.Variable's (Keras accepts both).
    return variable.value if isinstance(variable, keras.Variable) else variable.read_value()


def _fill_from_model(shards: Shards) -> None:
    """Writes each local replica's weight slice into its shard components."""
    ranks = _private.local_replica_ranks(shards.strategy)
    flat = {}
    for bucket, shard in zip(shards.plan.buckets, shards.storage):
        if shards.is_owned(bucket):
            continue
        for rank, comp in zip(ranks, _private.components(shard)):
            parts = []
            for p in bucket.shard_pieces(rank):
                if p.variable not in flat:
                    value = shards.variables[p.variable].numpy()
                    flat[p.variable] = np.asarray(value).reshape(-1)
                parts.append(flat[p.variable][p.start:p.start + p.size])
            values = np.zeros([bucket.shard_size], dtype=comp.dtype.as_numpy_dtype)
            if parts:
                joined = np.concatenate(parts)
                values[:joined.size] = joined
            comp.assign(values)


def _match_slots(inner, storage, slots):
    """Groups the inner optimizer's new variables by the shard they belong to.

    Keras names a slot `{reference.path with '/' -> '_'}_{slot name}`. A slot
    that matches no shard by name and shape means the optimizer is not
    element-wise: refuse it rather than mis-shard it.
    """
    by_bucket = [[] for _ in storage]
    prefixes = [(i, s.path.replace("/", "_") + "_") for i, s in enumerate(storage)]
    prefixes.sort(key=lambda p: -len(p[1]))
    for slot in slots:
        for i, prefix in prefixes:
            if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(storage[i].shape):
                by_bucket[i].append(slot)
                break
        else:
            raise ValueError(
                f"{type(inner).__name__} created the variable {slot.name} of shape "
                f"{tuple(slot.shape)}, which is not an element-wise slot of a "
                "shard; tf_zero cannot shard this optimizer. Train it unwrapped.")
    return by_bucket
