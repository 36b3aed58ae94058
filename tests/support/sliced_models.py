"""Small trained and fresh models for the sliced-checkpoint tests."""

import keras
import numpy as np
import tensorflow as tf
from conftest import mlp, regression_data, zero_strategy

import tf_zero


def sliced_strategy(n, stage):
    if stage == 3:  # every weight sharded
        return zero_strategy(n, stage=3, persistence_threshold=0)
    return zero_strategy(n)


def fresh_model(n=2, stage=2, hidden=40):
    """A compiled, built, untrained model: the target of a restore."""
    with sliced_strategy(n, stage).scope():
        model = mlp(hidden=hidden)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
        model.optimizer.build(model.trainable_variables)
    return model


def trained_model(n, stage=2):
    with sliced_strategy(n, stage).scope():
        model = mlp(hidden=40)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01), stage=stage),
                      loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    return model


def assert_plain_keras_restores(prefix, saved):
    """A plain Keras model and optimizer, no strategy, read `prefix` as `saved`."""
    plain = mlp(hidden=40)
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).read(prefix).assert_consumed()
    for a, b in zip(training_state(plain), saved):
        np.testing.assert_array_equal(a, b)


def training_state(model):
    return model.get_weights() + [np.asarray(v.numpy()) for v in model.optimizer.variables]
