"""The sharded step, as a chain of named parts.

One call of `ShardedStep` runs in replica context (inside `strategy.run`)
and moves every gradient through these links, in this order:

1. `gradients.local_gradients`: flat, dense local gradients, lengths from the
   variables; the variables without one are "missing" (frozen this step).
2. `accumulation.Accumulator` (k > 1 only): adds the micro-step to a window;
   only every k-th call goes on, with the window's sum.
3. `gradients.reduce_to_shards`: one reduce-scatter per bucket; each replica
   now holds the summed gradient of its 1/N slice (stage-3 weights arrive
   reduced already).
4. `statistics.unscale`: divides by k and by the dynamic loss scale.
5. `statistics.gradient_statistics`: one small all-reduce for what needs the
   whole gradient (finite?, norms), identical on every replica.
6. `statistics.clip`: Keras' clipping, on the reduced gradient.
7. `update.refresh_weight_shards`, `update.update_shards`: the inner
   optimizer's own `update_step` on the shards (weight decay, frozen pieces
   kept) — skipped by every replica together on a loss-scale overflow.
8. `update.publish`: all-gather into the model's weights, then constraints.

Every part reads the same state record (`tf_zero.shards.Shards`); none calls
back into the optimizer. Every replica launches the same collectives in the
same order: the branches taken (window end, overflow) are decided by values
all replicas share.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import collectives, gradients, loss_scale, statistics, update
from tf_zero.accumulation import Accumulator
from tf_zero.shards import Shards


class ShardedStep:
    """The sharded step over one `Shards` record.

    Args:
        shards: the optimizer state (plan, shards, slots, model variables).
        inner: the inner Keras optimizer, built on the shards.
        accumulator: an `Accumulator` when k > 1, else None.
    """

    def __init__(self, shards: Shards, inner, accumulator: Accumulator | None = None):
        self.shards = shards
        self.inner = inner
        self.accumulator = accumulator

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
        shards, inner = self.shards, self.inner
        rank = collectives.rank()
        with tf.name_scope("zero_statistics"):
            shard_grads = statistics.unscale(shard_grads, divisor, loss_scaler)
            stats = statistics.gradient_statistics(shards, inner, shard_grads, rank,
                                                   check_finite=loss_scaler is not None)
            shard_grads = statistics.clip(shards, inner, shard_grads, rank, stats)
        with tf.name_scope("zero_refresh"):
            update.refresh_weight_shards(shards, rank)

        def apply():
            with tf.name_scope("zero_update"):
                update.update_shards(shards, inner, shard_grads, missing, rank)
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
            update.publish(shards, missing)
