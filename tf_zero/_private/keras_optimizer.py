"""Keras optimizer internals: the backend update step, the loss-scale
optimizer's apply, the `.keras` saving walker, and the state accessors
tf_zero's optimizer reads."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tf_zero._private.distribute import sharded_storage

# Keras' TensorFlow optimizer routes `_backend_update_step` through
# `merge_call` + `extended.update`, which would update a shard as if it were
# a mirrored variable. An inner optimizer driven by tf_zero runs the plain
# backend-agnostic loop instead (still calling any subclass override first,
# e.g. Nadam's per-step momentum-product update). Installed by `patches`.
from keras.src.backend.tensorflow import optimizer as _keras_tf_optimizer  # noqa: E402
from keras.src.optimizers import base_optimizer as _keras_base_optimizer  # noqa: E402

_tf_backend_update_step = _keras_tf_optimizer.TFOptimizer._backend_update_step


def _local_backend_update_step(self, grads, trainable_variables, learning_rate):
    if getattr(self, "_tf_zero_local_update", False):
        return _keras_base_optimizer.BaseOptimizer._backend_update_step(
            self, grads, trainable_variables, learning_rate)
    refuse_sharded_weights(self, trainable_variables)
    return _tf_backend_update_step(self, grads, trainable_variables, learning_rate)


# A Keras optimizer that tf_zero does not drive cannot train a weight stored as
# shards: its build colocates each slot with the weight, which TensorFlow
# refuses for anything but a variable of the strategy ('colocate_vars_with'),
# and its update would write the weight as a mirrored variable. It is refused
# when it is built on such weights (`_build_refusing_sharded`, installed by
# `patches`), before any of its variables exists, and when asked to update.

def updates_shards(optimizer) -> bool:
    """Whether tf_zero drives `optimizer`'s updates: a `ZeroOptimizer`, an
    inner optimizer it updates shards with, or a wrapper (a Keras
    `LossScaleOptimizer`) of one."""
    while optimizer is not None:
        if (getattr(optimizer, "_tf_zero_local_update", False)
                or getattr(optimizer, "_tf_zero_updates_shards", False)):
            return True
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return False


def refuse_sharded_weights(optimizer, variables) -> None:
    """Raises, naming the fix, if `optimizer` is a Keras optimizer tf_zero does
    not drive and one of `variables` is stored as shards.

    Raises:
        ValueError: a weight is a stage-3 `ShardedVariable` or a
            `WorkingVariable` and `optimizer` is not (around) a ZeroOptimizer.
    """
    if updates_shards(optimizer):
        return
    for v in variables:
        if sharded_storage(v) is not None:
            name = type(optimizer).__name__
            inner = getattr(optimizer, "inner_optimizer", None)
            fix = (f"{name}(tf_zero.ZeroOptimizer({type(inner).__name__}(...)))"
                   if inner is not None else f"tf_zero.ZeroOptimizer({name}(...))")
            raise ValueError(
                f"{getattr(v, 'path', v.name)} is stored by ZeroStrategy as float32 shards "
                f"(stage 3, or a 16-bit working copy at stages 1-2); {name} cannot "
                f"train it. Compile with {fix} to train (evaluate and predict work with "
                "any optimizer).")


def can_update(optimizer, variables) -> bool:
    """Whether `refuse_sharded_weights(optimizer, variables)` passes."""
    return updates_shards(optimizer) or not any(
        sharded_storage(v) is not None for v in variables)


_keras_tf_optimizer_build = _keras_tf_optimizer.TFOptimizer.build


def _build_refusing_sharded(self, variables):
    refuse_sharded_weights(self, variables)
    return _keras_tf_optimizer_build(self, variables)



def mark_local_update(optimizer) -> None:
    """Makes `optimizer._backend_update_step` update replica-local shards."""
    optimizer._tf_zero_local_update = True


# Checkpointing: the base class of objects that serialize themselves, and the
# key TensorFlow uses for a variable's value.
Trackable = tf.__internal__.tracking.Trackable
VARIABLE_VALUE_KEY = "VARIABLE_VALUE"


def register_keras_saving_skiplist(obj_type: str, extra=()) -> None:
    """Makes Keras' `.keras` / `.weights.h5` walker skip `extra` attributes.

    Keras saves every attribute of an optimizer that is itself saveable; a
    ZeroOptimizer saves its inner optimizer's state itself (unsharded), so
    the walker must not also save the inner optimizer's raw shards.
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    key = f"saving_attr_skiplist_{obj_type}"
    if global_state.get_global_attribute(key, None) is None:
        skipset = set(saving_lib.get_attr_skipset("Optimizer")) | set(extra)
        global_state.set_global_attribute(key, skipset)


# Keras' LossScaleOptimizer decides on overflow from replica 0's unreduced
# gradients. When its inner optimizer is a sharded ZeroOptimizer, the inner
# optimizer's `_apply_scaled` runs the whole step instead (step/loss_scale.py).
# Installed by `patches`.
from keras.src.optimizers import loss_scale_optimizer as _keras_lso  # noqa: E402

_keras_lso_tf_apply = _keras_lso.LossScaleOptimizer._tf_apply


def _lso_tf_apply(self, grads, trainable_variables=None):
    handler = getattr(self.inner_optimizer, "_apply_scaled", None)
    if handler is not None and handler(self, grads, trainable_variables):
        return None
    return _keras_lso_tf_apply(self, grads, trainable_variables)



def iterations_variable(optimizer):
    """The optimizer's step counter variable."""
    return optimizer._iterations


def learning_rate_variable(optimizer):
    """The optimizer's learning-rate variable, or None (a schedule or a float)."""
    lr = getattr(optimizer, "_learning_rate", None)
    return lr if isinstance(lr, keras.Variable) else None


def trained_variables(optimizer) -> list:
    """The model variables a built Keras optimizer updates."""
    return list(getattr(optimizer, "_trainable_variables", []))


def accumulated_gradients(optimizer) -> list:
    """Keras' own gradient-accumulation buffers, if the optimizer has them."""
    return list(getattr(optimizer, "_accumulated_gradients", None) or [])


def update_step(optimizer, grads, variables, learning_rate) -> None:
    """The optimizer's update of `variables` (its `update_step` per variable)."""
    optimizer._backend_update_step(grads, variables, learning_rate)


def clip_gradients(optimizer, grads):
    """The optimizer's clipnorm / global_clipnorm / clipvalue of `grads`."""
    return optimizer._clip_gradients(grads)


def uses_weight_decay(optimizer, variable) -> bool:
    """Whether the optimizer's weight decay applies to `variable`."""
    return optimizer._use_weight_decay(variable)


def trackable_children(obj, save_type, **kwargs) -> dict:
    """An object's checkpoint dependencies, by name."""
    return obj._trackable_children(save_type, **kwargs)


def keras_view(tf_variable, like=None, name=None, **kwargs):
    """A `keras.Variable` whose storage is an existing `tf.Variable`.

    With `like`, the view takes that Keras variable's name and path (optimizers
    name their slots after the path, and Muon decides by it).
    """

    def existing(next_creator, **_):
        return tf_variable

    with tf.variable_creator_scope(existing):
        view = keras.Variable(initializer="zeros", shape=tuple(tf_variable.shape),
                              dtype=tf_variable.dtype.name, trainable=False,
                              name=name or (like.name if like is not None else None), **kwargs)
    if like is not None:
        view._path = like.path
    return view


def stand_in(like):
    """A zero-filled `keras.Variable` with `like`'s name, path, shape and dtype.

    Created in the current graph: inside `tf.Graph().as_default()` nothing is
    allocated, which is how every worker learns the shapes of slots it does
    not keep.
    """
    variable = keras.Variable(initializer="zeros", shape=tuple(like.shape),
                              dtype=like.dtype, name=like.name, trainable=like.trainable)
    variable._path = like.path
    return variable


def share_iterations(optimizer, iterations) -> None:
    """Makes `optimizer` count its steps in another optimizer's `iterations`."""
    optimizer._iterations = iterations


class _Unplaced:
    """Stands for a strategy where an optimizer places its variables itself."""

    class extended:  # noqa: N801 (the attribute Keras reads)
        @staticmethod
        def colocate_vars_with(variable):
            return contextlib.nullcontext()


def detach_from_strategy(optimizer) -> None:
    """Makes `optimizer` create its slots without the strategy's placement.

    Keras' TensorFlow optimizer remembers the strategy it was created under
    and colocates each slot with its (distributed) reference variable; an
    optimizer whose slots are plain variables on one device (placed by a
    variable creator) must not. Its update must run locally too
    (`mark_local_update`): the strategy is gone for it.
    """
    optimizer._distribution_strategy = _Unplaced()


@contextlib.contextmanager
def keras_tracking():
    """Keras' attribute tracking on, as in a plain optimizer's `build`.

    (ZeroOptimizer builds with it off; an inner optimizer whose `build`
    registers variables only through tracked lists, like Adafactor's
    placeholders, needs it on to hold what the plain optimizer holds.)
    """
    from keras.src.backend.common import global_state

    saved = global_state.get_global_attribute("tracking_on", True)
    global_state.set_global_attribute("tracking_on", True)
    try:
        yield
    finally:
        global_state.set_global_attribute("tracking_on", saved)


def without_keras_tracking(method):
    """Runs `method` with Keras' attribute tracking off (the optimizer's own
    state records hold variables that Keras must not collect)."""
    from keras.src.utils import tracking

    return tracking.no_automatic_dependency_tracking(method)


def is_multi_optimizer(optimizer) -> bool:
    """Whether `optimizer` is a `keras.optimizers.MultiOptimizer`."""
    # Keras has MultiOptimizer from 3.15 on; before it no optimizer is one.
    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    return multi is not None and isinstance(optimizer, multi)


def multi_optimizer_choices(multi, variables) -> list:
    """The optimizer a `keras.optimizers.MultiOptimizer` gives each variable.

    As its own `build` does: the map is asked once per variable, and an
    optimizer it returns that the MultiOptimizer did not know yet joins
    `multi.optimizers` (a callable map may create optimizers on demand).

    Raises:
        ValueError: the map returns something that is not a plain Keras
            optimizer (Keras refuses the same).
    """
    choices = []
    for variable in variables:
        opt = multi._optimizer_map(variable)
        if (not isinstance(opt, keras.optimizers.Optimizer)
                or isinstance(opt, keras.optimizers.LossScaleOptimizer)
                or is_multi_optimizer(opt)):
            raise ValueError(
                f"The MultiOptimizer's map gives {variable.path} the optimizer "
                f"{opt!r}; it must give a plain Keras optimizer (not a "
                "LossScaleOptimizer or MultiOptimizer).")
        if opt not in multi.optimizers:
            opt.loss_scale_factor = multi.loss_scale_factor
            multi.optimizers.append(opt)
        choices.append(opt)
    return choices


def muon_uses_adamw(muon, variable) -> bool:
    """Whether Keras' Muon updates `variable` with its element-wise AdamW."""
    return bool(muon._should_use_adamw(variable))


def own_variables(optimizer) -> list:
    """The variables Keras' base optimizer keeps itself (its step counter and
    learning rate), before any slot."""
    return list(optimizer._variables)


def track_variable(optimizer, variable) -> None:
    """Makes `variable` one of the optimizer's own variables (Keras' tracking)."""
    optimizer._track_variable(variable)


def variable_path(variable) -> str:
    """A Keras variable's path; for a raw `tf.Variable`, its name without ":0"."""
    path = getattr(variable, "path", None)
    return path if path is not None else variable.name.split(":")[0]


def slot_prefix(variable) -> str:
    """The prefix of the names Keras gives a variable's slots: its path with
    "/" turned into "_", then "_" (`add_variable_from_reference`)."""
    return variable_path(variable).replace("/", "_") + "_"


# Optimizers whose build() initializes a slot from its variable's value, by
# Keras class name: (slot names).
_SLOTS_INITIALIZED_FROM_VARIABLE = {"ScheduleFreeAdamW": ("momentum",)}


def slots_initialized_from_variable(optimizer) -> tuple:
    """Names of the slots `optimizer.build` fills from the variable's value
    (not zeros), which a sharded build must fill from the shard afterwards."""
    return _SLOTS_INITIALIZED_FROM_VARIABLE.get(type(optimizer).__name__, ())
