"""The variable creator of `ZeroStrategy.scope()`: weights stored by tf_zero.

At stage 3 it returns a `tf_zero.weights.sharded.ShardedVariable` for every
trainable float weight of at least `persistence_threshold` elements, and
routes the calls of the layer that owns it through `_ordered_call`: its
gathers wait in the prefetch window (`prefetch.py`), and the layer is
recomputed in the backward pass so its gathered weights die with its forward
output. At stages 1-2 under a mixed policy it returns a
`tf_zero.weights.working.WorkingVariable` for every such weight its layer
reads in the 16-bit compute dtype. See docs/stage3.md and
docs/mixed-precision.md.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.weights import prefetch
from tf_zero.weights.sharded import ShardedVariable
from tf_zero.weights.storage import in_replica_context_of
from tf_zero.weights.working import WorkingVariable

SIXTEEN_BIT = (tf.bfloat16, tf.float16)

# ---- the variable creator ------------------------------------------------


def uses_creator(config) -> bool:
    """Whether `ZeroStrategy.scope()` needs `sharding_creator` for `config`:
    at stage 3, and at stages 1-2 unless working copies are turned off."""
    return config.stage == 3 or config.param_dtype != "float32"


def sharding_creator(strategy, config):
    """A `tf.variable_creator_scope` creator for the weights tf_zero stores."""

    def creator(next_creator, **kwargs):
        if not _should_shard(strategy, config, kwargs):
            return next_creator(**kwargs)
        if config.stage == 3:
            return _create_sharded(strategy, config, next_creator, kwargs)
        return _create_working(strategy, config, next_creator, kwargs)

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
    variable = ShardedVariable(_new_shard(strategy, config, next_creator, kwargs, full, True),
                               full.shape, full.dtype, kwargs.get("name") or "sharded",
                               strategy, config, autocast)
    # assign() copies each replica's slice into its shard: no shard keeps a
    # view of the full initial value alive.
    with tf.init_scope():
        variable.assign(full)
    if layer is not None:
        _wrap_layer_call(layer)
    return variable


def _new_shard(strategy, config, next_creator, kwargs, full, trainable):
    """A zero-filled flat sync-on-read shard of `full` for every replica (1/K
    of it under hybrid sharding over groups of K)."""
    shard_size = math.ceil(full.shape.num_elements() /
                           (config.shard_group_size or strategy.num_replicas_in_sync))
    shard_kwargs = dict(kwargs)
    shard_kwargs.update(
        initial_value=lambda: tf.zeros([shard_size], full.dtype), shape=None,
        dtype=full.dtype, trainable=trainable,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return next_creator(**shard_kwargs)


def working_dtype(arguments, dtype):
    """The 16-bit dtype a weight's layer reads it in, or None where it is read
    in `dtype` (its layer or the weight turns autocast off, as Embedding and
    the normalization layers do; its layer's policy computes in float32; a
    regularizer reads it outside the layer call)."""
    layer = arguments["layer"]
    if (layer is None or not arguments["autocast"] or not getattr(layer, "autocast", True)
            or arguments["regularizer"] is not None or tf.as_dtype(dtype) != tf.float32):
        return None
    compute = tf.as_dtype(layer.compute_dtype)
    return compute if compute in SIXTEEN_BIT else None


def _create_working(strategy, config, next_creator, kwargs):
    arguments = _private.add_weight_arguments()
    with tf.init_scope(), tf.device("/cpu:0"):
        initial_value = kwargs["initial_value"]
        full = initial_value() if callable(initial_value) else initial_value
        full = tf.convert_to_tensor(full, dtype=kwargs.get("dtype"))
    working = working_dtype(arguments, full.dtype)
    if working is None or not _above_threshold(full.shape.num_elements(), config):
        return next_creator(**dict(kwargs, initial_value=full))
    with tf.init_scope():
        copy = next_creator(**dict(kwargs, initial_value=tf.cast(full, working),
                                   dtype=working))
    variable = WorkingVariable(_new_shard(strategy, config, next_creator, kwargs, full, False),
                               copy,
                               full.shape, full.dtype, kwargs.get("name") or "working",
                               strategy, config)
    with tf.init_scope():
        variable.assign(full)
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
    return not [v for v in layer.non_trainable_variables if not _private.is_sharded(v)]


def _added_losses(layer):
    return _private.added_loss_count(layer)


def _ordered_call(layer, original, args, kwargs):
    """The layer's call with its gathers in the prefetch window, recomputed if allowed."""
    strategy = None
    for v in _private.own_trainable_variables(layer):
        if _private.is_sharded(v):
            storage = _private.sharded_storage(v)
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
