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

import collections
import math
import threading

import numpy as np
import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.flat import dense_flat
from tf_zero.sharded_state import gather_components


def _replica_context_of(strategy):
    """True inside `strategy.run` (replica context of a distributed strategy)."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return tf.distribute.get_strategy() is strategy


class ShardedVariable:
    """Storage of one stage-3 weight: a 1/N shard on each replica.

    It stands where a `tf.Variable` would stand inside a `keras.Variable`;
    Keras keeps the weight's shape, dtype, name, constraint and regularizer.
    Code does not normally touch it; `tf_zero.stage3.is_sharded(weight)`
    tells whether a Keras weight is stored this way.

    Attributes:
        shard: the sync-on-read `tf.Variable` of `shard_size` elements per
            replica.
        shape, dtype, name: the full weight's.
        size: number of elements of the full weight.
        shard_size: `ceil(size / num_shards)`.
    """

    def __init__(self, shard, shape, dtype, name, strategy, config, autocast):
        self._tf_zero_shard = shard
        self._shape = tf.TensorShape(shape)
        self._dtype = tf.as_dtype(dtype)
        self._name = name
        self._strategy = strategy
        self._config = config
        self._autocast = autocast
        self.size = int(self._shape.num_elements())
        self.num_shards = strategy.num_replicas_in_sync
        self.shard_size = math.ceil(self.size / self.num_shards)
        self._export_variable = None

    # ---- what a tf.Variable answers --------------------------------------

    @property
    def shard(self):
        return self._tf_zero_shard

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    @property
    def name(self):
        return self._name

    @property
    def trainable(self):
        return True

    @property
    def device(self):
        return self.shard.device

    def get_shape(self):
        return self._shape

    @property
    def _unique_id(self):
        return self.shard._unique_id

    @property
    def handle(self):
        # The tape differentiates with respect to this replica's shard: the
        # gather's custom gradient turns the full gradient into its shard.
        if not tf.distribute.has_strategy() and _private.in_save_context():
            return self._export().handle
        return self.shard.handle

    def __tf_tensor__(self, dtype=None, name=None):
        value = self.read_value()
        if dtype is not None and tf.as_dtype(dtype) != value.dtype:
            value = tf.cast(value, dtype)
        return value

    def value(self):
        return self.read_value()

    def read_value(self):
        """The full weight: gathered in replica context, concatenated outside."""
        if _replica_context_of(self._strategy):
            return self._gather()
        if not tf.executing_eagerly() and not tf.distribute.has_strategy():
            return self._serving_read()
        return self.full_value()

    def _serving_read(self):
        # A function traced outside the strategy (model.export, a
        # tf.saved_model signature, tf.function(model)) reads one plain
        # variable holding the full weight; a SavedModel can hold that, not
        # the per-replica shards. While saving it is refreshed once, eagerly;
        # elsewhere every call refreshes it first, so it is never stale.
        export = self._export()
        if _private.in_save_context():
            return export.read_value()
        with tf.control_dependencies([export.assign(self.full_value())]):
            return export.read_value()

    def numpy(self):
        return self.full_value().numpy()

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    # ---- the full value, outside replica context ------------------------

    def full_value(self) -> tf.Tensor:
        """Concatenation of every replica's shard, unpadded and reshaped."""
        if _private.in_multi_worker_mode(self._strategy):
            flat = gather_components(self._strategy, self.shard)
        else:
            comps = _private.components(self.shard)
            parts = []
            for comp in comps:
                with tf.device(comp.device):
                    parts.append(tf.identity(comp.read_value()))
            with tf.device("/cpu:0"):
                flat = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
        with tf.device("/cpu:0"):
            return tf.reshape(flat[:self.size], self._shape)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        """Writes a full value into this worker's shards (cross-replica context)."""
        if _replica_context_of(self._strategy):
            raise ValueError(
                f"{self._name} is a stage-3 sharded weight; it cannot be assigned "
                "inside strategy.run. Assign it outside (model.set_weights, "
                "variable.assign) or train it with tf_zero.ZeroOptimizer.")
        value = tf.convert_to_tensor(value, dtype=self._dtype)
        if tuple(value.shape) != tuple(self._shape):
            raise ValueError(
                f"Cannot assign a value of shape {tuple(value.shape)} to {self._name} "
                f"of shape {tuple(self._shape)}.")
        flat = tf.reshape(value, [-1])
        padding = self.shard_size * self.num_shards - self.size
        if padding:
            flat = tf.concat([flat, tf.zeros([padding], self._dtype)], 0)
        ranks = _private.local_replica_ranks(self._strategy)
        for rank, comp in zip(ranks, _private.components(self.shard)):
            comp.assign(flat[rank * self.shard_size:(rank + 1) * self.shard_size])
        return self

    def _refuse_update(self, *args, **kwargs):
        raise ValueError(
            f"{self._name} is a weight sharded by ZeroStrategy(stage=3); only "
            "tf_zero.ZeroOptimizer updates it. Compile the model with "
            "tf_zero.ZeroOptimizer(your_optimizer).")

    assign_add = _refuse_update
    assign_sub = _refuse_update

    # ---- the gather with its reduce-scatter gradient ---------------------

    def _gather_dtype(self):
        compute = _private.autocast_dtype()
        if self._autocast and compute is not None:
            return tf.as_dtype(compute)
        return self._dtype

    def _gather(self):
        size, shape = self.size, self._shape
        padded = self.shard_size * self.num_shards
        gather_dtype = self._gather_dtype()
        shard_dtype = self._dtype
        # float32 (or the variable's wider dtype) unless reduce_dtype says otherwise.
        reduce_dtype = tf.as_dtype(self._config.reduce_dtype or (
            shard_dtype if shard_dtype.size >= 4 else tf.float32))
        with tf.control_dependencies(_window.dependencies()):
            local = _private.local_component(self.shard).read_value()

        @tf.custom_gradient
        def gather(shard):
            full = collectives.all_gather(tf.cast(shard, gather_dtype))

            def grad(dfull):
                flat = tf.cast(dense_flat(dfull, shape), reduce_dtype)
                if padded > size:
                    flat = tf.concat([flat, tf.zeros([padded - size], reduce_dtype)], 0)
                return tf.cast(collectives.reduce_scatter(flat), shard_dtype)

            return tf.reshape(full[:size], shape), grad

        return gather(local)

    # ---- checkpoints and SavedModel --------------------------------------

    def _serialize_to_tensors(self):
        return {_private.VARIABLE_VALUE_KEY: self.full_value()}

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors[_private.VARIABLE_VALUE_KEY])
        return tf.no_op()

    def _export(self):
        """A plain variable holding the full value (refreshed, eagerly)."""
        with tf.init_scope():
            value = self.full_value()
            if self._export_variable is None:
                with tf.device("/cpu:0"):
                    self._export_variable = tf.Variable(value, trainable=False,
                                                        name=self._name)
            else:
                self._export_variable.assign(value)
        return self._export_variable

    @property
    def _shared_name(self):
        # Checkpoints ask every variable for a name; answering must not gather.
        return self._name

    def _export_to_saved_model_graph(self, object_map, tensor_map, options, **kwargs):
        with _private.eager_mode():
            export = self._export()
        resources = export._export_to_saved_model_graph(object_map, tensor_map, options,
                                                        **kwargs)
        object_map[self] = object_map[export]
        return resources

    def _write_object_proto(self, proto, options):
        # The export variable was refreshed by _export_to_saved_model_graph.
        export = self._export_variable if self._export_variable is not None else self._export()
        return export._write_object_proto(proto, options)

    def _copy_trackable_to_cpu(self, object_map):
        object_map[self] = tf.Variable(self.full_value())

    def __repr__(self):
        return (f"<tf_zero.ShardedVariable {self._name} shape={tuple(self._shape)} "
                f"shards={self.num_shards}x{self.shard_size}>")


def is_sharded(variable) -> bool:
    """Whether a Keras or TensorFlow variable is a stage-3 sharded weight."""
    return _private.sharded_storage(variable) is not None


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


class _GatherWindow(threading.local):
    """Per-thread chain of layer inputs that orders the gathers of one trace."""

    def __init__(self):
        self.graph = None
        self.inputs = collections.deque()
        self.pending = []

    def dependencies(self):
        return list(self.pending)

    def enter_layer(self, x, depth):
        graph = tf.compat.v1.get_default_graph()
        if graph is not self.graph:
            self.graph, self.inputs = graph, collections.deque()
        self.inputs.append(x)
        while len(self.inputs) > depth:
            self.inputs.popleft()
        # Wait for the input of the layer depth - 1 calls back.
        return [self.inputs[0]]


_window = _GatherWindow()


class _Pending:
    """Sets the control dependencies of the gathers made inside a layer call."""

    def __init__(self, deps):
        self._deps = deps

    def __enter__(self):
        self._saved = _window.pending
        _window.pending = self._deps

    def __exit__(self, *exc):
        _window.pending = self._saved


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
    return sum(len(sub._losses) for sub in layer._flatten_layers())


def _ordered_call(layer, original, args, kwargs):
    """The layer's call with its gathers in the prefetch window, recomputed if allowed."""
    strategy = None
    for v in layer._trainable_variables:
        storage = _private.sharded_storage(v)
        if storage is not None:
            strategy, config = storage._strategy, storage._config
            break
    if (strategy is None or not _replica_context_of(strategy) or tf.executing_eagerly()
            or not args or not isinstance(args[0], tf.Tensor)):
        return original(*args, **kwargs)
    deps = _window.enter_layer(args[0], config.prefetch_depth)
    flat = tf.nest.flatten((args, kwargs))
    # Every float tensor argument goes through recompute_grad explicitly: a
    # tensor it only captured would get no gradient.
    positions = [i for i, t in enumerate(flat)
                 if isinstance(t, tf.Tensor) and t.dtype.is_floating]
    opaque = any(isinstance(t, tf.__internal__.CompositeTensor) for t in flat)
    if not config.recompute or not _recomputable(layer) or not positions or opaque:
        # (Integer inputs only, e.g. Embedding's ids: backward needs just the
        # ids, so the gathered table is freed after the forward pass anyway.)
        with _Pending(deps):
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
        with _Pending(gather_after), _private.autocast_scope(compute):
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
