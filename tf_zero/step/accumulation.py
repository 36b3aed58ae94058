"""Link 2 of the step: k-step gradient accumulation, correct under distribution.

`GradientAccumulationOptimizer(inner, steps=k)` applies, every k-th call,
the mean gradient of the last k micro-batches. The `Accumulator` keeps a
full-size local sum at stage 1 (no communication until the window ends) and
a reduce-scattered shard sum at stage 2 (and for stage-3 weights); the
window's branch is decided by a counter every replica advances alike. The
semantics (what `iterations` counts, windows across epochs, loss scaling,
checkpoints) are stated in docs/accumulation.md.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_zero import _private
from tf_zero.step import gradients


class Accumulator:
    """Buffers and a micro-step counter: k calls make one update.

    Args:
        steps: micro-batches per update (k > 1).
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.buffers = ()
        self.micro_step = None
        self._local_sums = False

    def build_sharded(self, shards, stage: int) -> None:
        """Per-replica buffers: full buckets at stage 1, shards otherwise.

        Call under `tf_zero.state.shards.per_replica_creator`.
        """
        self._local_sums = stage == 1
        self.micro_step = self._counter()
        self.buffers = tuple(keras.Variable(
            initializer="zeros", trainable=False, dtype=b.dtype,
            shape=(b.padded_size if self._local_sums and not shards.arrives_reduced(b)
                   else b.shard_size,),
            name=f"zero_grad_buffer_{b.index}",
            synchronization="on_read", aggregation="only_first_replica")
            for b in shards.plan.buckets)

    def build_unsharded(self, variables) -> None:
        """One full-size buffer per variable (no strategy)."""
        self.micro_step = self._counter()
        self.buffers = tuple(keras.Variable(
            initializer="zeros", shape=v.shape, dtype=v.dtype, trainable=False,
            name=f"grad_buffer_{v.path.replace('/', '_')}") for v in variables)

    @staticmethod
    def _counter():
        return keras.Variable(0, dtype="int64", trainable=False, name="micro_step",
                              synchronization="on_read", aggregation="only_first_replica")

    def unsharded_bytes(self, plan) -> int:
        """Bytes of accumulators an unsharded optimizer keeps per replica."""
        return sum(b.size * tf.as_dtype(b.dtype).size for b in plan.buckets)

    def sharded_micro_step(self, shards, flat_grads, finish) -> None:
        """Adds one micro-step; every k-th calls `finish(summed shard gradients)`."""
        if self._local_sums:
            # Local full-size sums; the window's only reduce-scatter is at its end.
            contributions = gradients.local_buckets(shards, flat_grads)

            def reduce_and_finish(sums):
                with tf.name_scope("zero_reduce"):
                    shard_sums = gradients.scatter_buckets(shards, sums)
                finish(shard_sums)

            self._window([_private.local_component(b) for b in self.buffers], contributions,
                         reduce_and_finish)
        else:
            # Reduce-scatter now; only this replica's shard is kept.
            with tf.name_scope("zero_reduce"):
                contributions = gradients.reduce_to_shards(shards, flat_grads)
            self._window([_private.local_component(b) for b in self.buffers], contributions,
                         finish)

    def unsharded_micro_step(self, grads, variables, all_variables, apply) -> None:
        """One micro-step without a strategy; every k-th `apply`s the means."""
        index_of = {id(v): i for i, v in enumerate(all_variables)}
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None and id(v) in index_of]
        buffers = [_private.local_component(self.buffers[index_of[id(v)]]) for _, v in pairs]
        k = self.steps
        self._window(buffers, [tf.convert_to_tensor(g) for g, _ in pairs],
                     lambda sums: apply([s / k for s in sums], [v for _, v in pairs]))

    def _window(self, buffers, contributions, finish) -> None:
        """Adds `contributions` to `buffers`; every k-th call `finish`es instead.

        `finish` receives buffer + contribution sums (the buffers are
        emptied). The predicate comes from a counter every replica advances
        alike, so all replicas take the same branch and launch the same
        collectives.
        """
        counter = _private.local_component(self.micro_step)
        step = counter.read_value()
        is_last = tf.equal((step + 1) % self.steps, 0)

        def last():
            sums = [buf.read_value() + c for buf, c in zip(buffers, contributions)]
            for buf in buffers:
                buf.assign(tf.zeros_like(buf))
            finish(sums)
            return tf.constant(0)

        def accumulate():
            for buf, c in zip(buffers, contributions):
                buf.assign_add(c)
            return tf.constant(0)

        tf.cond(is_last, last, accumulate)
        counter.assign_add(1)
