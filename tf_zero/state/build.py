"""The one build path of a `ZeroOptimizer`: `build_state`.

Called by `ZeroOptimizer.build` under the strategy's scope, eagerly: checks
what the configuration needs, builds the sharded state (`shards.py`), the
accumulator, the checkpoint face and the step on them, and gives every buffer
the step writes one of its own. Without a distribution strategy the inner
optimizer is built on the model as it would be unwrapped.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tf_zero import _private
from tf_zero.config import Partition, ZeroConfig
from tf_zero.state import admission
from tf_zero.state.partition import all_optimizers, variable_optimizers
from tf_zero.state.shards import Shards, build_shards, inner_in_scope, per_replica_creator
from tf_zero.step.accumulation import Accumulator
from tf_zero.step.chain import ShardedStep


@dataclasses.dataclass(frozen=True, eq=False)
class State:
    """What `build_state` built.

    Attributes:
        inner: the inner optimizer (re-created under the scope if needed).
        config: the resolved configuration.
        model_variables: the trainable float variables it updates.
        accumulator: the `Accumulator` (k > 1), else None.
        shards: the sharded state, or None where nothing is sharded.
        step: the `ShardedStep` over `shards`, or None.
    """

    inner: object
    config: ZeroConfig
    model_variables: tuple
    accumulator: Accumulator | None = None
    shards: Shards | None = None
    step: ShardedStep | None = None


def resolve_config(requested: dict, strategy) -> ZeroConfig:
    """The strategy's `ZeroConfig` (stage 1 under a plain strategy) with the
    optimizer's own settings over it."""
    base = getattr(strategy, "zero_config", None) or ZeroConfig(stage=1)
    return base.override(**requested)


def build_state(inner, var_list, requested: dict, partition: Partition,
                accumulation_steps: int, face) -> State:
    """Builds the state a `ZeroOptimizer` trains `var_list` with.

    Args:
        inner: the inner Keras optimizer.
        var_list: the variables given to `build`.
        requested: the optimizer's own `ZeroConfig` settings (None: the strategy's).
        partition: the partition chosen for `inner`.
        accumulation_steps: micro-batches per update.
        face: the optimizer's `tf_zero.checkpoint.optimizer_state.CheckpointFace`,
            filled here.

    Raises:
        ValueError: what the configuration cannot train (stage 3 without
            sharded weights, the whole partition at stage 3, ...); named.
    """
    strategy = tf.distribute.get_strategy()
    config = resolve_config(requested, strategy).override(partition=partition)
    variables = tuple(v for v in var_list
                      if v.trainable and keras.backend.is_float_dtype(v.dtype))
    accumulator = Accumulator(accumulation_steps) if accumulation_steps > 1 else None
    if not tf.distribute.has_strategy() or isinstance(strategy, tf.distribute.OneDeviceStrategy):
        with _private.keras_tracking():  # as the plain optimizer would build
            inner.build(var_list)
        face.add_unsharded(inner, var_list)
        if accumulator:
            accumulator.build_unsharded(variables)
        return State(inner, config, variables, accumulator)
    admission.check_created_before_the_step(variables)
    inner = inner_in_scope(inner, strategy)
    optimizers = None
    if partition == Partition.WHOLE:
        optimizers = variable_optimizers(inner, variables)  # once: a map may create them
        admission.check_whole_partition(inner, config, variables, optimizers)
    admission.check_stage3(config, strategy, variables, all_optimizers(inner))
    admission.check_quantization(config, partition, variables)
    shards = build_shards(inner, variables, strategy, config.bucket_size_bytes,
                          config.reduce_dtype, partition=partition, optimizers=optimizers,
                          shard_group_size=config.shard_group_size,
                          gradient_quantization=config.gradient_quantization)
    face.add_sharded(inner, shards)
    if accumulator:
        with tf.variable_creator_scope(per_replica_creator):
            accumulator.build_sharded(shards, config.stage)
    step = ShardedStep(shards, inner, accumulator)
    # Every buffer the step writes, allocated now rather than by the first
    # step's copy-on-write among its temporaries.
    _private.own_buffers([
        *variables, *shards.storage, *(accumulator.buffers if accumulator else ()),
        *(v for opt in all_optimizers(inner) for v in opt.variables)])
    return State(inner, config, variables, accumulator, shards, step)
