"""Stage 3 holds 1/N of the state, and its step's peak does not grow with depth."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import zero_strategy
from stage3_models import stage3

import tf_zero


def test_persistent_state_is_one_nth():
    """Weights + Adam slots per replica: 1/N of the unsharded figure (within 1%)."""
    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                 keras.layers.Dense(256), keras.layers.Dense(8)])

    strategy = stage3(4)
    with strategy.scope():
        model = make()
        opt = tf_zero.ZeroOptimizer(keras.optimizers.Adam())
        opt.build(model.trainable_variables)
    report = tf_zero.memory_report(opt)
    full = report.unsharded
    assert full.weights == 4 * sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    for replica in report.replicas:
        assert replica.weight_shards == 0
        assert replica.weights == pytest.approx(full.weights / 4, rel=0.01)
        assert replica.slots == pytest.approx(full.slots / 4, rel=0.01)
        assert replica.total == pytest.approx(full.total / 4, rel=0.01)


def _step_peak(depth, recompute, width=256):
    """Peak allocator bytes above steady state during one training step."""
    strategy = zero_strategy(4, stage=3, persistence_threshold=0, recompute=recompute,
                             prefetch_depth=1)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))] + [
            keras.layers.Dense(width, activation="tanh", use_bias=False)
            for _ in range(depth)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.SGD(0.01)),
                      loss="mse")
    x = np.ones((8, width), "float32")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)  # trace and build
    peaks = []
    for _ in range(3):  # the allocator is shared with whatever else runs: take the least
        gc.collect()
        tf.config.experimental.reset_memory_stats("CPU:0")
        steady = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.fit(x, x, batch_size=8, epochs=1, verbose=0)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - steady)
    return min(peaks)


def test_training_leaves_the_allocator_holding_the_state_and_little_else():
    # Shards and slots get buffers of their own at build: were they first
    # copied inside the first step (copy-on-write), TensorFlow's BFC allocator
    # could give each a free block of up to twice its size among the step's
    # temporaries, kept for the rest of the run.
    strategy = zero_strategy(4, stage=3, persistence_threshold=0, prefetch_depth=1)
    gc.collect()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((512,))] + [
            keras.layers.Dense(512, use_bias=False) for _ in range(6)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(1e-3)), loss="mse")
    x = np.ones((32, 512), "float32")
    model.fit(x, x, batch_size=32, epochs=3, verbose=0)
    gc.collect()
    held = tf.config.experimental.get_memory_info("CPU:0")["current"] - before
    state = sum(r.total for r in tf_zero.memory_report(model.optimizer, model).replicas)
    print(f"allocator after training {held / 2**20:.2f} MiB, state {state / 2**20:.2f} MiB")
    assert state == 6 * 512 * 512 * 4 * 3  # weights + Adam's two slots, sharded
    assert held < 1.1 * state + (1 << 20)


def test_step_peak_does_not_grow_with_depth():
    layer_bytes = 256 * 256 * 4
    with_recompute = {d: _step_peak(d, True) for d in (8, 16)}
    without = {d: _step_peak(d, False) for d in (8, 16)}
    print(f"peak above steady state (MiB), recompute: "
          f"{ {d: round(v / 2**20, 2) for d, v in with_recompute.items()} }, "
          f"without: { {d: round(v / 2**20, 2) for d, v in without.items()} }")
    # 4 replicas x (a layer being used + the one gathered next) at most.
    assert with_recompute[16] - with_recompute[8] < 2 * 4 * layer_bytes
    # Without recompute every gathered weight lives until backward: the test
    # can tell the difference.
    assert without[16] - without[8] > 8 * 4 * layer_bytes * 0.5  # 8 more layers x 4 replicas


@pytest.mark.parametrize("prefetch_depth, distinct, recompute",
                         [(1, 4, True), (2, 3, True), (8, 1, True), (1, 4, False)])
def test_gathers_wait_for_the_prefetch_window(prefetch_depth, distinct, recompute):
    """The shard read of layer i waits for the input of layer i - depth + 1."""
    strategy = zero_strategy(2, stage=3, persistence_threshold=0, prefetch_depth=prefetch_depth,
                             recompute=recompute)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,))] + [
            keras.layers.Dense(4, use_bias=False) for _ in range(4)])

    @tf.function
    def forward(x):
        return strategy.run(lambda xr: model(xr, training=True), args=(x,))

    graph = forward.get_concrete_function(tf.TensorSpec([2, 4], tf.float32)).graph
    waits = {}
    for op in graph.get_operations():
        if op.type == "ReadVariableOp" and op.control_inputs:
            waits.setdefault(op.device, set()).update(c.name for c in op.control_inputs)
    assert len(waits) == 2  # both replicas
    for names in waits.values():
        # depth 1: each layer waits for its own input (4 distinct); depth 2:
        # layers 0 and 1 wait for the model input, then one each; depth >= 4:
        # everything may be gathered up front.
        assert len(names) == distinct, names
