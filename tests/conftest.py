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

# benchmarks/zoo.py: the models users train, shared with benchmarks/models.py;
# tests/support/: helpers several test files share.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "benchmarks"))
sys.path.insert(0, os.path.join(_HERE, "support"))
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
        if tf_zero.is_sharded(v):
            continue  # a stage-3 shard differs per replica by design
        comps = [c.numpy() for c in _private.components(v)]
        for c in comps[1:]:
            assert np.array_equal(comps[0], c), f"replicas diverged on {v.path}"


def plain_keras_muon_runs() -> bool:
    """Whether Keras' own Muon can take a step on the TensorFlow backend.

    Keras 3.10 to 3.12's `Muon.update_step` reads `variable.path`, and their
    TensorFlow optimizer calls it with the `tf.Variable` under the Keras
    variable, which has none: plain Muon fails there, so tests that compare
    with it cannot run. Decided by trying a step, not by the version.
    """
    if not hasattr(keras.optimizers, "Muon"):
        return False
    variable = keras.Variable(np.ones((2, 2), "float32"))
    try:
        keras.optimizers.Muon().apply_gradients([(np.ones((2, 2), "float32"), variable)])
    except AttributeError:
        return False
    return True


@pytest.fixture
def data():
    return regression_data()


def rebuild_plan(plan, values):
    """Scatter flat variables through the plan and back: must be lossless."""
    buckets = []
    for b in plan.buckets:
        flat = np.zeros(b.padded_size)
        for s in b.segments:
            flat[s.offset:s.offset + s.size] = values[s.variable].ravel()[s.start:s.start + s.size]
        buckets.append(flat)
    out = [np.zeros(v.size) for v in values]
    for r in range(plan.num_shards):
        for b, flat in zip(plan.buckets, buckets):
            lo, hi = b.shard_range(r)
            shard = flat[lo:hi]
            covered = np.zeros(b.shard_size, bool)
            for p in b.shard_pieces(r):
                out[p.variable][p.start:p.start + p.size] = shard[p.offset:p.offset + p.size]
                covered[p.offset:p.offset + p.size] = True
            assert not np.any(shard[~covered]), "padding must stay zero"
    return [o.reshape(v.shape) for o, v in zip(out, values)]


@pytest.fixture
def policy():
    """Sets a Keras mixed-precision policy for the test; float32 again after it."""
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)
    yield set_policy
    keras.mixed_precision.set_global_policy("float32")
