"""ZeroOptimizer: shards any element-wise Keras optimizer across replicas."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private, collectives, loss_scale, sharded_state, stage3
from tf_zero.config import DEFAULT_BUCKET_SIZE_BYTES, ZeroConfig
from tf_zero.flat import dense_flat
from tf_zero.plan import ShardPlan, plan_shards

# Optimizers whose update needs a whole tensor (a per-layer trust ratio,
# factored second moments, a matrix orthogonalization). Splitting a variable
# across replicas would silently change their math.
WHOLE_TENSOR_OPTIMIZERS = ("Lamb", "Adafactor", "Muon")


def _flat(x):
    return tf.reshape(x, [-1])


def _read(variable):
    # A Keras variable's value, or a raw tf.Variable's (Keras accepts both).
    return variable.value if isinstance(variable, keras.Variable) else variable.read_value()


@keras.saving.register_keras_serializable(package="tf_zero")
class ZeroOptimizer(keras.optimizers.Optimizer):
    """ZeRO stages 1-3 around any element-wise Keras optimizer.

    On each step, in replica context, the local gradients are laid into flat
    buckets following a `tf_zero.plan.ShardPlan` and reduce-scattered, so each
    replica receives the summed gradient of its 1/N slice of every bucket. One
    small all-reduce gives the true global statistics (gradient norms for
    `clipnorm` / `global_clipnorm`). The replica's weight slice is re-read from
    the model variables, the inner optimizer's own `update_step` updates that
    slice with slot variables that exist only for the slice, and the updated
    slices are all-gathered back into every replica's model weights, which
    stay bitwise identical across replicas and remain the source of truth.

    Stage 3 weights (created sharded under `ZeroStrategy(stage=3).scope()`,
    see `tf_zero.stage3`) arrive with gradients that the backward pass has
    already reduce-scattered: each is a bucket of its own whose shard is the
    weight's storage, so the inner optimizer updates it in place and nothing
    is all-gathered after the step.

    The optimizer is built by `model.fit`, by `optimizer.build(variables)`
    under `strategy.scope()`, or, as Keras optimizers are, by the first
    `apply_gradients` (also inside `strategy.run`, traced or eager). Eager
    steps (`strategy.run` without `tf.function`, `run_eagerly=True`) run
    each collective in an internal `tf.function` and give the traced
    numbers.

    With no distribution strategy (or a single-replica one that is not a
    collective strategy) the wrapper delegates to the inner optimizer and
    behaves exactly like it.

    Clipping and weight decay are taken from the inner optimizer and applied
    to the *reduced* gradient, i.e. as in single-device training on the global
    batch: `clipnorm` clips each variable's reduced gradient by its own norm,
    `global_clipnorm` uses the norm over all variables of all replicas,
    `clipvalue` clips element-wise.

    Args:
        inner_optimizer: a Keras optimizer (SGD, Adam, AdamW, ...). If it was
            created outside `strategy.scope()` and has not been built, it is
            re-created under the scope from its config on `build`.
        stage: 1, 2 or 3; default: the strategy's stage (a `ZeroStrategy`),
            else 1. Weights created sharded by `ZeroStrategy(stage=3)` are
            updated in place whatever the stage; `stage=3` on a model
            without sharded weights is an error.
        bucket_size_bytes: default: the strategy's, else 8 MiB.
        name: optimizer name.

    Raises:
        TypeError: `inner_optimizer` is not a Keras optimizer.
        ValueError: the inner optimizer needs whole tensors (Lamb, Adafactor,
            Muon), uses EMA or Keras' `gradient_accumulation_steps`, or
            `stage` is invalid.
    """

    def __init__(self, inner_optimizer, *, stage=None, bucket_size_bytes=None,
                 reduce_dtype=None, accumulation_steps=1, name=None, **kwargs):
        if isinstance(inner_optimizer, ZeroOptimizer) and inner_optimizer._wrappable:
            # ZeroOptimizer(GradientAccumulationOptimizer(opt, k)) is the same
            # optimizer as GradientAccumulationOptimizer(ZeroOptimizer(opt), k).
            accumulation_steps = inner_optimizer._accumulation_steps
            inner_optimizer, stage, bucket_size_bytes, reduce_dtype = inner_optimizer._merged(
                stage, bucket_size_bytes, reduce_dtype)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "ZeroOptimizer wraps a Keras optimizer instance, e.g. "
                "ZeroOptimizer(keras.optimizers.Adam(1e-3)); got "
                f"{type(inner_optimizer).__name__}.")
        if isinstance(inner_optimizer, (ZeroOptimizer, keras.optimizers.LossScaleOptimizer)):
            raise ValueError(
                f"ZeroOptimizer cannot wrap a {type(inner_optimizer).__name__}. "
                "Wrap the plain optimizer: ZeroOptimizer(keras.optimizers.Adam()); "
                "under mixed_float16, model.compile adds loss scaling itself.")
        _check_supported(inner_optimizer)
        for key in ("weight_decay", "clipnorm", "global_clipnorm", "clipvalue",
                    "use_ema", "gradient_accumulation_steps", "loss_scale_factor"):
            if kwargs.get(key) not in (None, False):
                raise ValueError(
                    f"ZeroOptimizer does not take `{key}`; set it on the inner "
                    f"optimizer, e.g. keras.optimizers.AdamW({key}=...).")
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"ZeroOptimizer got unexpected arguments {sorted(kwargs)}")
        if stage is not None:
            ZeroConfig(stage=stage)  # validates
        if bucket_size_bytes is not None:
            ZeroConfig(bucket_size_bytes=bucket_size_bytes)
        if reduce_dtype is not None:
            ZeroConfig(reduce_dtype=reduce_dtype)
        if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int)
                or accumulation_steps < 1):
            raise ValueError(
                f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        super().__init__(learning_rate=0.0, name=name or f"zero_{inner_optimizer.name}")
        self._inner = inner_optimizer
        self._requested_stage = stage
        self._requested_bucket_size = bucket_size_bytes
        self._requested_reduce_dtype = reduce_dtype
        self._accumulation_steps = accumulation_steps
        self._gradient_buffers = []
        self._micro_step = None
        self._zero_config = None
        self._plan = None
        self._model_variables = []
        self._shard_variables = []
        self._slots_by_bucket = []
        self._sharded = False
        self._owned_buckets = frozenset()
        self._strategy = None
        self._pending_load = None
        items = [inner_optimizer._iterations]
        if isinstance(inner_optimizer._learning_rate, keras.Variable):
            items.append(inner_optimizer._learning_rate)
        self._checkpoint_items = sharded_state.CheckpointList(items)
        self._checkpoint_model_variables = sharded_state.CheckpointList()

    # A ZeroOptimizer passed to ZeroOptimizer(...) is refused; the subclass
    # GradientAccumulationOptimizer sets this to be unwrapped instead.
    _wrappable = False

    def _merged(self, stage, bucket_size_bytes, reduce_dtype):
        """(inner optimizer, stage, bucket size, reduce dtype) for a wrapper of
        this optimizer: the wrapper's explicit settings, else this one's."""
        return (self._inner, stage or self._requested_stage,
                bucket_size_bytes or self._requested_bucket_size,
                reduce_dtype or self._requested_reduce_dtype)

    # ---- forwarding -------------------------------------------------------

    @property
    def inner_optimizer(self):
        """The wrapped optimizer (the live one, if it had to be re-created)."""
        return self._inner

    @property
    def iterations(self):
        return self._inner.iterations

    @property
    def learning_rate(self):
        return self._inner.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self._inner.learning_rate = learning_rate

    @property
    def variables(self):
        """The plain inner optimizer's variables, sharded slots as full views.

        Once built, this is what a checkpoint holds: the inner optimizer's
        iterations and learning rate, then each slot of each model variable
        as an unsharded view (which supports `numpy()`, `assign()`, `shape`).
        """
        if self.built and len(self._checkpoint_items):
            return list(self._checkpoint_items)
        return self._variables + self._inner.variables

    @property
    def zero_config(self) -> ZeroConfig | None:
        """The resolved configuration (known after `build`)."""
        return self._zero_config

    @property
    def plan(self) -> ShardPlan | None:
        """The shard plan (known after `build`; None when not sharded)."""
        return self._plan

    @property
    def stage(self):
        return self._zero_config.stage if self._zero_config else self._requested_stage

    @property
    def is_sharded(self) -> bool:
        return self._sharded

    @property
    def gradient_buffers(self):
        """Gradient buffers kept between steps (accumulators; none if k=1)."""
        return list(self._gradient_buffers)

    def unsharded_gradient_buffer_bytes(self) -> int:
        """Bytes of accumulators an unsharded optimizer keeps per replica."""
        if self._accumulation_steps <= 1 or self._plan is None:
            return 0
        return sum(b.size * tf.as_dtype(b.dtype).size for b in self._plan.buckets)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay."""
        self._inner.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def _clip_gradients(self, grads):
        # The inner optimizer's clipping of the given gradients; the step
        # itself applies the same clipping to the reduced gradient.
        return self._inner._clip_gradients(grads)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError("ZeroOptimizer is stateful; stateless_apply is not supported.")

    def finalize_variable_values(self, var_list):
        self._inner.finalize_variable_values(var_list)

    # ---- build ------------------------------------------------------------

    def _resolve_config(self, strategy):
        base = getattr(strategy, "zero_config", None)
        stage = self._requested_stage or (base.stage if base else 1)
        bucket = self._requested_bucket_size or (
            base.bucket_size_bytes if base else DEFAULT_BUCKET_SIZE_BYTES)
        reduce_dtype = self._requested_reduce_dtype or (base.reduce_dtype if base else None)
        return ZeroConfig(stage=stage, bucket_size_bytes=bucket,
                          reduce_dtype=reduce_dtype)

    def build(self, var_list):
        """Creates the shards and slots for `var_list`.

        `model.fit` calls this, or `optimizer.build(variables)` under
        `strategy.scope()`, or the first `apply_gradients`. Called in replica
        context (the first `apply_gradients` inside `strategy.run`, traced or
        eager, or a wrapping `LossScaleOptimizer`'s own build), every replica
        reaches a `merge_call` and the build runs once, in cross-replica
        context and eagerly (`tf.init_scope` lifts it out of a function being
        traced): the same plan, shards and slots as an explicit build.
        """
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            var_list = list(var_list)

            # merge_call would run it through AutoGraph inside a traced step.
            @tf.autograph.experimental.do_not_convert
            def build_in_cross_replica_context(strategy):
                with tf.init_scope(), strategy.scope():
                    self.build(var_list)

            return tf.distribute.get_replica_context().merge_call(
                build_in_cross_replica_context)
        strategy = _private.strategy_of(var_list)
        if strategy is not None and not tf.distribute.has_strategy():
            with strategy.scope():  # built outside the scope, e.g. before load
                return self._build(var_list)
        return self._build(var_list)

    @keras.src.utils.tracking.no_automatic_dependency_tracking
    def _build(self, var_list):
        strategy = tf.distribute.get_strategy()
        self._strategy = strategy
        self._zero_config = self._resolve_config(strategy)
        self._sharded = tf.distribute.has_strategy() and not isinstance(
            strategy, tf.distribute.OneDeviceStrategy)
        self._model_variables = [v for v in var_list
                                 if v.trainable and keras.backend.is_float_dtype(v.dtype)]
        if not self._sharded:
            self._inner.build(var_list)
            for v in self._inner.variables[len(self._checkpoint_items):]:
                self._checkpoint_items.append(v)
            for v in getattr(self._inner, "_trainable_variables", var_list):
                self._checkpoint_model_variables.append(v)
            _accumulation().build_buffers(self)
            super().build(var_list)
            self._apply_pending_load()
            return
        self._inner = _inner_in_scope(self._inner, strategy)
        self._checkpoint_items[0] = self._inner._iterations
        if isinstance(self._inner._learning_rate, keras.Variable):
            self._checkpoint_items[1] = self._inner._learning_rate
        model_vars = self._model_variables
        n = strategy.num_replicas_in_sync
        owned = [stage3.is_sharded(v) for v in model_vars]
        if self._zero_config.stage == 3 and not any(owned) and getattr(
                strategy, "stage", None) == 3:
            warnings.warn(
                "ZeroStrategy(stage=3): no trainable weight of this model is "
                "sharded (none has persistence_threshold="
                f"{strategy.zero_config.persistence_threshold} elements or more), "
                "so the trainable weights are updated as at stage 2. Frozen "
                "weights created under the scope are sharded all the same "
                "(tf_zero.is_sharded tells which). Lower persistence_threshold "
                "to shard smaller weights.",
                stacklevel=3)
        elif self._zero_config.stage == 3 and not any(owned):
            raise ValueError(
                "ZeroOptimizer at stage 3 found no sharded weights: stage 3 shards "
                "weights when they are created, so build the model under "
                "tf_zero.ZeroStrategy(stage=3).scope() (weights smaller than "
                "persistence_threshold stay replicated), or use stage=2.")
        dtypes = [keras.backend.standardize_dtype(v.dtype) for v in model_vars]
        self._plan = plan_shards([tuple(v.shape) for v in model_vars], dtypes, n,
                                 self._zero_config.bucket_size_bytes, alone=owned)
        self._owned_buckets = frozenset(
            b.index for b in self._plan.buckets if owned[b.segments[0].variable])
        shards = []
        for bucket in self._plan.buckets:
            name = f"zero_shard_{bucket.index}"
            if bucket.index in self._owned_buckets:
                # A stage-3 weight: its storage already is this bucket's shard.
                storage = _private.sharded_storage(model_vars[bucket.segments[0].variable])
                shards.append(_keras_view(storage.shard, name))
                continue
            shards.append(keras.Variable(
                initializer="zeros", shape=(bucket.shard_size,),
                dtype=bucket.dtype, trainable=False, name=name,
                synchronization="on_read", aggregation="only_first_replica"))
        self._fill_shards_from_model(strategy, shards)
        before = len(self._inner.variables)
        _private.mark_local_update(self._inner)
        with tf.variable_creator_scope(_per_replica_creator):
            self._inner.build(shards)
        slots = self._inner.variables[before:]
        self._slots_by_bucket = _match_slots(self._inner, shards, slots)
        for name in _SLOTS_INITIALIZED_FROM_VARIABLE.get(type(self._inner).__name__, ()):
            for shard, bucket_slots in zip(shards, self._slots_by_bucket):
                for slot in bucket_slots:
                    if slot.name.endswith("_" + name):
                        for src, dst in zip(_private.components(shard),
                                            _private.components(slot)):
                            dst.assign(src)
        self._shard_variables = shards
        for v in shards:
            self._track_variable(v)
        for v in model_vars:
            self._checkpoint_model_variables.append(v)
        self._add_unsharded_slots()
        with tf.variable_creator_scope(_per_replica_creator):
            _accumulation().build_buffers(self)
        super().build(var_list)
        self._apply_pending_load()

    def _add_unsharded_slots(self):
        """Checkpoint items for the slots, in the plain optimizer's order."""
        probe_vars = [keras.Variable(np.zeros(1, np.float32), name=n, trainable=False)
                      for n in ("a", "b")]
        groups = sharded_state.slot_layout(self._inner, probe_vars)
        shard_prefix = [s.path.replace("/", "_") + "_" for s in self._shard_variables]
        names = [[slot.name[len(shard_prefix[b]):] for slot in slots]
                 for b, slots in enumerate(self._slots_by_bucket)]
        for group in groups:
            positions = [names[0].index(name) if names else 0 for name in group]
            for k in range(len(self._model_variables)):
                for name, position in zip(group, positions):
                    self._checkpoint_items.append(
                        sharded_state.UnshardedSlot(self, k, position, name))

    # ---- checkpoints ------------------------------------------------------

    def _obj_type(self):
        _private.register_keras_saving_skiplist("ZeroOptimizer", ("inner_optimizer", "_inner"))
        return "ZeroOptimizer"

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # Look like the plain inner optimizer: same dependency names, with
        # sharded slots replaced by their full, unpadded values.
        inner = self._inner
        if str(save_type).lower().endswith("savedmodel"):
            # A SavedModel is for serving: it keeps the step, not the sharded
            # slots (checkpoints carry the full training state).
            return {"_iterations": inner._iterations}
        children = {"_iterations": inner._iterations,
                    "_variables": self._checkpoint_items}
        if isinstance(inner._learning_rate, keras.Variable):
            children["_learning_rate"] = inner._learning_rate
        if len(self._checkpoint_model_variables):
            children["_trainable_variables"] = self._checkpoint_model_variables
        known = {id(v) for v in inner.variables}
        for name, child in inner._trackable_children(save_type, **kwargs).items():
            if isinstance(child, (keras.Variable, tf.Variable)) and id(child) not in known:
                children.setdefault(name, child)  # e.g. Nadam's _u_product
        return children

    def save_own_variables(self, store):
        """Writes the plain inner optimizer's variables, slots unsharded."""
        for i, item in enumerate(self._checkpoint_items):
            store[str(i)] = sharded_state.as_numpy(item)

    def load_own_variables(self, store):
        """Reads a plain or tf_zero optimizer's variables (any replica count).

        Raises:
            ValueError: the store holds another number of variables or other
                shapes than this optimizer on this model.
        """
        values = {key: np.array(store[key]) for key in store.keys()}
        if not self.built:
            self._pending_load = values  # restored when build() runs
            return
        self._load_values(values)

    def _apply_pending_load(self):
        if self._pending_load is not None:
            values, self._pending_load = self._pending_load, None
            self._load_values(values)

    def _load_values(self, values):
        items = list(self._checkpoint_items)
        if len(values) != len(items):
            raise ValueError(
                f"The saved optimizer state has {len(values)} variables but "
                f"{self.name} ({type(self._inner).__name__} on this model) has "
                f"{len(items)}: the checkpoint comes from a different optimizer "
                "or model. Load it into the optimizer and model it was saved from.")
        for i, item in enumerate(items):
            value = values[str(i)]
            if tuple(value.shape) != tuple(item.shape):
                raise ValueError(
                    f"Saved optimizer variable {i} has shape {tuple(value.shape)} "
                    f"but {item.name} has shape {tuple(item.shape)}: the "
                    "checkpoint comes from a different model or optimizer.")
        for i, item in enumerate(items):
            item.assign(values[str(i)])

    def _fill_shards_from_model(self, strategy, shards):
        """Writes each replica's weight slice into its shard components."""
        ranks = _private.local_replica_ranks(strategy)
        flat = {}
        for bucket, shard in zip(self._plan.buckets, shards):
            if bucket.index in self._owned_buckets:
                continue
            for rank, comp in zip(ranks, _private.components(shard)):
                parts = []
                for p in bucket.shard_pieces(rank):
                    if p.variable not in flat:
                        value = self._model_variables[p.variable].numpy()
                        flat[p.variable] = np.asarray(value).reshape(-1)
                    parts.append(flat[p.variable][p.start:p.start + p.size])
                values = np.zeros([bucket.shard_size], dtype=comp.dtype.as_numpy_dtype)
                if parts:
                    joined = np.concatenate(parts)
                    values[:joined.size] = joined
                comp.assign(values)

    # ---- step -------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        return self._apply(grads, trainable_variables, loss_scaler=None)

    def _apply(self, grads, trainable_variables, loss_scaler):
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:  # as Keras optimizers do (see `build`)
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        if not self._sharded:
            if self._accumulation_steps > 1:
                return _accumulation().apply_unsharded(self, grads, trainable_variables)
            return self._inner.apply(grads, trainable_variables)
        if trainable_variables is None:
            trainable_variables = self._model_variables
        if tf.distribute.in_cross_replica_context():
            raise ValueError(
                "ZeroOptimizer.apply must be called in replica context: call it "
                "from the function passed to strategy.run.")
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"got {len(grads)} gradients for {len(trainable_variables)} variables")
        with keras.name_scope(self.name, caller=self):
            self._sharded_apply(grads, trainable_variables, loss_scaler)

    def _apply_scaled(self, loss_scale_optimizer, grads, trainable_variables):
        """Called by a wrapping `LossScaleOptimizer`; False: let it handle it.

        The overflow check runs on the reduced gradient shards and is agreed
        by all replicas through the statistics all-reduce, so an overflow on
        any replica makes every replica skip the step and lower the scale.
        """
        if self.built and not self._sharded:
            return False
        if not self.built and not tf.distribute.has_strategy():
            return False
        self._apply(grads, trainable_variables, loss_scaler=loss_scale_optimizer)
        return True

    def _sharded_apply(self, grads, variables, loss_scaler):
        index_of = {id(v): i for i, v in enumerate(self._model_variables)}
        plan_grads = [None] * len(self._model_variables)
        for g, v in zip(grads, variables):
            i = index_of.get(id(v))
            if i is None:
                if g is None or not v.trainable:
                    continue
                raise ValueError(
                    f"Variable {sharded_state.variable_path(v)} was not known when "
                    "ZeroOptimizer was built (by optimizer.build or by the first "
                    "apply_gradients). Build it on all trainable variables: call "
                    "optimizer.build(model.trainable_variables) under strategy.scope() "
                    "before training, or pass them all to the first apply_gradients.")
            plan_grads[i] = None if g is None else self._flat_gradient(i, g)
        missing = {i for i, g in enumerate(plan_grads) if g is None}
        if self._accumulation_steps > 1:
            _accumulation().apply_sharded(self, plan_grads, missing, loss_scaler)
            return
        shard_grads = [self._shard_gradient(b, plan_grads) for b in self._plan.buckets]
        self._update_from_shards(shard_grads, missing, loss_scaler)

    def _update_from_shards(self, shard_grads, missing, loss_scaler, divisor=None):
        """Statistics, clipping, the inner update of the shards, all-gather."""
        rank = collectives.rank()
        if divisor is not None:
            shard_grads = [g / tf.cast(divisor, g.dtype) for g in shard_grads]
        if loss_scaler is not None:
            scale = loss_scaler.dynamic_scale
            shard_grads = [g / tf.cast(scale, g.dtype) for g in shard_grads]
        stats = self._statistics(shard_grads, rank, check_finite=loss_scaler is not None)
        shard_grads = self._clip(shard_grads, rank, stats)
        for bucket, shard_var in zip(self._plan.buckets, self._shard_variables):
            if bucket.index not in self._owned_buckets:
                _private.local_component(shard_var).assign(
                    self._read_weight_shard(bucket, bucket.shard_pieces(rank)))

        def update():
            self._update_shards(shard_grads, missing, rank)
            if loss_scaler is not None:
                loss_scale.after_finite_step(loss_scaler)
            return tf.constant(True)

        if loss_scaler is None:
            update()
        else:
            def skip():
                loss_scale.after_overflow(loss_scaler)
                return tf.constant(False)
            # Identical on every replica (all-reduced), so every replica takes
            # the same branch; neither branch communicates.
            tf.cond(stats["finite"], update, skip)
        self._all_gather_into_model(missing)

    def _update_shards(self, shard_grads, missing, rank):
        inner = self._inner
        lr = inner.learning_rate
        update_grads, update_vars, restore = [], [], []
        for bucket, shard_var, grad in zip(self._plan.buckets, self._shard_variables,
                                           shard_grads):
            pieces = bucket.shard_pieces(rank)
            frozen = [p for p in pieces if p.variable in missing]
            if frozen and len(frozen) == len(pieces):
                continue
            if frozen:
                # Variables without a gradient share this shard: their weights
                # and slots must come out of the update untouched.
                keep = self._mask(bucket, pieces, lambda p: p.variable in missing)
                state = [shard_var] + self._slots_by_bucket[bucket.index]
                saved = [tf.identity(_private.local_component(v).read_value())
                         for v in state]
                restore.append((keep, state, saved))
            self._weight_decay(bucket, shard_var, pieces, lr)
            update_grads.append(grad)
            update_vars.append(shard_var)
        if update_vars:
            inner._backend_update_step(update_grads, update_vars, lr)
        for keep, state, saved in restore:
            for v, old in zip(state, saved):
                comp = _private.local_component(v)
                comp.assign(tf.where(keep, old, comp.read_value()))
        _private.local_component(inner.iterations).assign_add(1)

    def _flat_gradient(self, i, grad):
        """Variable `i`'s gradient, flat and dense, its length from the plan.

        A stage-3 weight's gradient is its reduced shard; any other is the
        local gradient of the whole variable.
        """
        var = self._model_variables[i]
        if stage3.is_sharded(var):
            ((b, _),) = self._plan.variable_segments(i)
            bucket = self._plan.buckets[b]
            if isinstance(grad, tf.IndexedSlices) or (
                    grad.shape == var.shape and tuple(var.shape) != (bucket.shard_size,)):
                # A gradient of the whole weight (given by hand, not by the
                # gather's backward pass) is this replica's local gradient:
                # reduce-scatter it like a stage-2 bucket of its own.
                flat = tf.cast(dense_flat(grad, var.shape), bucket.dtype)
                if bucket.padding:
                    flat = tf.concat([flat, tf.zeros([bucket.padding], bucket.dtype)], 0)
                return self._reduce_scatter_flat(flat)
            return tf.reshape(tf.convert_to_tensor(grad), [bucket.shard_size])
        return dense_flat(grad, var.shape)

    def _shard_gradient(self, bucket, plan_grads):
        """This replica's summed gradient shard of one bucket."""
        if bucket.index in self._owned_buckets:
            return self._owned_gradient(bucket, plan_grads)
        return self._reduce_scatter_flat(self._flat_bucket(bucket, plan_grads))

    def _owned_gradient(self, bucket, plan_grads):
        # A stage-3 weight's gradient arrives reduce-scattered by the
        # backward pass of its gather: it already is the summed shard.
        g = plan_grads[bucket.segments[0].variable]
        if g is None:
            return tf.zeros([bucket.shard_size], bucket.dtype)
        return tf.cast(g, bucket.dtype)

    def _flat_bucket(self, bucket, plan_grads):
        """This replica's local gradients of one bucket, flat and padded."""
        parts = []
        for seg in bucket.segments:
            g = plan_grads[seg.variable]
            if g is None:
                parts.append(tf.zeros([seg.size], bucket.dtype))
            else:
                parts.append(tf.cast(g[seg.start:seg.start + seg.size], bucket.dtype))
        if bucket.padding:
            parts.append(tf.zeros([bucket.padding], bucket.dtype))
        return tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]

    def _reduce_scatter_flat(self, flat):
        reduce_dtype = self._zero_config.reduce_dtype
        if reduce_dtype and tf.as_dtype(reduce_dtype) != flat.dtype:
            return tf.cast(collectives.reduce_scatter(tf.cast(flat, reduce_dtype)), flat.dtype)
        return collectives.reduce_scatter(flat)

    def _read_weight_shard(self, bucket, pieces):
        parts = []
        for p in pieces:
            value = _read(self._model_variables[p.variable])
            parts.append(_flat(value)[p.start:p.start + p.size])
        covered = sum(p.size for p in pieces)
        if covered < bucket.shard_size:
            parts.append(tf.zeros([bucket.shard_size - covered], bucket.dtype))
        return tf.concat(parts, axis=0) if len(parts) > 1 else parts[0]

    def _mask(self, bucket, pieces, predicate):
        mask = np.zeros([bucket.shard_size], dtype=bool)
        for p in pieces:
            if predicate(p):
                mask[p.offset:p.offset + p.size] = True
        return tf.constant(mask)

    def _weight_decay(self, bucket, shard_var, pieces, lr):
        inner = self._inner
        if inner.weight_decay is None:
            return
        decayed = [inner._use_weight_decay(self._model_variables[p.variable])
                   for p in pieces]
        if not any(decayed):
            return
        dtype = bucket.dtype
        wd = tf.cast(inner.weight_decay, dtype)
        lr = tf.cast(lr, dtype)
        local = _private.local_component(shard_var)
        if all(decayed):
            local.assign_sub(local.read_value() * wd * lr)
        else:
            decay = dict(zip(pieces, decayed))
            mask = tf.cast(self._mask(bucket, pieces, decay.__getitem__), dtype)
            local.assign_sub(local.read_value() * wd * lr * mask)

    def _statistics(self, shard_grads, rank, check_finite):
        """Replica-wide gradient statistics from one small all-reduce.

        Returns a dict with, as needed, "finite" (no inf/nan in any replica's
        shard), "sq_norms" (per-variable squared norms, for clipnorm) or
        "global_norm" (for global_clipnorm).
        """
        inner = self._inner
        per_variable = bool(inner.clipnorm and inner.clipnorm > 0)
        global_norm = bool(inner.global_clipnorm and inner.global_clipnorm > 0)
        if not (check_finite or per_variable or global_norm):
            return {}
        entries = []
        if check_finite:
            bad = [tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32))
                   for g in shard_grads]
            entries.append(tf.add_n(bad) if bad else tf.zeros([]))
        n_vars = len(self._model_variables)
        if per_variable:
            sq = [tf.zeros([], tf.float32) for _ in range(n_vars)]
            for bucket, g in zip(self._plan.buckets, shard_grads):
                for p in bucket.shard_pieces(rank):
                    piece = tf.cast(g[p.offset:p.offset + p.size], tf.float32)
                    sq[p.variable] = sq[p.variable] + tf.reduce_sum(tf.square(piece))
            entries.extend(sq)
        elif global_norm:
            sq = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in shard_grads]
            entries.append(tf.add_n(sq) if sq else tf.zeros([]))
        totals = collectives.all_reduce_sum(tf.stack(entries))
        stats, i = {}, 0
        if check_finite:
            stats["finite"] = tf.equal(totals[0], 0.0)
            i = 1
        if per_variable:
            stats["sq_norms"] = totals[i:i + n_vars]
        elif global_norm:
            stats["global_norm"] = tf.sqrt(totals[i])
        return stats

    def _clip(self, shard_grads, rank, stats):
        """Keras' clipping semantics, applied to the reduced gradient."""
        inner = self._inner
        if "sq_norms" in stats:
            sq = stats["sq_norms"]
            clipnorm = tf.constant(inner.clipnorm, tf.float32)
            # Keras' clip_by_norm, on the reduced per-variable norm.
            norms = tf.where(sq > 0, tf.sqrt(tf.where(sq > 0, sq, tf.ones_like(sq))), sq)
            divisors = tf.maximum(norms, clipnorm)
            clipped = []
            for bucket, g in zip(self._plan.buckets, shard_grads):
                parts, covered = [], 0
                for p in bucket.shard_pieces(rank):
                    piece = g[p.offset:p.offset + p.size]
                    parts.append(piece * tf.cast(clipnorm, g.dtype)
                                 / tf.cast(divisors[p.variable], g.dtype))
                    covered += p.size
                if covered < bucket.shard_size:
                    parts.append(g[covered:])
                clipped.append(tf.concat(parts, 0) if len(parts) > 1 else parts[0])
            return clipped
        if "global_norm" in stats:
            use_norm = stats["global_norm"]
            clip = tf.constant(inner.global_clipnorm, tf.float32)
            # Keras' clip_by_global_norm: NaN scale for a non-finite norm.
            scale_for_finite = clip * tf.minimum(1.0 / use_norm, 1.0 / clip)
            scale = scale_for_finite + (use_norm - use_norm)
            return [g * tf.cast(scale, g.dtype) for g in shard_grads]
        if inner.clipvalue and inner.clipvalue > 0:
            v = inner.clipvalue
            return [tf.clip_by_value(g, -v, v) for g in shard_grads]
        return shard_grads

    def _all_gather_into_model(self, missing):
        gathered = {}
        for bucket, shard_var in zip(self._plan.buckets, self._shard_variables):
            if bucket.index in self._owned_buckets:
                self._constrain_owned(bucket, shard_var, missing)
                continue
            gathered[bucket.index] = collectives.all_gather(
                _private.local_component(shard_var).read_value())
        for i, var in enumerate(self._model_variables):
            if i in missing or i in self._owned_variables:
                continue
            parts = [gathered[b][s.offset:s.offset + s.size]
                     for b, s in self._plan.variable_segments(i)]
            if not parts:
                continue
            value = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
            value = tf.reshape(value, var.shape)
            if var.constraint is not None:
                value = var.constraint(value)
            _private.local_component(var).assign(tf.cast(value, var.dtype))

    @property
    def _owned_variables(self):
        return {self._plan.buckets[b].segments[0].variable for b in self._owned_buckets}

    def _constrain_owned(self, bucket, shard_var, missing):
        """A constraint needs the whole weight: gather, constrain, keep the shard."""
        i = bucket.segments[0].variable
        var = self._model_variables[i]
        if var.constraint is None or i in missing:
            return
        local = _private.local_component(shard_var)
        full = collectives.all_gather(local.read_value())
        value = var.constraint(tf.reshape(full[:bucket.size], var.shape))
        flat = _flat(tf.cast(value, bucket.dtype))
        if bucket.padding:
            flat = tf.concat([flat, tf.zeros([bucket.padding], bucket.dtype)], 0)
        lo, hi = bucket.shard_range(collectives.rank())
        local.assign(flat[lo:hi])

    # ---- serialization ----------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self._inner),
            "stage": self._requested_stage,
            "bucket_size_bytes": self._requested_bucket_size,
            "reduce_dtype": self._requested_reduce_dtype,
            "accumulation_steps": self._accumulation_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _accumulation():
    # accumulation.py defines a ZeroOptimizer subclass, so it imports this
    # module; this one reaches it lazily.
    from tf_zero import accumulation

    return accumulation


def _check_supported(inner):
    for klass in type(inner).__mro__:
        if klass.__name__ in WHOLE_TENSOR_OPTIMIZERS and klass.__module__.startswith("keras"):
            raise ValueError(
                f"{klass.__name__} updates each variable as a whole tensor, so "
                "tf_zero cannot split it across replicas without changing its "
                "math, and does not shard it yet. Use an element-wise optimizer "
                "(SGD, Adam, AdamW, Adamax, Nadam, RMSprop, Adagrad, Adadelta, "
                f"Ftrl, Lion) or train {klass.__name__} unwrapped.")
    if inner.use_ema:
        raise ValueError(
            "ZeroOptimizer does not support use_ema=True on the inner optimizer "
            "(the moving average would need the full weights); drop use_ema or "
            "keep an EMA in a callback.")
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "Keras' gradient_accumulation_steps is not supported inside "
            "ZeroOptimizer (it also fails under MirroredStrategy, "
            "keras-team/keras#20582). Use tf_zero.GradientAccumulationOptimizer("
            "inner, steps=k) instead, and remove it from the inner optimizer.")


# Optimizers whose build() initializes a slot from the variable's value; the
# shards do not hold their values yet when build() runs on all replicas at once.
_SLOTS_INITIALIZED_FROM_VARIABLE = {"ScheduleFreeAdamW": ("momentum",)}


def _keras_view(tf_variable, name):
    """A `keras.Variable` whose storage is an existing `tf.Variable`."""

    def existing(next_creator, **kwargs):
        return tf_variable

    with tf.variable_creator_scope(existing):
        return keras.Variable(initializer="zeros", shape=tuple(tf_variable.shape),
                              dtype=tf_variable.dtype.name, trainable=False, name=name,
                              synchronization="on_read", aggregation="only_first_replica")


def _per_replica_creator(next_creator, **kwargs):
    # Slots of a shard hold different values on every replica: make them
    # sync-on-read so replica-context writes land on the local copy only.
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    kwargs["trainable"] = False
    return next_creator(**kwargs)


def _inner_in_scope(inner, strategy):
    """The inner optimizer with its own variables owned by `strategy`."""
    iterations = _private.tf_variable(inner.iterations)
    if strategy.extended.variable_created_in_scope(iterations):
        return inner
    if inner.built and inner.variables[2:]:
        raise ValueError(
            f"The inner optimizer {inner.name} already holds state created "
            "outside strategy.scope(). Create it inside the scope, or pass a "
            "fresh optimizer: ZeroOptimizer(keras.optimizers.Adam(...)).")
    count = int(inner.iterations.numpy())
    fresh = type(inner).from_config(inner.get_config())
    fresh.iterations.assign(count)
    return fresh


def _match_slots(inner, shards, slots):
    """Groups the inner optimizer's new variables by the shard they belong to.

    Keras names a slot `{reference.path with '/' -> '_'}_{slot name}`. A slot
    that matches no shard by name and shape means the optimizer is not
    element-wise: refuse it rather than mis-shard it.
    """
    by_bucket = [[] for _ in shards]
    prefixes = [(i, s.path.replace("/", "_") + "_") for i, s in enumerate(shards)]
    prefixes.sort(key=lambda p: -len(p[1]))
    for slot in slots:
        for i, prefix in prefixes:
            if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(shards[i].shape):
                by_bucket[i].append(slot)
                break
        else:
            raise ValueError(
                f"{type(inner).__name__} created the variable {slot.name} of shape "
                f"{tuple(slot.shape)}, which is not an element-wise slot of a "
                "shard; tf_zero cannot shard this optimizer. Train it unwrapped.")
    return by_bucket
