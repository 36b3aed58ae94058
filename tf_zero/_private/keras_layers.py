"""Keras layer internals stage 3 needs: the autocast scope, the layer whose
`add_weight` is creating a variable, a layer's own weights and losses, and
the assignment of a weight read from a file."""

from __future__ import annotations

import sys

import keras
import numpy as np

# Stage 3 reads Keras' mixed-precision autocast scope (to gather weights in
# the compute dtype and to restore the scope when a layer is recomputed) and
# finds the layer whose `add_weight` is creating a variable.
from keras.src.backend.common import variables as _keras_variables  # noqa: E402
from keras.src.backend.tensorflow import core as _keras_tf_core  # noqa: E402

KERAS_TF_VARIABLE = _keras_tf_core.Variable


def autocast_dtype():
    """The dtype Keras casts float variables to in the current layer call, or None."""
    scope = _keras_variables.get_autocast_scope()
    return None if scope is None else scope.dtype


def autocast_scope(dtype):
    """Keras' autocast context for `dtype` (None: no casting)."""
    return _keras_variables.AutocastScope(dtype)


def add_weight_arguments() -> dict:
    """The arguments of the `Layer.add_weight` call on the stack: "layer",
    "autocast" and "regularizer" (no call: layer None, autocast True).

    Keras creates a layer's weights through `Layer.add_weight`, which builds a
    `keras.Variable`, whose TensorFlow backend calls `tf.Variable`: a variable
    creator sees the call but not the layer. The layer and the weight's
    arguments are the caller's, read from its frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "add_weight":
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.layers.Layer):
                return {"layer": owner, "autocast": bool(frame.f_locals.get("autocast", True)),
                        "regularizer": frame.f_locals.get("regularizer")}
        frame = frame.f_back
    return {"layer": None, "autocast": True, "regularizer": None}


def layer_adding_weight():
    """(layer, autocast) of the `Layer.add_weight` call on the stack, else (None, True)."""
    arguments = add_weight_arguments()
    return arguments["layer"], arguments["autocast"]


def own_trainable_variables(layer) -> list:
    """The trainable variables a layer created itself (not its sublayers')."""
    return list(layer._trainable_variables)


def added_loss_count(layer) -> int:
    """How many losses `add_loss` has recorded on the layer and its sublayers."""
    return sum(len(sub._losses) for sub in layer._flatten_layers())


def assign_arrays_to_shards(original):
    """Keras' `Variable.assign`, which hands a NumPy value to tf_zero's storage.

    Keras' loaders (`load_weights`, `from_preset`) read each weight from its
    file as a NumPy array and `assign` converts it to a tensor first: a
    second full copy on the host. tf_zero's storage writes each replica's
    shard from a view of the array instead (`ShardedStorage.assign`).
    """

    def assign(self, value):
        storage = getattr(self, "_value", None)
        if (not isinstance(value, np.ndarray) or not hasattr(storage, "_tf_zero_shard")
                or _keras_variables.in_stateless_scope()):
            return original(self, value)
        if tuple(value.shape) != tuple(self.shape):
            return original(self, value)  # Keras' own error
        storage.assign(value)
        return value

    assign.__wrapped__ = original
    return assign
