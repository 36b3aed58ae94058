"""Dynamic loss scaling that every replica agrees on.

Keras' `LossScaleOptimizer` decides "finite or not" from replica 0's local,
unreduced gradients. Over a sharded `ZeroOptimizer` the overflow check runs
on the reduced shards inside the statistics all-reduce instead, so every
replica skips an overflowing step together; these functions then move the
scale on Keras' schedule, in the `LossScaleOptimizer`'s own variables. See
docs/mixed-precision.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private


def after_finite_step(loss_scale_optimizer) -> None:
    """Counts a finite step; doubles the scale after enough of them."""
    counter = _private.local_component(loss_scale_optimizer.step_counter)
    scale = _private.local_component(loss_scale_optimizer.dynamic_scale)
    count = counter.read_value()
    grow = tf.equal(count, tf.cast(loss_scale_optimizer.dynamic_growth_steps - 1, count.dtype))
    current = scale.read_value()
    scale.assign(tf.where(grow, current * 2.0, current))
    counter.assign(tf.where(grow, tf.zeros_like(count), count + 1))


def after_overflow(loss_scale_optimizer) -> None:
    """Halves the scale and restarts the growth count."""
    counter = _private.local_component(loss_scale_optimizer.step_counter)
    scale = _private.local_component(loss_scale_optimizer.dynamic_scale)
    counter.assign(tf.zeros_like(counter.read_value()))
    scale.assign(scale.read_value() * 0.5)
