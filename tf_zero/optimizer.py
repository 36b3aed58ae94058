"""ZeroOptimizer: Keras' optimizer face of the sharded step.

On each step, in replica context, the local gradients are laid into flat
buckets following a `tf_zero.plan.ShardPlan` and reduce-scattered, so each
replica receives the summed gradient of its 1/N slice of every bucket. One
small all-reduce gives the true global statistics (gradient norms, the
loss-scale overflow flag). The inner optimizer's own `update_step` updates the
replica's slice of the weights with slots that exist only for that slice, and
the slices are all-gathered back into every replica's model weights, which
stay bitwise identical and remain the source of truth. Stage-3 weights
(created sharded under `ZeroStrategy(stage=3).scope()`) arrive with reduced
gradients and are updated in place. Clipping and weight decay are taken from
the inner optimizer and applied to the *reduced* gradient, as in
single-device training on the global batch.

The class here validates its arguments (`tf_zero.support`), builds the state
(`tf_zero.shards`), hands every `apply` to the step (`tf_zero.step`, which
describes the chain part by part), forwards Keras' optimizer interface to the
inner optimizer, and presents checkpoints as the plain inner optimizer's
(`tf_zero.sharded_state`). `GradientAccumulationOptimizer` is the same
optimizer with k > 1 micro-batches per update (`tf_zero.accumulation`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private, sharded_state, support, update
from tf_zero.accumulation import Accumulator, check_steps
from tf_zero.config import DEFAULT_BUCKET_SIZE_BYTES, ZeroConfig
from tf_zero.plan import ShardPlan
from tf_zero.shards import Shards, build_shards, inner_in_scope, per_replica_creator
from tf_zero.step import ShardedStep

class _Inspection:
    """What a built `ZeroOptimizer` holds, read-only (for users and `memory_report`)."""

    @property
    def zero_config(self) -> ZeroConfig | None:
        """The resolved configuration (known after `build`)."""
        return self._zero_config

    @property
    def shards(self) -> Shards | None:
        """The sharded state (known after `build`; None when not sharded)."""
        return self._shards

    @property
    def plan(self) -> ShardPlan | None:
        """The shard plan (known after `build`; None when not sharded)."""
        return self._shards.plan if self._shards is not None else None

    @property
    def stage(self):
        return self._zero_config.stage if self._zero_config else self._requested["stage"]

    @property
    def is_sharded(self) -> bool:
        return self._shards is not None

    @property
    def partition(self) -> str:
        """"element" (every variable split across replicas) or "whole"."""
        return self._partition

    @property
    def accumulation_steps(self) -> int:
        return self._accumulation_steps

    @property
    def gradient_buffers(self):
        """Gradient buffers kept between steps (accumulators; none if k=1)."""
        return list(self._accumulator.buffers) if self._accumulator else []

    def unsharded_gradient_buffer_bytes(self) -> int:
        """Bytes of accumulators an unsharded optimizer keeps per replica."""
        if self._accumulator is None or self._shards is None:
            return 0
        return self._accumulator.unsharded_bytes(self._shards.plan)


@keras.saving.register_keras_serializable(package="tf_zero")
class ZeroOptimizer(_Inspection, keras.optimizers.Optimizer):
    """ZeRO stages 1-3 around any Keras optimizer.

    See the module docstring for the algorithm. Built by `model.fit`, by
    `optimizer.build(variables)` under `strategy.scope()`, or by the first
    `apply_gradients` (also inside `strategy.run`, traced or eager). With no
    distribution strategy it delegates to the inner optimizer and behaves
    exactly like it.

    Args:
        inner_optimizer: a Keras optimizer (SGD, Adam, AdamW, ...). If it was
            created outside `strategy.scope()` and has not been built, it is
            re-created under the scope from its config on `build`.
        stage: 1, 2 or 3; default: the strategy's stage (a `ZeroStrategy`),
            else 1. `stage=3` on a model without sharded weights is an error.
        bucket_size_bytes: default: the strategy's, else 8 MiB.
        reduce_dtype: dtype of the gradient reduce-scatter; default: the
            strategy's, else each bucket's own.
        accumulation_steps: micro-batches per update (see
            `GradientAccumulationOptimizer`).
        partition: "element" (each variable split across replicas) or
            "whole" (each variable owned whole by one replica, for optimizers
            whose update needs the whole tensor); default: "whole" for Lamb,
            Adafactor and Muon, "element" for the others.
        name: optimizer name.

    Raises:
        TypeError: `inner_optimizer` is not a Keras optimizer.
        ValueError: the inner optimizer uses EMA or Keras'
            `gradient_accumulation_steps`, `partition="element"` is asked of an
            optimizer that needs whole tensors, or an argument is invalid.
    """

    # A ZeroOptimizer passed to ZeroOptimizer(...) is refused; the subclass
    # GradientAccumulationOptimizer sets this to be unwrapped instead.
    _wrappable = False

    def __init__(self, inner_optimizer, *, stage=None, bucket_size_bytes=None,
                 reduce_dtype=None, accumulation_steps=1, partition=None, name=None,
                 **kwargs):
        if isinstance(inner_optimizer, ZeroOptimizer) and inner_optimizer._wrappable:
            # ZeroOptimizer(GradientAccumulationOptimizer(opt, k)) is the same
            # optimizer as GradientAccumulationOptimizer(ZeroOptimizer(opt), k).
            accumulation_steps = inner_optimizer.accumulation_steps
            partition = partition or inner_optimizer.get_config()["partition"]
            inner_optimizer, stage, bucket_size_bytes, reduce_dtype = _unwrap(
                inner_optimizer, stage, bucket_size_bytes, reduce_dtype)
        support.validate(inner_optimizer, stage, bucket_size_bytes, reduce_dtype,
                         accumulation_steps, kwargs)
        super().__init__(learning_rate=0.0, name=name or f"zero_{inner_optimizer.name}")
        self._inner = inner_optimizer
        self._requested = {"stage": stage, "bucket_size_bytes": bucket_size_bytes,
                           "reduce_dtype": reduce_dtype, "partition": partition}
        self._partition = support.choose_partition(inner_optimizer, partition)
        self._accumulation_steps = accumulation_steps
        self._accumulator = None
        self._zero_config = None
        self._model_variables = []
        self._shards = None
        self._step = None
        self._pending_load = None
        self._checkpoint = sharded_state.CheckpointFace(inner_optimizer)

    # ---- forwarding ------------------------------------------------------------

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
        if self.built and len(self._checkpoint.items):
            return list(self._checkpoint.items)
        return self._variables + self._inner.variables

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay."""
        self._inner.exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def _clip_gradients(self, grads):
        # The inner optimizer's clipping of the given gradients; the step
        # itself applies the same clipping to the reduced gradient.
        return _private.clip_gradients(self._inner, grads)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise ValueError("ZeroOptimizer is stateful; stateless_apply is not supported.")

    def finalize_variable_values(self, var_list):
        """At the end of `fit`: with `use_ema`, the model takes the averages.

        (Sharded: each average is read whole, from its shards or owner, and
        written to every replica's copy of its variable.)
        """
        if self._shards is not None:
            update.overwrite_with_averages(self._shards, self._checkpoint.items)
        else:
            self._inner.finalize_variable_values(var_list)

    # ---- build ---------------------------------------------------------------

    def build(self, var_list):
        """Creates the shards and slots for `var_list`.

        Called in replica context (the first `apply_gradients` inside
        `strategy.run`, traced or eager, or a wrapping `LossScaleOptimizer`'s
        own build), every replica reaches a `merge_call` and the build runs
        once, in cross-replica context and eagerly (`tf.init_scope` lifts it
        out of a function being traced): the same state as an explicit build.
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

    @_private.without_keras_tracking
    def _build(self, var_list):
        strategy = tf.distribute.get_strategy()
        config = self._zero_config = _resolve_config(self._requested, strategy)
        self._model_variables = [v for v in var_list
                                 if v.trainable and keras.backend.is_float_dtype(v.dtype)]
        if self._accumulation_steps > 1:
            self._accumulator = Accumulator(self._accumulation_steps)
        if not tf.distribute.has_strategy() or isinstance(
                strategy, tf.distribute.OneDeviceStrategy):
            with _private.keras_tracking():  # as the plain optimizer would build
                self._inner.build(var_list)
            self._checkpoint.add_unsharded(self._inner, var_list)
            if self._accumulator:
                self._accumulator.build_unsharded(self._model_variables)
        else:
            self._inner = inner = inner_in_scope(self._inner, strategy)
            if self._partition == "whole":
                support.check_whole_partition(inner, config, self._model_variables)
            support.check_stage3(config, strategy, self._model_variables,
                                 support.all_optimizers(inner))
            self._shards = build_shards(inner, self._model_variables, strategy,
                                        config.bucket_size_bytes, config.reduce_dtype,
                                        partition=self._partition)
            for v in self._shards.storage:
                self._track_variable(v)
            self._checkpoint.add_sharded(inner, self._shards)
            if self._accumulator:
                with tf.variable_creator_scope(per_replica_creator):
                    self._accumulator.build_sharded(self._shards, config.stage)
            self._step = ShardedStep(self._shards, inner, self._accumulator)
            # Every buffer the step writes, allocated now rather than by the
            # first step's copy-on-write among its temporaries.
            _private.own_buffers([
                *self._model_variables, *self._shards.storage, *self.gradient_buffers,
                *(v for opt in support.all_optimizers(inner) for v in opt.variables)])
        super().build(var_list)
        if self._pending_load is not None:
            values, self._pending_load = self._pending_load, None
            self.load_own_variables(values)

    # ---- step ----------------------------------------------------------------

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
        if self._shards is None:
            if self._accumulator:
                return self._accumulator.unsharded_micro_step(
                    grads, trainable_variables or self._model_variables,
                    self._model_variables, self._inner.apply)
            return self._inner.apply(grads, trainable_variables)
        if tf.distribute.in_cross_replica_context():
            raise ValueError(
                "ZeroOptimizer.apply must be called in replica context: call it "
                "from the function passed to strategy.run.")
        variables = trainable_variables or self._model_variables
        if len(grads) != len(variables):
            raise ValueError(f"got {len(grads)} gradients for {len(variables)} variables")
        with keras.name_scope(self.name, caller=self):
            self._step(grads, variables, loss_scaler)

    def _apply_scaled(self, loss_scale_optimizer, grads, trainable_variables):
        """Called by a wrapping `LossScaleOptimizer`; False: let it handle it.

        The overflow check runs on the reduced gradient shards and is agreed
        by all replicas through the statistics all-reduce, so an overflow on
        any replica makes every replica skip the step and lower the scale.
        """
        if self.built and self._shards is None:
            return False
        if not self.built and not tf.distribute.has_strategy():
            return False
        self._apply(grads, trainable_variables, loss_scaler=loss_scale_optimizer)
        return True

    # ---- checkpoints: the plain inner optimizer's face -----------------------

    def _obj_type(self):
        _private.register_keras_saving_skiplist("ZeroOptimizer", ("inner_optimizer", "_inner"))
        return "ZeroOptimizer"

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return self._checkpoint.children(self._inner, save_type, **kwargs)

    def save_own_variables(self, store):
        """Writes the plain inner optimizer's variables, slots unsharded."""
        self._checkpoint.save(store)

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
        self._checkpoint.load(values, self.name, type(self._inner).__name__)

    # ---- serialization -------------------------------------------------------

    def get_config(self):
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self._inner),
                **self._requested, "accumulation_steps": self._accumulation_steps}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


@keras.saving.register_keras_serializable(package="tf_zero")
class GradientAccumulationOptimizer(ZeroOptimizer):
    """Applies the mean gradient of every `steps` micro-batches.

    Wraps a plain Keras optimizer or a `ZeroOptimizer` (whose stage and bucket
    size it keeps); `ZeroOptimizer(GradientAccumulationOptimizer(...))` gives
    the same optimizer. `tf_zero.accumulation` states the exact semantics.

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
        steps = check_steps(steps if steps is not None else accumulation_steps)
        if isinstance(inner_optimizer, ZeroOptimizer):
            if inner_optimizer.accumulation_steps > 1:
                raise ValueError(
                    "The inner optimizer already accumulates gradients; wrap the "
                    "plain optimizer once: GradientAccumulationOptimizer(Adam(), steps=k).")
            kwargs.setdefault("partition", inner_optimizer.get_config()["partition"])
            inner_optimizer, stage, bucket_size_bytes, reduce_dtype = _unwrap(
                inner_optimizer, stage, bucket_size_bytes, reduce_dtype)
        super().__init__(inner_optimizer, stage=stage, bucket_size_bytes=bucket_size_bytes,
                         reduce_dtype=reduce_dtype, accumulation_steps=steps,
                         name=name or f"accumulate_{inner_optimizer.name}", **kwargs)

    @property
    def steps(self) -> int:
        return self.accumulation_steps

    def get_config(self):
        config = super().get_config()
        config["steps"] = config.pop("accumulation_steps")
        return config


def _unwrap(zero_optimizer, stage, bucket_size_bytes, reduce_dtype):
    """(inner optimizer, stage, bucket size, reduce dtype) for a wrapper of
    `zero_optimizer`: the wrapper's explicit settings, else its."""
    config = zero_optimizer.get_config()
    return (zero_optimizer.inner_optimizer, stage or config["stage"],
            bucket_size_bytes or config["bucket_size_bytes"],
            reduce_dtype or config["reduce_dtype"])


def _resolve_config(requested, strategy) -> ZeroConfig:
    base = getattr(strategy, "zero_config", None)
    return ZeroConfig(
        stage=requested["stage"] or (base.stage if base else 1),
        bucket_size_bytes=requested["bucket_size_bytes"] or (
            base.bucket_size_bytes if base else DEFAULT_BUCKET_SIZE_BYTES),
        reduce_dtype=requested["reduce_dtype"] or (base.reduce_dtype if base else None))
