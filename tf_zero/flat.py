"""Gradients as flat dense tensors whose length comes from the variable.

A gradient's static shape cannot be trusted: an `IndexedSlices` may carry an
unknown (dynamic) `dense_shape`, and the gradient of a tied weight (an
embedding table also read as an output projection) is the sum of a sparse
and a dense part whose static length TensorFlow loses. The variable's shape
is always known, so every flat gradient tf_zero builds takes its length from
the variable, never from the gradient.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def dense_flat(grad, shape) -> tf.Tensor:
    """`grad` of a variable of static `shape` as a dense 1-D tensor.

    Args:
        grad: a `tf.Tensor` or `tf.IndexedSlices` (rows of the first axis).
        shape: the variable's fully defined shape.

    Returns:
        A dense tensor of static shape `[prod(shape)]`.
    """
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape, dtype=np.int64))
    if isinstance(grad, tf.IndexedSlices):
        # Densify against the variable's row count, not grad.dense_shape.
        rows = shape[0] if shape else 1
        grad = tf.math.unsorted_segment_sum(grad.values, grad.indices, rows)
    return tf.reshape(grad, [size])
