"""Stage 3: weights stored as 1/N shards and gathered just in time.

Under `ZeroStrategy(stage=3).scope()` a variable creator sees every
`tf.Variable` that Keras creates for a weight (Keras' TensorFlow backend keeps
a plain `tf.Variable` as each `keras.Variable`'s storage). For a trainable
float weight of at least `persistence_threshold` elements it returns a
`ShardedVariable` instead: a flat, zero-padded sync-on-read variable of
`ceil(P / N)` elements per replica, replica `r` holding elements
`[r * ceil(P / N), (r + 1) * ceil(P / N))`. The layout is the one-variable
bucket of `tf_zero.plan`, so the optimizer updates the shard in place, with
slots of the same shape, and no replica ever stores the full weight.

Reading the weight in replica context (inside `strategy.run`: `fit`,
`evaluate`, `predict`, custom loops) all-gathers the shards inside a
`tf.custom_gradient` whose backward pass reduce-scatters the full gradient,
so `tape.gradient` returns each replica's summed shard gradient, already
reduced. Under a mixed-precision policy the shard is cast to the compute
dtype before the gather (half the traffic); the backward pass reduce-scatters
in float32, or in the configured `reduce_dtype`. Outside replica context a
read concatenates the shards (the full value: `numpy()`, `get_weights()`,
checkpoints, export).

Memory. Without help, TensorFlow keeps every gathered weight alive from the
forward pass to the backward pass (the input gradient of a matmul needs the
weight) and launches every gather as early as it can, so the peak holds the
whole model. Two things bound it: (1) a layer that owns sharded weights is
recomputed in the backward pass (`tf.recompute_grad`, with Keras' autocast
scope restored), so its gathered weights die with its forward output and are
gathered again, after the layer's output gradient exists, in backward; (2)
gathers are chained: in the forward pass the gather of a layer waits for the
input of the layer `prefetch_depth - 1` calls earlier. Layers with
non-trainable state (BatchNormalization's statistics) or random state are
not recomputed: their call has side effects.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_zero import _private, prefetch
from tf_zero.sharded_variable import ShardedVariable, in_replica_context_of, is_sharded

__all__ = ["ShardedVariable", "is_sharded", "sharding_creator"]

# ---- the variable creator ------------------------------------------------


def sharding_creator(strategy, config):
    """A `tf.variable_creator_scope` creator that shards eligible weights."""

    def creator(next_creator, **kwargs):
        if not _should_shard(strategy, config, kwargs):
            return next_creator(**kwargs)
        return _create_sharded(strategy, config, next_creator, kwargs)

    return creator


def _should_shard(strategy, config, kwargs):
    if kwargs.get("trainable") is False:
        return False
    if kwargs.get("synchronization") == tf.VariableSynchronization.ON_READ:
        return False
    if not tf.distribute.in_cross_replica_context():
        return False
    dtype = kwargs.get("dtype")
    initial_value = kwargs.get("initial_value")
    if dtype is None and not callable(initial_value):
        dtype = getattr(initial_value, "dtype", None)
    if dtype is None or not tf.as_dtype(dtype).is_floating:
        return False
    shape = kwargs.get("shape")
    if shape is None:
        if callable(initial_value):
            return True  # decided once the value exists
        shape = np.shape(initial_value)
    shape = tf.TensorShape(shape)
    if not shape.is_fully_defined():
        return False
    return _above_threshold(shape.num_elements(), config)


def _above_threshold(num_elements, config):
    return num_elements >= max(config.persistence_threshold, 1)


def _create_sharded(strategy, config, next_creator, kwargs):
    initial_value = kwargs["initial_value"]
    with tf.init_scope(), tf.device("/cpu:0"):
        full = initial_value() if callable(initial_value) else initial_value
        full = tf.convert_to_tensor(full, dtype=kwargs.get("dtype"))
    if not _above_threshold(full.shape.num_elements(), config):
        return next_creator(**dict(kwargs, initial_value=full))
    layer, autocast = _private.layer_adding_weight()
    shard_size = math.ceil(full.shape.num_elements() / strategy.num_replicas_in_sync)
    shard_kwargs = dict(kwargs)
    shard_kwargs.update(
        initial_value=lambda: tf.zeros([shard_size], full.dtype), shape=None,
        dtype=full.dtype, trainable=True,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    variable = ShardedVariable(next_creator(**shard_kwargs), full.shape, full.dtype,
                               kwargs.get("name") or "sharded", strategy, config, autocast)
    # assign() copies each replica's slice into its shard: no shard keeps a
    # view of the full initial value alive.
    with tf.init_scope():
        variable.assign(full)
    if layer is not None:
        _wrap_layer_call(layer)
    return variable


# ---- ordering of gathers and recompute -------------------------------------


def _wrap_layer_call(layer):
    """Routes the calls of a layer that owns sharded weights through `_ordered_call`."""
    if getattr(layer, "_tf_zero_wrapped", False):
        return
    original = layer.call

    def call(*args, **kwargs):
        return _ordered_call(layer, original, args, kwargs)

    object.__setattr__(layer, "call", call)
    object.__setattr__(layer, "_tf_zero_wrapped", True)


def _recomputable(layer):
    # A call that writes state must not run twice: non_trainable_variables
    # covers BatchNormalization statistics and the seed generators of the
    # layer and its sublayers (Dropout), whose second draw would differ.
    # Frozen sharded weights (a LoRA base kernel) are read-only: no state.
    return not [v for v in layer.non_trainable_variables if not is_sharded(v)]


def _added_losses(layer):
    return _private.added_loss_count(layer)


def _ordered_call(layer, original, args, kwargs):
    """The layer's call with its gathers in the prefetch window, recomputed if allowed."""
    strategy = None
    for v in _private.own_trainable_variables(layer):
        storage = _private.sharded_storage(v)
        if storage is not None:
            strategy, config = storage.strategy, storage.config
            break
    if (strategy is None or not in_replica_context_of(strategy) or tf.executing_eagerly()
            or not args or not isinstance(args[0], tf.Tensor)):
        return original(*args, **kwargs)
    deps = prefetch.enter_layer(args[0], config.prefetch_depth)
    flat = tf.nest.flatten((args, kwargs))
    # Every float tensor argument goes through recompute_grad explicitly: a
    # tensor it only captured would get no gradient.
    positions = [i for i, t in enumerate(flat)
                 if isinstance(t, tf.Tensor) and t.dtype.is_floating]
    opaque = any(_private.is_composite_tensor(t) for t in flat)
    if not config.recompute or not _recomputable(layer) or not positions or opaque:
        # (Integer inputs only, e.g. Embedding's ids: backward needs just the
        # ids, so the gathered table is freed after the forward pass anyway.)
        with prefetch.pending(deps):
            return original(*args, **kwargs)
    compute = _private.autocast_dtype()
    calls = []
    losses_before = _added_losses(layer)

    def forward(*tensors):
        # First call: the forward pass. Later calls: the recompute in the
        # backward pass, whose inputs TensorFlow ties to the output gradient,
        # so gathering again waits for that gradient.
        gather_after = deps if not calls else [tensors[0]]
        calls.append(None)
        items = list(flat)
        for i, t in zip(positions, tensors):
            items[i] = t
        call_args, call_kwargs = tf.nest.pack_sequence_as((args, kwargs), items)
        with prefetch.pending(gather_after), _private.autocast_scope(compute):
            return original(*call_args, **call_kwargs)

    outputs = tf.recompute_grad(forward)(*[flat[i] for i in positions])
    if _added_losses(layer) != losses_before:
        # recompute_grad runs the forward pass unrecorded: a loss added inside
        # (add_loss, a sublayer's activity regularizer) would get no gradient.
        raise ValueError(
            f"Layer {layer.name} adds a loss inside its call, which stage 3 cannot "
            "recompute without losing that loss's gradient. Create the model under "
            "ZeroStrategy(stage=3, recompute=False).")
    return outputs
