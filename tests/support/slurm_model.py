"""The model and data of the SLURM test (tests/test_hybrid_sharding.py), shared
by its worker processes, which must not import conftest (it configures the
test process's devices)."""

import keras
import numpy as np

import tf_zero


def slurm_model(strategy, optimizer="adamw"):
    """A small regression model with fixed weights, compiled with AdamW whose
    global norm clipping spans every replica of every worker, or with
    `optimizer="lamb"` (whole variables, a trust ratio per variable)."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(9, activation="tanh"),
                                  keras.layers.Dense(1)])
        if optimizer == "lamb":
            inner = keras.optimizers.Lamb(0.01, global_clipnorm=0.1)
        else:
            inner = keras.optimizers.AdamW(0.01, weight_decay=0.05, global_clipnorm=0.1)
        model.compile(optimizer=tf_zero.ZeroOptimizer(inner), loss="mse")
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") * 0.3
                       for w in model.get_weights()])
    return model


def slurm_data(poison=None):
    """64 examples; with `poison`, example `poison`'s input is 1e5, which
    overflows float16."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1))).astype("float32")
    if poison is not None:
        x[poison] = 1e5
    return x, y
