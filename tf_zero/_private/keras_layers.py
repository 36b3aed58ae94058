"""Keras layer internals stage 3 needs: the autocast scope, the layer whose
`add_weight` is creating a variable, a layer's own weights and losses."""

from __future__ import annotations

import sys

import keras

# Stage 3 reads Keras' mixed-precision autocast scope (to gather weights in
# the compute dtype and to restore the scope when a layer is recomputed) and
# finds the layer whose `add_weight` is creating a variable.
from keras.src.backend.common import variables as _keras_variables  # noqa: E402


def autocast_dtype():
    """The dtype Keras casts float variables to in the current layer call, or None."""
    scope = _keras_variables.get_autocast_scope()
    return None if scope is None else scope.dtype


def autocast_scope(dtype):
    """Keras' autocast context for `dtype` (None: no casting)."""
    return _keras_variables.AutocastScope(dtype)


def layer_adding_weight():
    """(layer, autocast) of the `Layer.add_weight` call on the stack, else (None, True).

    Keras creates a layer's weights through `Layer.add_weight`, which builds a
    `keras.Variable`, whose TensorFlow backend calls `tf.Variable`: a variable
    creator sees the call but not the layer. The layer and the weight's
    `autocast` flag are the caller's arguments, read from its frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "add_weight":
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.layers.Layer):
                return owner, bool(frame.f_locals.get("autocast", True))
        frame = frame.f_back
    return None, True


def own_trainable_variables(layer) -> list:
    """The trainable variables a layer created itself (not its sublayers')."""
    return list(layer._trainable_variables)


def added_loss_count(layer) -> int:
    """How many losses `add_loss` has recorded on the layer and its sublayers."""
    return sum(len(sub._losses) for sub in layer._flatten_layers())
