"""Links 1 and 3 of the step: flat local gradients, then their reduced shards.

`local_gradients` makes each gradient Keras hands to `apply` (dense,
`IndexedSlices`, None for a frozen variable) flat and dense, its length from
the variable; `reduce_to_shards` lays each bucket's gradients end to end with
its padding and reduce-scatters it, so each replica holds the summed gradient
of its own slice. A stage-3 weight's gradient arrives reduced already (its
gather's backward pass reduce-scatters it). See docs/architecture.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.plan.layout import Bucket


def local_gradients(shards, grads, variables) -> tuple[list, frozenset]:
    """Flat gradients by plan index, and the indices that have none.

    Raises:
        ValueError: a trainable variable with a gradient is not in the plan.
    """
    index_of = {id(v): i for i, v in enumerate(shards.variables)}
    flat = [None] * len(shards.variables)
    for g, v in zip(grads, variables):
        i = index_of.get(id(v))
        if i is None:
            if g is None or not v.trainable:
                continue
            raise ValueError(
                f"Variable {_private.variable_path(v)} was not known when "
                "ZeroOptimizer was built (by optimizer.build or by the first "
                "apply_gradients). Build it on all trainable variables: call "
                "optimizer.build(model.trainable_variables) under strategy.scope() "
                "before training, or pass them all to the first apply_gradients.")
        flat[i] = None if g is None else _flat_gradient(shards, i, g)
    return flat, frozenset(i for i, g in enumerate(flat) if g is None)


def _flat_gradient(shards, i: int, grad) -> tf.Tensor:
    """Variable `i`'s gradient, flat and dense, its length from the plan.

    A stage-3 weight's gradient is its reduced shard; any other is the local
    gradient of the whole variable.
    """
    var = shards.variables[i]
    if not _private.is_sharded(var):
        return collectives.dense_flat(grad, var.shape)
    ((b, _),) = shards.plan.variable_segments(i)
    bucket = shards.plan.buckets[b]
    if isinstance(grad, tf.IndexedSlices) or (
            grad.shape == var.shape and tuple(var.shape) != (bucket.shard_size,)):
        # A gradient of the whole weight (given by hand, not by the gather's
        # backward pass) is this replica's local gradient: reduce-scatter it
        # like a stage-2 bucket of its own.
        flat = tf.cast(collectives.dense_flat(grad, var.shape), bucket.dtype)
        return collectives.shard_sum(collectives.pad(flat, bucket.padded_size),
                                     shards.reduce_dtype, shards.groups,
                                     shards.gradient_quantization)
    return tf.reshape(tf.convert_to_tensor(grad), [bucket.shard_size])


def flat_bucket(bucket: Bucket, flat_grads) -> tf.Tensor:
    """This replica's local gradients of one bucket, flat, zeros in the padding."""
    parts, position = [], 0
    for seg in bucket.segments:  # in offset order
        if seg.offset > position:
            parts.append(tf.zeros([seg.offset - position], bucket.dtype))
        g = flat_grads[seg.variable]
        if g is None:
            parts.append(tf.zeros([seg.size], bucket.dtype))
        else:
            parts.append(tf.cast(g[seg.start:seg.start + seg.size], bucket.dtype))
        position = seg.offset + seg.size
    if not parts:
        return tf.zeros([bucket.padded_size], bucket.dtype)
    return collectives.pad(collectives.join(parts), bucket.padded_size)


def stored_gradient(bucket: Bucket, flat_grads) -> tf.Tensor:
    """A stage-3 weight's gradient: already the summed shard."""
    g = flat_grads[bucket.segments[0].variable]
    if g is None:
        return tf.zeros([bucket.shard_size], bucket.dtype)
    return tf.cast(g, bucket.dtype)


def local_buckets(shards, flat_grads) -> list:
    """Every bucket's local gradient (a stage-3 weight's: its reduced shard)."""
    return [stored_gradient(b, flat_grads) if shards.arrives_reduced(b)
            else flat_bucket(b, flat_grads) for b in shards.plan.buckets]


def scatter_buckets(shards, bucket_grads) -> list:
    """Reduce-scatters the local bucket gradients into this replica's shards.

    The collectives are launched last bucket first. A replica's collectives
    run in the order they are created (their ordering token), and the
    backward pass yields the last layers' gradients first: in plan order the
    first bucket's reduce-scatter (the embedding's, ready last) would hold
    every other one back until the whole backward pass is done.
    """
    shard_grads = [None] * len(bucket_grads)
    for j in reversed(range(len(bucket_grads))):
        b, g = shards.plan.buckets[j], bucket_grads[j]
        shard_grads[j] = (g if shards.arrives_reduced(b)
                          else collectives.shard_sum(g, shards.reduce_dtype, shards.groups,
                                                     shards.gradient_quantization))
    return shard_grads


def reduce_to_shards(shards, flat_grads) -> list:
    """This replica's summed gradient shard of every bucket."""
    return scatter_buckets(shards, local_buckets(shards, flat_grads))

