"""keras.optimizers.MultiOptimizer under ZeroOptimizer: each variable by its own optimizer."""

import contextlib

import keras
import pytest
import tensorflow as tf
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy,
                      regression_data, zero_strategy)

import tf_zero
from tf_zero import _private

pytestmark = pytest.mark.skipif(not hasattr(keras.optimizers, "MultiOptimizer"),
                                reason="keras.optimizers.MultiOptimizer is new in Keras 3.15")

BATCH = 24


def model_fn():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(7, activation="tanh"),
                             keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])


def muon_and_adamw():
    """Muon for the matrices, AdamW (with decay) for the rest."""
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        keras.optimizers.AdamW(0.01, weight_decay=0.1),
        {".*/kernel": keras.optimizers.Muon(0.02)}))


def sgd_and_lamb():
    """An element-wise default with a whole-tensor optimizer for the matrices."""
    return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        keras.optimizers.SGD(0.05, momentum=0.9), {".*/kernel": keras.optimizers.Lamb(0.01)}))


def fit(strategy, make, zero=True, epochs=2, initial_epoch=0, model=None, batch=BATCH):
    if model is None:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = model_fn()
            opt = make()
            model.compile(optimizer=tf_zero.ZeroOptimizer(opt) if zero else opt, loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=batch, epochs=initial_epoch + epochs, initial_epoch=initial_epoch,
              shuffle=False, verbose=0)
    return model


# The sharded step sums gradients in another order than MirroredStrategy's
# all-reduce; after two epochs the weights differ by float32 round-off (measured
# at most 6e-8 here; Muon's Newton-Schulz iteration amplifies it most). 1e-6
# leaves headroom and is far below one update at these learning rates.
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_muon_for_matrices_adamw_for_the_rest_matches_keras(n):
    ref = fit(mirrored_strategy(n), muon_and_adamw, zero=False)
    got = fit(zero_strategy(n), muon_and_adamw)
    assert got.optimizer.partition == "whole" and got.optimizer.is_sharded
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    assert_replicas_identical(got)
    # Every optimizer counted its own steps, as Keras' MultiOptimizer does.
    assert ([int(o.iterations.numpy()) for o in got.optimizer.inner_optimizer.optimizers]
            == [int(o.iterations.numpy()) for o in ref.optimizer.optimizers] == [8, 8])
    assert int(got.optimizer.iterations.numpy()) == 8


@pytest.mark.parametrize("n", [3, 4])
def test_elementwise_default_with_whole_tensor_matrices(n):
    ref = fit(mirrored_strategy(n), sgd_and_lamb, zero=False)
    got = fit(zero_strategy(n), sgd_and_lamb)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6


def test_state_lives_on_the_owner_only():
    model = fit(zero_strategy(4), muon_and_adamw, epochs=1)
    shards = model.optimizer.shards
    kinds = {type(o).__name__ for o in shards.optimizers}
    assert kinds == {"Muon", "AdamW"}
    # The matrices are Muon's, owned whole; AdamW's biases are element-wise,
    # so they are spread over the replicas in runs.
    assert [shards.plan.is_split(i) for i in range(6)] == [False, True] * 3
    whole, run_elements = 0, [0] * 6
    for rank, owned in shards.owners.items():
        for i, slots in owned.slot_lists.items():
            assert type(owned.optimizers[i]) is type(shards.optimizers[i])
            for slot in slots:
                (component,) = _private.components(slot)  # one device, not mirrored
                assert component.device.endswith(f"CPU:{rank}")
                whole += 1
        for i, run in owned.runs.items():
            assert type(run.optimizer) is type(shards.optimizers[i])
            assert [tuple(s.shape) for s in run.slots] == [(run.size,)] * 2  # m, v
            assert all(_private.components(s)[0].device.endswith(f"CPU:{rank}")
                       for s in run.slots)
            run_elements[i] += run.size
    assert whole == 3  # Muon keeps a momentum per matrix
    assert run_elements == [0, 7, 0, 5, 0, 3]  # every bias element in exactly one run
    report = tf_zero.memory_report(model.optimizer)
    plain = fit(mirrored_strategy(4), muon_and_adamw, zero=False, epochs=1)
    assert report.unsharded.slots == tf_zero.memory_report(plain.optimizer).replicas[0].slots
    assert sum(r.slots for r in report.replicas) == report.unsharded.slots


def test_clipping_is_each_optimizers_own_on_the_reduced_gradient():
    """global_clipnorm over the default optimizer's variables, clipnorm per
    matrix: as one device clips, not per replica (tensorflow#33929)."""
    def make():
        return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.1, global_clipnorm=0.05),
            {".*/kernel": keras.optimizers.Adam(0.01, clipnorm=0.02)}))
    one = fit(zero_strategy(1), make, zero=False)  # one replica: the true gradient
    got = fit(zero_strategy(4), make)
    assert max_weight_diff(one.get_weights(), got.get_weights()) < 1e-6
    keras_way = fit(mirrored_strategy(4), make, zero=False)
    assert max_weight_diff(one.get_weights(), keras_way.get_weights()) > 1e-5


def test_checkpoints_resume_at_other_replica_counts_and_in_plain_keras(tmp_path):
    """Saved at N=4 after one epoch; resumed at N=2 (tf.train.Checkpoint) and in
    a plain Keras MultiOptimizer without a strategy (.weights.h5): both continue
    as the uninterrupted run."""
    model = fit(zero_strategy(4), muon_and_adamw, epochs=1)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    model.save_weights(str(tmp_path / "m.weights.h5"))
    reference = fit(zero_strategy(4), muon_and_adamw, epochs=2).get_weights()

    saved = dict(tf.train.list_variables(prefix))
    # Each optimizer's counter, learning rate and slots are in the checkpoint,
    # after the MultiOptimizer's own two (saved as _iterations, _learning_rate):
    # 2 + 2 x 2 + 9 slots. (A plain Keras MultiOptimizer's tf.train.Checkpoint
    # holds only its own counter and learning rate: its optimizers' state is lost.)
    assert {f"optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
            for i in range(2, 15)} <= set(saved)

    with zero_strategy(2).scope():
        resumed = model_fn()
        resumed.compile(optimizer=tf_zero.ZeroOptimizer(muon_and_adamw()), loss="mse")
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
        prefix).assert_existing_objects_matched()
    fit(None, None, model=resumed, epochs=1, initial_epoch=1)
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6

    plain = model_fn()
    plain.compile(optimizer=muon_and_adamw(), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    plain.load_weights(str(tmp_path / "m.weights.h5"))
    assert [int(o.iterations.numpy()) for o in plain.optimizer.optimizers] == [4, 4]
    fit(None, None, model=plain, epochs=1, initial_epoch=1)
    assert max_weight_diff(plain.get_weights(), reference) < 1e-6


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="partition='whole'"):
        tf_zero.ZeroOptimizer(muon_and_adamw(), partition="element")
    accumulating = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        keras.optimizers.Adam(gradient_accumulation_steps=2)))
    with pytest.raises(ValueError, match="GradientAccumulationOptimizer"):
        tf_zero.ZeroOptimizer(accumulating)


def test_map_that_creates_optimizers_on_demand():
    """A plain function as the map (Keras' documented example): a new optimizer
    per variable, created under the scope, at parity with Keras."""
    def make():
        def select(variable):
            if "kernel" in variable.path:
                return keras.optimizers.Adam(0.01)
            return keras.optimizers.SGD(0.05, momentum=0.9)
        return keras.optimizers.MultiOptimizer(select)
    ref = fit(mirrored_strategy(4), make, zero=False, epochs=1)
    got = fit(zero_strategy(4), make, epochs=1)
    assert len(got.optimizer.inner_optimizer.optimizers) == len(got.trainable_variables)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6


def test_accumulation_equals_one_large_batch():
    """GradientAccumulationOptimizer over a MultiOptimizer: 4 micro-batches of 24
    update as one batch of 96, each optimizer stepping once per window."""
    big = fit(zero_strategy(4), muon_and_adamw, epochs=2, batch=4 * BATCH)
    acc = fit(zero_strategy(4), lambda: tf_zero.GradientAccumulationOptimizer(
        muon_and_adamw(), steps=4, stage=2), zero=False, epochs=2)
    assert acc.optimizer.partition == "whole"
    assert max_weight_diff(big.get_weights(), acc.get_weights()) < 1e-6
    assert [int(o.iterations.numpy()) for o in acc.optimizer.inner_optimizer.optimizers] == [2, 2]
