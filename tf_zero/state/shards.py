"""The sharded optimizer state (`Shards`): shard variables and their slots.

`build_shards` plans the model's trainable variables (`tf_zero.plan`),
creates for every bucket a flat per-replica shard variable filled from the
model's weights, and builds the inner optimizer on those shards, so each slot
exists only for the replica's slice. A stage-3 weight's storage is its
bucket's shard ("stored": nothing is copied for it). Under the whole-variable
partition each variable's optimizer lives on its owner instead
(`tf_zero.state.owners`). Read this file first; docs/architecture.md says why.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.config import Partition
from tf_zero.plan.element import fills_a_bucket, plan_shards
from tf_zero.plan.layout import Bucket, ShardPlan
from tf_zero.plan.whole import plan_owners
from tf_zero.state.owners import build_owned, plain_slot_specs, state_bytes
from tf_zero.state.partition import all_optimizers, split_variables, variable_optimizers


@dataclasses.dataclass(frozen=True, eq=False)
class Shards:
    """The state of a sharded optimizer, read by every part of the step.

    Attributes:
        plan: the shard plan of `variables`.
        variables: the model's trainable float variables, in plan order.
        storage: per bucket, the flat sync-on-read shard variable (one
            component of `bucket.shard_size` elements per local replica).
        slots: per bucket, the inner optimizer's slots of that shard.
        stored: indices of the buckets whose shard is a weight's own float32
            master (`tf_zero.weights`: a stage-3 weight, whose gradient
            arrives reduced and which is never all-gathered, or a working
            weight): updated in place.
        working: the stored buckets of working weights: published into the
            16-bit working copy, cast before the all-gather.
        strategy: the strategy the state lives on.
        reduce_dtype: dtype of the reduce-scatter, or None (the bucket's).
        owners: whole-variable partition only: {global rank:
            `tf_zero.owners.OwnedVariables`}, for this worker's replicas
            (under hybrid sharding, replica `r` owns what shard `r % K` owns).
        optimizers: whole-variable partition only: per variable, the
            optimizer whose math and settings update it (the inner
            optimizer, or the one a MultiOptimizer picks).
        slot_specs: whole-variable partition only: per variable, the name,
            shape and dtype of each slot its optimizer keeps for it, known on
            every worker (`tf_zero.owners.plain_slot_specs`).
        groups: hybrid sharding only: (shard group, replica group), the
            `tf_zero.collectives.Subgroup`s the step's collectives span: the
            plan has one shard per member of a shard group, and replica `r`
            holds shard `r % K`.
        gradient_quantization: the `tf_zero.config.BlockQuantization` the
            reduce-scatter sends (None: full precision).
    """

    plan: ShardPlan
    variables: tuple
    storage: tuple
    slots: tuple
    stored: frozenset
    strategy: object
    reduce_dtype: str | None = None
    working: frozenset = frozenset()
    owners: dict = dataclasses.field(default_factory=dict)
    optimizers: tuple = ()
    slot_specs: tuple = ()
    groups: tuple | None = None
    gradient_quantization: object = None

    @property
    def shard_group(self):
        """The `Subgroup` a reduce-scatter, publish or statistic spans (None:
        every replica)."""
        return self.groups[0] if self.groups else None

    @property
    def replica_group(self):
        """Hybrid sharding: the `Subgroup` across which shards are all-reduced."""
        return self.groups[1] if self.groups else None

    def shard_rank(self, rank: int) -> int:
        """The shard global replica `rank` holds."""
        return rank % self.groups[0].group_size if self.groups else rank

    @property
    def whole(self) -> bool:
        """Whether variables are owned whole (else split element-wise)."""
        return self.plan.partition == Partition.WHOLE

    @property
    def stored_variables(self) -> frozenset:
        """Indices of the stage-3 weights (each stored in one bucket's shards)."""
        return frozenset(self.plan.buckets[b].segments[0].variable for b in self.stored)

    def is_stored(self, bucket: Bucket) -> bool:
        """Whether `bucket`'s shard is a weight's own float32 master."""
        return bucket.index in self.stored

    def arrives_reduced(self, bucket: Bucket) -> bool:
        """Whether `bucket`'s gradient arrives reduced (a stage-3 weight's)."""
        return bucket.index in self.stored and bucket.index not in self.working

    def working_storage(self, bucket: Bucket):
        """The `WorkingVariable` whose master is `bucket`'s shard, or None."""
        if bucket.index not in self.working:
            return None
        return _private.sharded_storage(self.variables[bucket.segments[0].variable])

    def local_owned(self):
        """This replica's `OwnedVariables` (whole partition; replica context)."""
        return self.owners[collectives.rank()]

    def read_weight_shard(self, bucket: Bucket, rank: int, runs=None) -> tf.Tensor:
        """Shard `rank` of a bucket, read from the model's weights; a split
        variable's run from `runs` (this replica's updated copies of its runs,
        whole partition)."""
        parts = []
        pieces = bucket.shard_pieces(rank)
        runs = runs or {}
        for p in pieces:
            if p.variable in runs:
                run = runs[p.variable]
                lo = p.start - run.start
                parts.append(run.weight.value[lo:lo + p.size])
                continue
            value = _read(self.variables[p.variable])
            parts.append(tf.reshape(value, [-1])[p.start:p.start + p.size])
        return collectives.pad(collectives.join(parts), bucket.shard_size) if parts else \
            tf.zeros([bucket.shard_size], bucket.dtype)


def build_shards(inner, variables, strategy, bucket_size_bytes, reduce_dtype=None,
                 partition=Partition.ELEMENT, optimizers=None, shard_group_size=None,
                 gradient_quantization=None) -> Shards:
    """Plans `variables`, creates their shards and builds `inner` on them.

    Runs in cross-replica context under `strategy.scope()`. With
    `Partition.WHOLE`, plans owners instead and builds each variable's
    optimizer on its owner (`tf_zero.state.owners`): `optimizers`, per
    variable (default: `variable_optimizers`, which a MultiOptimizer's map may
    answer with new optimizers at every call).

    With `shard_group_size` K (hybrid sharding), plans K shards (or K
    owners): the replicas of each group of K hold one copy of the state.
    `gradient_quantization` (a `BlockQuantization`, element partition): how
    the buckets' gradients travel.

    Raises:
        ValueError: the inner optimizer creates a variable that is not an
            element-wise slot of a shard (it is not element-wise).
    """
    n = strategy.num_replicas_in_sync
    groups = None
    if shard_group_size is not None:
        groups = collectives.shard_groups(strategy, shard_group_size)
        n = shard_group_size
    dtypes = [keras.backend.standardize_dtype(v.dtype) for v in variables]
    if partition == Partition.WHOLE:
        if optimizers is None:
            optimizers = variable_optimizers(inner, variables)
        specs = plain_slot_specs(optimizers, variables)
        plan = plan_owners([tuple(v.shape) for v in variables], dtypes, n, bucket_size_bytes,
                           costs=state_bytes(specs),
                           split=split_variables(inner, optimizers, variables))
        return Shards(plan=plan, variables=tuple(variables), storage=(), slots=(),
                      stored=frozenset(), strategy=strategy, reduce_dtype=reduce_dtype,
                      owners=build_owned(optimizers, variables, plan, strategy, specs,
                                         shard_group_size),
                      optimizers=optimizers, slot_specs=specs, groups=groups)
    stored = [_private.sharded_storage(v) is not None for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    # A stage-3 weight is its bucket's storage; any variable at least a bucket
    # large is published without a copy from a bucket of its own.
    alone = [o or fills_a_bucket(shape, dtype, bucket_size_bytes)
             for o, shape, dtype in zip(stored, shapes, dtypes)]
    plan = plan_shards(shapes, dtypes, n, bucket_size_bytes, alone=alone)
    stored_buckets = frozenset(
        b.index for b in plan.buckets if stored[b.segments[0].variable])
    working_buckets = frozenset(
        b for b in stored_buckets
        if not _private.is_sharded(variables[plan.buckets[b].segments[0].variable]))
    storage = []
    for bucket in plan.buckets:
        name = f"zero_shard_{bucket.index}"
        if bucket.index in stored_buckets:
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
                    stored=stored_buckets, working=working_buckets, strategy=strategy,
                    reduce_dtype=reduce_dtype, groups=groups,
                    gradient_quantization=gradient_quantization)
    _fill_from_model(shards)
    before = len(inner.variables)
    _private.mark_local_update(inner)
    with tf.variable_creator_scope(per_replica_creator):
        inner.build(storage)
    slots = _match_slots(inner, storage, inner.variables[before:])
    # Such slots start from the weight, which the shards did not hold yet when
    # build() ran on all replicas at once.
    for name in _private.slots_initialized_from_variable(inner):
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
        if shards.is_stored(bucket):
            continue
        for rank, comp in zip(ranks, _private.components(shard)):
            parts = []
            for p in bucket.shard_pieces(shards.shard_rank(rank)):
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
    prefixes = [(i, _private.slot_prefix(s)) for i, s in enumerate(storage)]
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
