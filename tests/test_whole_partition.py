"""The whole-variable partition: Lamb, Adafactor and Muon, sharded and exact."""

import keras
import pytest
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy, mlp,
                      plain_keras_muon_runs, regression_data, zero_strategy)

import tf_zero
from tf_zero import _private
from tf_zero.state import owners

BATCH = 24
WHOLE = {"lamb": lambda: keras.optimizers.Lamb(0.01),
         "adafactor": lambda: keras.optimizers.Adafactor(0.01),
         "muon": lambda: keras.optimizers.Muon(0.01)}


def wide_mlp(seed=1):
    """Six weights of four sizes: owners can be balanced, and 3 replicas pad."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])


def fit(strategy, make_opt, *, zero=True, model_fn=wide_mlp, epochs=2, batch=BATCH, **kwargs):
    with strategy.scope():
        model = model_fn()
        opt = make_opt()
        if zero:
            opt = tf_zero.ZeroOptimizer(opt, **kwargs)
        model.compile(optimizer=opt, loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return model


# The sharded step sums gradients in another order than the all-reduce; after
# two epochs the weights differ by float32 round-off (measured at most 1.5e-7,
# Muon's Newton-Schulz iteration amplifying it most). 1e-6 leaves headroom and
# is far below one update at these learning rates.
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(WHOLE))
def test_whole_tensor_optimizers_match_mirrored_strategy(name, n):
    if name == "muon" and not plain_keras_muon_runs():
        pytest.skip("this Keras' own Muon cannot step on the TensorFlow backend")
    ref = fit(mirrored_strategy(n), WHOLE[name], zero=False)
    got = fit(zero_strategy(n), WHOLE[name], stage=2)
    assert got.optimizer.partition == "whole" and got.optimizer.plan.partition == "whole"
    assert int(got.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy())
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    assert_replicas_identical(got)


def test_each_slot_lives_on_its_owner_only():
    model = fit(zero_strategy(4), WHOLE["lamb"], stage=1, epochs=1)
    opt = model.optimizer
    shards = opt.shards
    owners = {rank: owned for rank, owned in shards.owners.items()}
    assert sorted(owners) == [0, 1, 2, 3]
    for i, var in enumerate(shards.variables):
        owner = opt.plan.owner(i)
        slots = owners[owner].slots(i)
        assert [s.shape for s in slots] == [var.shape, var.shape]  # momentum, velocity
        for slot in slots:
            (component,) = _private.components(slot)  # one device, not mirrored
            assert component.device.endswith(f"CPU:{owner}")
        assert all(i not in o.slot_lists for r, o in owners.items() if r != owner)
    report = tf_zero.memory_report(opt)
    total = sum(r.slots for r in report.replicas)
    assert total == report.unsharded.slots == 2 * 4 * model.count_params()
    assert report.max_replica.slots < report.unsharded.slots
    assert report.max_replica.weight_shards == 0  # the owner updates its own copy


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_every_slot_is_known_without_its_owner(name):
    """Names, shapes and dtypes of all slots, in the plain order, on every worker."""
    model = wide_mlp()
    plain = WHOLE[name]()
    plain.build(model.trainable_variables)
    expected = [(v.name, tuple(v.shape), v.dtype) for v in plain.variables[2:]]
    opt = WHOLE[name]()
    specs = owners.plain_slot_specs([opt] * len(model.trainable_variables),
                                    model.trainable_variables)
    assert [(s.name, s.shape, s.dtype.name) for ss in specs for s in ss] == expected
    assert len(specs) == len(model.trainable_variables)


def test_clipping_and_weight_decay_use_the_reduced_gradient():
    def make():
        return keras.optimizers.Lamb(0.01, weight_decay=0.1, global_clipnorm=0.05)

    ref = fit(zero_strategy(1), make, zero=False)  # one replica: the exact answer
    got = fit(zero_strategy(4), make)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6

    def make_excluding():
        opt = keras.optimizers.Muon(0.01, weight_decay=0.5, clipnorm=0.02)
        opt.exclude_from_weight_decay(var_names=["bias"])
        return opt

    ref = fit(zero_strategy(1), make_excluding, zero=False)
    got = fit(zero_strategy(3), make_excluding)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulation_equals_one_large_batch(stage):
    big = fit(zero_strategy(4), WHOLE["adafactor"], batch=4 * BATCH, stage=stage)
    acc = fit(zero_strategy(4), lambda: tf_zero.GradientAccumulationOptimizer(
        WHOLE["adafactor"](), steps=4, stage=stage), zero=False)
    assert acc.optimizer.partition == "whole"
    assert max_weight_diff(big.get_weights(), acc.get_weights()) < 1e-6
    assert int(acc.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("name", ["lamb", "muon"])
def test_overflow_on_one_replica_skips_the_step_everywhere(name):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = fit(zero_strategy(4), WHOLE[name], epochs=1)
        before = model.get_weights()
        scale = float(model.optimizer.dynamic_scale.numpy())
        x, y = regression_data(BATCH)
        x[6:12] = 1e5  # replica 1's rows overflow float16
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert max_weight_diff(before, model.get_weights()) == 0.0
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2
    assert_replicas_identical(model)


def test_any_optimizer_can_be_forced_whole():
    make = lambda: keras.optimizers.AdamW(0.01, weight_decay=0.2)  # noqa: E731
    ref = fit(mirrored_strategy(4), make, zero=False, model_fn=mlp)
    got = fit(zero_strategy(4), make, model_fn=mlp, partition="whole")
    assert got.optimizer.plan.partition == "whole"
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    config = got.optimizer.get_config()
    assert config["partition"] == "whole"
    assert tf_zero.ZeroOptimizer.from_config(config).partition == "whole"


def test_bad_partitions_name_the_fix():
    with pytest.raises(ValueError, match="partition='whole'"):
        tf_zero.ZeroOptimizer(keras.optimizers.Lamb(), partition="element")
    with pytest.raises(ValueError, match="partition must be one of"):
        tf_zero.ZeroOptimizer(keras.optimizers.Adam(), partition="rows")
    strategy = zero_strategy(2, stage=3, persistence_threshold=0)
    with strategy.scope():
        model = mlp()
        opt = tf_zero.ZeroOptimizer(keras.optimizers.Adafactor())
        with pytest.raises(ValueError, match="stage=2"):
            opt.build(model.trainable_variables)
