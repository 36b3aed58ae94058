"""Gradient accumulation that is correct under distribution.

`GradientAccumulationOptimizer(inner, steps=k)` applies, every k-th call, the
mean gradient of the last k micro-batches; the other calls only accumulate.
It is a `ZeroOptimizer` with `accumulation_steps=k`, so where the buffers live
and when gradients travel depends on the ZeRO stage:

* stage 1: each replica adds its local gradient to a full-size local buffer
  and communicates nothing; the k-th micro-step reduce-scatters the buffer
  once, updates the shards and all-gathers the weights.
* stage 2: every micro-step reduce-scatters its gradient and adds the shard to
  a shard-size buffer (1/N of stage 1's); the k-th micro-step updates and
  all-gathers.
* no strategy: full-size buffers and the inner optimizer's own `apply`.

Semantics, stated once:

* `optimizer.iterations` counts updates (one per window of k micro-steps), as
  if each window were one large batch. Adam's bias correction and learning
  rate schedules therefore match training on batches k times larger. (Keras'
  own `gradient_accumulation_steps` counts micro-steps instead, and fails to
  trace under `MirroredStrategy`, keras-team/keras#20582.)
* A window is k calls; it does not restart at an epoch boundary. An epoch that
  ends mid-window carries its partial sum into the next epoch.
* Under `mixed_float16` the scale only changes at window boundaries. An
  overflow in any micro-step of a window, on any replica, skips that window's
  update on every replica, halves the scale and empties the buffers;
  `iterations` does not advance.
* Checkpoints hold the optimizer state between windows; the partial sum of
  an unfinished window is not saved (save at window boundaries, e.g. with
  `steps_per_epoch` a multiple of k).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.optimizer import ZeroOptimizer


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(
            f"steps must be a positive int (micro-batches per update), got {steps!r}.")
    return int(steps)


@keras.saving.register_keras_serializable(package="tf_zero")
class GradientAccumulationOptimizer(ZeroOptimizer):
    """Applies the mean gradient of every `steps` micro-batches.

    Wraps a plain Keras optimizer or a `ZeroOptimizer` (whose stage and bucket
    size it keeps); `ZeroOptimizer(GradientAccumulationOptimizer(...))` gives
    the same optimizer. See the module docstring for the exact semantics.

    Args:
        inner_optimizer: a Keras optimizer or a `ZeroOptimizer`.
        steps: micro-batches per update (k).
        stage, bucket_size_bytes, reduce_dtype, name: as for `ZeroOptimizer`.

    Raises:
        ValueError: `steps` is not a positive int, or the inner optimizer
            already accumulates.

    Example:
        >>> opt = tf_zero.GradientAccumulationOptimizer(  # doctest: +SKIP
        ...     keras.optimizers.Adam(1e-3), steps=4)
    """

    _wrappable = True

    def __init__(self, inner_optimizer, steps=None, *, stage=None, bucket_size_bytes=None,
                 reduce_dtype=None, name=None, accumulation_steps=None, **kwargs):
        steps = _check_steps(steps if steps is not None else accumulation_steps)
        if isinstance(inner_optimizer, ZeroOptimizer):
            if inner_optimizer._accumulation_steps > 1:
                raise ValueError(
                    "The inner optimizer already accumulates gradients; wrap the "
                    "plain optimizer once: GradientAccumulationOptimizer(Adam(), steps=k).")
            inner_optimizer, stage, bucket_size_bytes, reduce_dtype = inner_optimizer._merged(
                stage, bucket_size_bytes, reduce_dtype)
        super().__init__(inner_optimizer, stage=stage, bucket_size_bytes=bucket_size_bytes,
                         reduce_dtype=reduce_dtype, accumulation_steps=steps,
                         name=name or f"accumulate_{inner_optimizer.name}", **kwargs)

    @property
    def steps(self) -> int:
        return self._accumulation_steps

    def get_config(self):
        config = super().get_config()
        config["steps"] = config.pop("accumulation_steps")
        return config


def build_buffers(optimizer) -> None:
    """Creates the accumulation buffers and the micro-step counter."""
    k = optimizer._accumulation_steps
    if k <= 1:
        return
    optimizer._micro_step = keras.Variable(
        0, dtype="int64", trainable=False, name="micro_step",
        synchronization="on_read", aggregation="only_first_replica")
    buffers = []
    if optimizer.is_sharded:
        stage = optimizer.zero_config.stage
        for bucket in optimizer.plan.buckets:
            owned = bucket.index in optimizer._owned_buckets
            size = bucket.padded_size if stage == 1 and not owned else bucket.shard_size
            buffers.append(keras.Variable(
                initializer="zeros", shape=(size,), dtype=bucket.dtype, trainable=False,
                name=f"zero_grad_buffer_{bucket.index}",
                synchronization="on_read", aggregation="only_first_replica"))
    else:
        for v in optimizer._model_variables:
            buffers.append(keras.Variable(
                initializer="zeros", shape=v.shape, dtype=v.dtype, trainable=False,
                name=f"grad_buffer_{v.path.replace('/', '_')}"))
    optimizer._gradient_buffers = buffers


def _window_step(optimizer, buffers, contributions, finish) -> None:
    """Adds `contributions` to `buffers`; every k-th call `finish`es instead.

    `finish` receives buffer + contribution sums (the buffers are emptied).
    The predicate comes from a counter every replica advances alike, so all
    replicas take the same branch and launch the same collectives.
    """
    counter = _private.local_component(optimizer._micro_step)
    step = counter.read_value()
    is_last = tf.equal((step + 1) % optimizer._accumulation_steps, 0)

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


def apply_sharded(optimizer, plan_grads, missing, loss_scaler) -> None:
    """One micro-step of the sharded optimizer (replica context)."""
    buckets = optimizer.plan.buckets
    buffers = [_private.local_component(b) for b in optimizer._gradient_buffers]
    owned = optimizer._owned_buckets
    if optimizer.zero_config.stage == 1:
        # Local full-size sums; the window's only reduce-scatter is at its end.
        # (A stage-3 weight's gradient is reduced by the backward pass.)
        contributions = [optimizer._owned_gradient(b, plan_grads) if b.index in owned
                         else optimizer._flat_bucket(b, plan_grads) for b in buckets]

        def to_shards(sums):
            return [s if b.index in owned else optimizer._reduce_scatter_flat(s)
                    for b, s in zip(buckets, sums)]
    else:
        # Reduce-scatter now; only this replica's shard is kept.
        contributions = [optimizer._shard_gradient(b, plan_grads) for b in buckets]

        def to_shards(sums):
            return sums

    _window_step(optimizer, buffers, contributions, lambda sums: optimizer._update_from_shards(
        to_shards(sums), missing, loss_scaler, divisor=optimizer._accumulation_steps))


def apply_unsharded(optimizer, grads, trainable_variables) -> None:
    """One micro-step without a distribution strategy."""
    variables = trainable_variables or optimizer._model_variables
    index_of = {id(v): i for i, v in enumerate(optimizer._model_variables)}
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None and id(v) in index_of]
    buffers = [_private.local_component(optimizer._gradient_buffers[index_of[id(v)]])
               for _, v in pairs]
    k = optimizer._accumulation_steps
    _window_step(optimizer, buffers, [tf.convert_to_tensor(g) for g, _ in pairs],
                 lambda sums: optimizer.inner_optimizer.apply(
                     [s / k for s in sums], [v for _, v in pairs]))
