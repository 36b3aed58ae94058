"""The sharded step: the links in data order, read top to bottom.

One call of `ShardedStep` runs in replica context (inside `strategy.run`)
and moves this replica's gradients through the links of `tf_zero.step`:
flatten (`gradients`), accumulate (`accumulation`, k > 1), reduce-scatter
(`gradients`), unscale, statistics, clip (`statistics`), refresh and update
(`update`; skipped together on a loss-scale overflow, `loss_scale`), publish
(`update`). Every replica launches the same collectives in the same order:
the branches taken (window end, overflow) depend on values all replicas
share. See docs/architecture.md, "One step".
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import collectives
from tf_zero.step import gradients, loss_scale, statistics
from tf_zero.step.update import make_update


class ShardedStep:
    """The sharded step over one `tf_zero.state.shards.Shards` record.

    The variants of its links (element split or whole variables; the
    clipping rule) are chosen here, once.

    Args:
        shards: the optimizer state (plan, shards, slots, model variables).
        inner: the inner Keras optimizer, built on the shards.
        accumulator: a `tf_zero.step.accumulation.Accumulator` when k > 1,
            else None.
    """

    def __init__(self, shards, inner, accumulator=None):
        self.shards = shards
        self.inner = inner
        self.accumulator = accumulator
        self.update = make_update(shards, inner)
        self.clip = statistics.ClipRule.of(shards, inner)

    def __call__(self, grads, variables, loss_scaler=None) -> None:
        """One step (or micro-step) on this replica's gradients.

        Args:
            grads: the local gradients, one per variable (None: no gradient).
            variables: the model variables they belong to.
            loss_scaler: the wrapping `keras.optimizers.LossScaleOptimizer`,
                whose scale the gradients carry, or None.
        """
        with tf.name_scope("zero_flatten"):
            flat, missing = gradients.local_gradients(self.shards, grads, variables)
        if self.accumulator is None:
            with tf.name_scope("zero_reduce"):
                shard_grads = gradients.reduce_to_shards(self.shards, flat)
            self.apply_shards(shard_grads, missing, loss_scaler)
            return
        k = self.accumulator.steps
        self.accumulator.sharded_micro_step(
            self.shards, flat,
            lambda sums: self.apply_shards(sums, missing, loss_scaler, divisor=k))

    def apply_shards(self, shard_grads, missing, loss_scaler=None, divisor=None) -> None:
        """Links 4-8: from summed gradient shards to updated model weights."""
        rank = self.shards.shard_rank(collectives.rank())
        with tf.name_scope("zero_statistics"):
            shard_grads = statistics.unscale(shard_grads, divisor, loss_scaler)
            stats = statistics.gradient_statistics(
                self.shards, shard_grads, rank, check_finite=loss_scaler is not None,
                needs=self.clip.needs)
            shard_grads = self.clip(self.shards, shard_grads, rank, stats)
        with tf.name_scope("zero_refresh"):
            self.update.refresh(rank)

        def apply():
            with tf.name_scope("zero_update"):
                self.update.update(shard_grads, missing, rank)
            if loss_scaler is not None:
                loss_scale.after_finite_step(loss_scaler)
            return tf.constant(True)

        if loss_scaler is None:
            apply()
        else:
            def skip():
                loss_scale.after_overflow(loss_scaler)
                return tf.constant(False)
            # Identical on every replica (all-reduced), so every replica takes
            # the same branch; neither branch communicates.
            tf.cond(stats["finite"], apply, skip)
        with tf.name_scope("zero_publish"):
            self.update.publish(missing)
