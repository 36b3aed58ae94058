"""Test setup: 4 logical CPU devices, shared strategies, small models."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC allocator on CPU keeps the allocation statistics that
# tf.config.experimental.get_memory_info reports (stage-3 peak memory tests).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_zero  # noqa: E402
from tf_zero import _private  # noqa: E402

# benchmarks/zoo.py: the models users train, shared with benchmarks/models.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from zoo import densified  # noqa: E402,F401

_zero_strategies = {}
_mirrored_strategies = {}


def devices(n):
    return [f"/cpu:{i}" for i in range(n)]


def zero_strategy(n, **kwargs):
    """One ZeroStrategy per (n, config) for the whole test process."""
    key = (n, tuple(sorted(kwargs.items())))
    if key not in _zero_strategies:
        _zero_strategies[key] = tf_zero.ZeroStrategy(devices(n), **kwargs)
    return _zero_strategies[key]


def mirrored_strategy(n):
    """One plain MirroredStrategy per n, with collective keys of its own."""
    if n not in _mirrored_strategies:
        _mirrored_strategies[n] = _private.new_mirrored_strategy(devices(n))
    return _mirrored_strategies[n]


def mlp(seed=1, inputs=8, hidden=7, outputs=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="tanh"),
        keras.layers.Dense(outputs),
    ])


def regression_data(n=96, inputs=8, outputs=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    y = rng.normal(size=(n, outputs)).astype("float32")
    return x, y


def max_weight_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(a, b))


def assert_replicas_identical(model):
    """Every replica's copy of every trainable weight is bitwise identical.

    Non-trainable state is Keras' business: under MirroredStrategy Keras 3
    writes BatchNormalization moving statistics per replica, and they differ
    across replicas with or without tf_zero.
    """
    for v in model.trainable_variables:
        if tf_zero.stage3.is_sharded(v):
            continue  # a stage-3 shard differs per replica by design
        comps = [c.numpy() for c in _private.components(v)]
        for c in comps[1:]:
            assert np.array_equal(comps[0], c), f"replicas diverged on {v.path}"


@pytest.fixture
def data():
    return regression_data()
