"""ZeroOptimizer: Keras' optimizer face of the sharded step.

The class validates its arguments (`tf_zero.state.admission`), builds once
through `tf_zero.state.build.build_state`, hands every `apply` to the step
(`tf_zero.step.chain`), forwards Keras' optimizer interface to the inner
optimizer, and presents checkpoints as the plain inner optimizer's
(`tf_zero.checkpoint.optimizer_state`). `GradientAccumulationOptimizer` is
the same optimizer with k > 1 micro-batches per update. The algorithm:
docs/architecture.md.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.checkpoint.optimizer_state import CheckpointFace
from tf_zero.config import Partition, ZeroConfig, positive_int
from tf_zero.plan.layout import ShardPlan
from tf_zero.state import admission
from tf_zero.state.build import build_state
from tf_zero.state.partition import choose_partition
from tf_zero.state.shards import Shards
from tf_zero.step.update import overwrite_with_averages

_SETTINGS = ("stage", "bucket_size_bytes", "reduce_dtype", "partition")


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
    def partition(self) -> Partition:
        """`Partition.ELEMENT` (every variable split across replicas) or
        `Partition.WHOLE` (a `str` enum: it equals "element" or "whole")."""
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

    On each step, in replica context, the local gradients are laid into flat
    buckets (`tf_zero.plan`) and reduce-scattered, so each replica receives
    the summed gradient of its 1/N slice; one small all-reduce gives the true
    global statistics (norms, the loss-scale overflow flag); the inner
    optimizer's own `update_step` updates the replica's slice with slots that
    exist only for it; the slices are all-gathered back into every replica's
    weights. Stage-3 weights arrive with reduced gradients and are updated in
    place. Clipping and weight decay apply to the reduced gradient, as in
    single-device training on the global batch. Built by `model.fit`, by
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
        ValueError: the inner optimizer uses Keras'
            `gradient_accumulation_steps`, `partition="element"` is asked of an
            optimizer that needs whole tensors, or an argument is invalid.
    """

    # A ZeroOptimizer passed to ZeroOptimizer(...) is refused; the subclass
    # GradientAccumulationOptimizer sets this to be unwrapped instead.
    _wrappable = False
    # Keras optimizers not driven by tf_zero are refused on sharded weights
    # (`tf_zero._private.refuse_sharded_weights`); this one updates them.
    _tf_zero_updates_shards = True

    def __init__(self, inner_optimizer, *, stage=None, bucket_size_bytes=None,
                 reduce_dtype=None, accumulation_steps=1, partition=None, name=None,
                 **kwargs):
        requested = {"stage": stage, "bucket_size_bytes": bucket_size_bytes,
                     "reduce_dtype": reduce_dtype, "partition": partition}
        if isinstance(inner_optimizer, ZeroOptimizer) and inner_optimizer._wrappable:
            # ZeroOptimizer(GradientAccumulationOptimizer(opt, k)) is the same
            # optimizer as GradientAccumulationOptimizer(ZeroOptimizer(opt), k).
            accumulation_steps = inner_optimizer.accumulation_steps
            inner_optimizer, requested = _settings_under(inner_optimizer, requested)
        requested, accumulation_steps = admission.validate(
            inner_optimizer, requested, accumulation_steps, kwargs)
        super().__init__(learning_rate=0.0, name=name or f"zero_{inner_optimizer.name}")
        self._inner = inner_optimizer
        self._requested = requested
        self._partition = choose_partition(inner_optimizer, requested["partition"])
        self._accumulation_steps = accumulation_steps
        self._accumulator = None
        self._zero_config = None
        self._model_variables = []
        self._shards = None
        self._step = None
        self._pending_load = None
        self._checkpoint = CheckpointFace(inner_optimizer)

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
        return _private.own_variables(self) + self._inner.variables

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
            overwrite_with_averages(self._shards, self._checkpoint.items)
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
        state = build_state(self._inner, var_list, self._requested, self._partition,
                            self._accumulation_steps, self._checkpoint)
        self._inner, self._zero_config = state.inner, state.config
        self._model_variables = list(state.model_variables)
        self._accumulator, self._shards, self._step = state.accumulator, state.shards, state.step
        for v in state.shards.storage if state.shards is not None else ():
            _private.track_variable(self, v)
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
        requested = dict(self._requested)
        if requested["partition"] is not None:
            requested["partition"] = str(requested["partition"])
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self._inner),
                **requested, "accumulation_steps": self._accumulation_steps}

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
                 reduce_dtype=None, name=None, accumulation_steps=None, partition=None,
                 **kwargs):
        steps = positive_int("steps", steps if steps is not None else accumulation_steps)
        requested = {"stage": stage, "bucket_size_bytes": bucket_size_bytes,
                     "reduce_dtype": reduce_dtype, "partition": partition}
        if isinstance(inner_optimizer, ZeroOptimizer):
            if inner_optimizer.accumulation_steps > 1:
                raise ValueError(
                    "The inner optimizer already accumulates gradients; wrap the "
                    "plain optimizer once: GradientAccumulationOptimizer(Adam(), steps=k).")
            inner_optimizer, requested = _settings_under(inner_optimizer, requested)
        super().__init__(inner_optimizer, accumulation_steps=steps,
                         name=name or f"accumulate_{inner_optimizer.name}",
                         **requested, **kwargs)

    @property
    def steps(self) -> int:
        return self.accumulation_steps

    def get_config(self):
        config = super().get_config()
        config["steps"] = config.pop("accumulation_steps")
        return config


def _settings_under(zero_optimizer, requested: dict):
    """(inner optimizer, settings) of a wrapper of `zero_optimizer`: the
    wrapper's explicit settings, else the wrapped one's."""
    config = zero_optimizer.get_config()
    return zero_optimizer.inner_optimizer, {
        key: requested[key] if requested[key] is not None else config[key]
        for key in _SETTINGS}
