"""Dynamic loss scaling that every replica agrees on.

Keras' `LossScaleOptimizer` decides "finite or not" from replica 0's local,
unreduced gradients, so an overflow on another replica reaches the weights.
When it wraps a sharded `ZeroOptimizer` (which `model.compile` does by itself
under the `mixed_float16` policy) tf_zero takes over its apply step: the
overflow check runs on the reduced gradient shards and is all-reduced with
the other gradient statistics, so every replica sees the same flag. On an
overflow every replica skips the step together, the scale is halved and the
growth counter reset; after `dynamic_growth_steps` finite steps in a row the
scale doubles, on Keras' schedule. The scale state stays in the
`LossScaleOptimizer`'s own variables, so its checkpoints are unchanged.
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
