import contextlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import devices, mirrored_strategy, mlp, regression_data, zero_strategy
from worker_procs import run_workers

import tf_zero


def test_defaults_and_config():
    strategy = zero_strategy(4)
    assert strategy.num_replicas_in_sync == 4
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    assert strategy.zero_config == tf_zero.ZeroConfig(stage=2)
    assert strategy.stage == 2


def test_default_devices_are_all_logical_cpus():
    strategy = tf_zero.ZeroStrategy()
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_no_warning_about_collective_ops_configuration():
    """TensorFlow's "Collective ops is not configured at program startup" is not printed.

    It appears once the eager context has started (listing logical devices
    starts it) and only in a process where no collective strategy configured
    collective ops before: hence a fresh one.
    """
    script = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        tf.config.list_logical_devices("CPU")
        import tf_zero
        tf_zero.ZeroStrategy()
        tf.get_logger().warning("still logging")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "still logging" in done.stderr
    assert "Collective ops is not configured" not in done.stderr


def test_several_instances_in_one_process_do_not_collide():
    """Differently sized strategies, used alternately, in one process."""
    x, y = regression_data()
    for n in (2, 3, 2, 4):
        strategy = tf_zero.ZeroStrategy(devices(n))
        with strategy.scope():
            model = mlp()
            model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.SGD(0.1)),
                          loss="mse")
        model.fit(x, y, batch_size=24, epochs=1, verbose=0)
    assert strategy._collective_key_base != zero_strategy(4)._collective_key_base


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(stage=5), ValueError, "stage"),
    (dict(reduce_dtype="int8"), ValueError, "reduce_dtype"),
    (dict(devices_per_worker=0), ValueError, "devices_per_worker"),
])
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        tf_zero.ZeroStrategy(devices(2), **kwargs)


def test_devices_and_cluster_are_exclusive(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="devices_per_worker"):
        tf_zero.ZeroStrategy(devices(2))


def test_reduce_maps_over_nests_and_scalars():
    strategy = zero_strategy(2)
    per_replica = strategy.run(tf.function(lambda: (
        tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32),
        {"v": tf.ones([3])})))
    mean = strategy.reduce("MEAN", per_replica, axis=0)
    assert float(mean[0]) == pytest.approx(0.5)
    np.testing.assert_allclose(mean[1]["v"].numpy(), 1.0)


def test_plain_keras_fit_fails_under_multi_worker_strategy(tmp_path):
    """Documents keras-team/keras#20585, the failure ZeroStrategy fixes.

    The same job under ZeroStrategy passes: tests/test_multiworker_training.py.
    """
    script = os.path.join(os.path.dirname(__file__), "jobs", "multi_worker_job.py")
    codes, outs = run_workers([script, "plain", str(tmp_path), "1"], 2, timeout=240)
    assert codes != [0, 0]
    assert any("PerReplica" in o and "Traceback" in o for o in outs)


def test_batches_that_do_not_split_evenly_work():
    """96 samples in batches of 32 over 3 replicas: per-replica parts of 11, 11, 10.

    Keras builds the model from the first batch after all-reducing the data
    across replicas, which fails for uneven parts (under a collective strategy
    the failed collective would also poison every later one); ZeroStrategy
    builds it from the first replica's part.
    """
    x, y = regression_data()
    results = {}
    for name, strategy in (("zero", zero_strategy(3)), ("none", None)):
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = mlp()
            model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
        results[name] = (model.evaluate(x, y, batch_size=32, verbose=0),
                         model.predict(x, batch_size=32, verbose=0))
    assert results["zero"][0] == pytest.approx(results["none"][0], abs=1e-6)
    np.testing.assert_allclose(results["zero"][1], results["none"][1], atol=1e-6)
    with mirrored_strategy(3).scope():
        model = mlp()
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(tf.errors.InvalidArgumentError):  # Keras' own behaviour
        model.evaluate(x, y, batch_size=32, verbose=0)
