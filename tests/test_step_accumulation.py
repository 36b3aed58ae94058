"""k micro-steps of batch b equal one step of batch k*b, on every path."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy, mlp,
                      regression_data, zero_strategy)

import tf_zero
from tf_zero import collectives

MICRO = 24
K = 4


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run(strategy, make_opt, batch, epochs=2, data=None, callbacks=()):
    with (strategy.scope() if strategy else _null()):
        model = mlp()
        model.compile(optimizer=make_opt(), loss="mse")
    x, y = data or regression_data()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


OPTS = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(0.01)}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_micro_steps_equal_one_large_batch(name, n, stage):
    make = OPTS[name]
    big = run(zero_strategy(n), lambda: tf_zero.ZeroOptimizer(make(), stage=stage),
              batch=K * MICRO)
    acc = run(zero_strategy(n),
              lambda: tf_zero.GradientAccumulationOptimizer(make(), steps=K, stage=stage),
              batch=MICRO)
    assert max_weight_diff(big.get_weights(), acc.get_weights()) < 1e-6
    assert int(acc.optimizer.iterations.numpy()) == int(big.optimizer.iterations.numpy()) == 2
    assert_replicas_identical(acc)


@pytest.mark.parametrize("where", ["no_strategy", "mirrored"])
def test_other_strategies(where):
    strategy = None if where == "no_strategy" else mirrored_strategy(4)
    make = OPTS["adam"]
    big = run(strategy, make, batch=K * MICRO)
    acc = run(strategy, lambda: tf_zero.GradientAccumulationOptimizer(make(), steps=K),
              batch=MICRO)
    assert max_weight_diff(big.get_weights(), acc.get_weights()) < 1e-6
    assert acc.optimizer.is_sharded == (strategy is not None)


def test_both_composition_orders_are_the_same_optimizer():
    make = OPTS["adam"]
    a = run(zero_strategy(2), lambda: tf_zero.ZeroOptimizer(
        tf_zero.GradientAccumulationOptimizer(make(), steps=K), stage=2), batch=MICRO)
    b = run(zero_strategy(2), lambda: tf_zero.GradientAccumulationOptimizer(
        tf_zero.ZeroOptimizer(make(), stage=2), steps=K), batch=MICRO)
    assert a.optimizer.accumulation_steps == b.optimizer.accumulation_steps == K
    assert max_weight_diff(a.get_weights(), b.get_weights()) == 0.0


def test_keras_gradient_accumulation_steps_names_the_replacement():
    with pytest.raises(ValueError, match="GradientAccumulationOptimizer"):
        tf_zero.ZeroOptimizer(keras.optimizers.Adam(gradient_accumulation_steps=2))


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        tf_zero.GradientAccumulationOptimizer(keras.optimizers.SGD(), steps=steps)


def test_double_accumulation_is_refused():
    inner = tf_zero.GradientAccumulationOptimizer(keras.optimizers.SGD(), steps=2)
    with pytest.raises(ValueError, match="already accumulates"):
        tf_zero.GradientAccumulationOptimizer(inner, steps=2)


def _buffers(stage, n=4):
    strategy = zero_strategy(n)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                  keras.layers.Dense(10)])
        opt = tf_zero.GradientAccumulationOptimizer(keras.optimizers.Adam(), steps=K,
                                                    stage=stage)
        opt.build(model.trainable_variables)
    return model, tf_zero.memory_report(opt)


def test_stage2_buffers_are_one_nth_of_stage1():
    model, s1 = _buffers(1)
    _, s2 = _buffers(2)
    params = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
    assert s1.unsharded.gradient_buffers == 4 * params
    for r1, r2 in zip(s1.replicas, s2.replicas):
        assert r1.gradient_buffers >= 4 * params
        assert r2.gradient_buffers * 4 == r1.gradient_buffers


@pytest.mark.parametrize("stage", [1, 2])
def test_collective_launches_per_micro_step(monkeypatch, stage):
    """Stage 1 communicates once per window, stage 2 every micro-step."""
    n = 4
    with zero_strategy(n).scope():
        # One counter per replica: a shared one would chain the replicas'
        # collectives through its resource and deadlock them.
        counter = tf.Variable(0, dtype=tf.int64, trainable=False,
                              synchronization=tf.VariableSynchronization.ON_READ,
                              aggregation=tf.VariableAggregation.SUM)
    real = collectives.reduce_scatter

    def counting_reduce_scatter(x, options=None, **kwargs):
        out = real(x, options, **kwargs)
        with tf.control_dependencies([out]):
            tf_zero._private.local_component(counter).assign_add(1)
        return tf.identity(out)

    monkeypatch.setattr(collectives, "reduce_scatter", counting_reduce_scatter)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(int(counter.numpy()))

    model = run(zero_strategy(n), lambda: tf_zero.GradientAccumulationOptimizer(
        OPTS["sgd"](), steps=K, stage=stage), batch=MICRO, epochs=2, callbacks=[Record()])
    per_step = np.diff([0] + seen)
    buckets = len(model.optimizer.plan.buckets)
    if stage == 1:
        assert per_step.tolist() == [0, 0, 0, n * buckets] * 2
    else:
        assert per_step.tolist() == [n * buckets] * 8


def test_learning_rate_schedule_steps_per_update():
    schedule = lambda: keras.optimizers.schedules.ExponentialDecay(  # noqa: E731
        0.1, decay_steps=1, decay_rate=0.5)
    acc = run(zero_strategy(2), lambda: tf_zero.GradientAccumulationOptimizer(
        keras.optimizers.SGD(schedule()), steps=K), batch=MICRO)
    big = run(zero_strategy(2), lambda: tf_zero.ZeroOptimizer(keras.optimizers.SGD(schedule())),
              batch=K * MICRO)
    assert float(acc.optimizer.learning_rate.numpy()) == pytest.approx(0.1 * 0.5 ** 2)
    assert max_weight_diff(big.get_weights(), acc.get_weights()) < 1e-6


def test_window_carries_over_an_epoch_boundary():
    """4 micro-steps per epoch, k=3: after 2 epochs, 2 updates and 2 pending."""
    acc = run(zero_strategy(2), lambda: tf_zero.GradientAccumulationOptimizer(
        OPTS["sgd"](), steps=3), batch=MICRO)
    assert int(acc.optimizer.iterations.numpy()) == 2
    assert int(acc.optimizer._accumulator.micro_step.numpy()) == 8
    assert any(np.any(c.numpy() != 0) for buf in acc.optimizer.gradient_buffers
               for c in tf_zero._private.components(buf))


def test_overflow_in_one_micro_step_skips_the_window():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        n = 2
        strategy = zero_strategy(n)
        with strategy.scope():
            model = mlp()
            model.compile(optimizer=tf_zero.GradientAccumulationOptimizer(
                OPTS["adam"](), steps=2), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = regression_data(4 * MICRO)
        model.fit(x[:2 * MICRO], y[:2 * MICRO], batch_size=MICRO, epochs=1, verbose=0,
                  shuffle=False)
        before, scale = model.get_weights(), float(model.optimizer.dynamic_scale.numpy())
        x2 = x[2 * MICRO:].copy()
        x2[MICRO + MICRO // 2:] = 1e5  # second micro-step, replica 1 only
        model.fit(x2, y[2 * MICRO:], batch_size=MICRO, epochs=1, verbose=0, shuffle=False)
        assert max_weight_diff(before, model.get_weights()) == 0.0
        assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2
        assert int(model.optimizer.iterations.numpy()) == 1
        model.fit(x[:2 * MICRO], y[:2 * MICRO], batch_size=MICRO, epochs=1, verbose=0,
                  shuffle=False)  # the buffers were emptied: a clean window applies
        assert int(model.optimizer.iterations.numpy()) == 2
        assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_config_round_trip():
    opt = tf_zero.GradientAccumulationOptimizer(keras.optimizers.Adam(0.002), steps=3, stage=1)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert isinstance(clone, tf_zero.GradientAccumulationOptimizer)
    assert clone.steps == 3 and clone.stage == 1
