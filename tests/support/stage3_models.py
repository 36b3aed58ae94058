"""The models, data and tolerances the stage-3 tests share."""

import contextlib

import keras
import numpy as np
from conftest import (densified, regression_data, zero_strategy)

import tf_zero


BATCH = 24


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
}


def stage3(n, **kwargs):
    kwargs.setdefault("persistence_threshold", 0)
    return zero_strategy(n, stage=3, **kwargs)


def layered_model(seed=3, batch_norm=True):
    """Embedding, Conv1D, LayerNormalization, Dense, BatchNormalization."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([layer for layer in [
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(20, 8),
        keras.layers.Conv1D(8, 3, padding="same", activation="tanh"),
        keras.layers.LayerNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(12, activation="tanh"),
        # (Not right after a bias: BatchNormalization cancels that bias's
        # gradient, and Adam would amplify round-off noise into steps.)
        keras.layers.BatchNormalization() if batch_norm else None,
        keras.layers.Dense(3),
    ] if layer is not None])


def no_batch_norm():
    """The layered model without BatchNormalization, whose statistics depend
    on the per-replica batch: restoring at another replica count continues
    the same training only without it."""
    return layered_model(batch_norm=False)


def token_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 20, size=(n, 6)).astype("int32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def compiled(strategy, make_opt, zero=True, make_model=layered_model):
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = make_model()
        opt = make_opt()
        model.compile(optimizer=tf_zero.ZeroOptimizer(opt) if zero else densified(opt),
                      loss="mse")
    return model


def fit_dense(model, epochs=2, initial_epoch=0):
    """fit on conftest's regression data (for `mlp`)."""
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0)
    return model


def fit(model, epochs=2, initial_epoch=0):
    x, y = token_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0)
    return model


def assert_weights_close(actual, expected):
    """|a - b| <= 2e-6.

    The sums are the same but their order is not (reduce-scatter vs
    all-reduce): each step may differ by an ulp (6e-8 at 0.5), and SGD's
    momentum of 0.9 multiplies what it carries by up to 1 / (1 - 0.9) = 10,
    so after 8 steps weights agree to ~1e-6 (1.4e-6 seen at N=3), not better.
    Against stage 2, whose sums are ordered like stage 3's, the test of
    accumulation below holds 1e-6.
    """
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, atol=2e-6)
