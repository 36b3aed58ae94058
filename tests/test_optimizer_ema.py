"""use_ema=True: the moving averages of the weights are sharded like slots."""

import contextlib

import keras
import pytest
import tensorflow as tf
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy, mlp,
                      regression_data, zero_strategy)

import tf_zero

BATCH = 24


def fit(strategy, make, zero=True, epochs=2, model=None, initial_epoch=0, **kwargs):
    if model is None:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = mlp()
            opt = make()
            model.compile(optimizer=tf_zero.ZeroOptimizer(opt, **kwargs) if zero else opt,
                          loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs, initial_epoch=initial_epoch,
              shuffle=False, verbose=0)
    return model


CASES = {
    # element split; the weights take the averages every 3 steps and at the end
    "adam": lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.9,
                                          ema_overwrite_frequency=3),
    # whole variables (Lamb) and runs of split ones (Muon's AdamW biases)
    "lamb": lambda: keras.optimizers.Lamb(0.01, use_ema=True, ema_momentum=0.8),
    "muon": lambda: keras.optimizers.Muon(0.01, use_ema=True, ema_momentum=0.8,
                                          ema_overwrite_frequency=5),
}


# Summation order differs from the all-reduce: float32 round-off, measured
# at most 6e-8 after two epochs; 1e-6 is far below one update here.
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_moving_averages_match_keras(name, stage):
    ref = fit(None, CASES[name], zero=False)  # one device, the whole batch
    got = fit(zero_strategy(3), CASES[name], stage=stage)
    # fit ends with finalize_variable_values: the weights are the averages.
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    assert_replicas_identical(got)
    # The averages, whole, at the plain optimizer's positions.
    plain = [(i, v.numpy()) for i, v in enumerate(ref.optimizer.variables)
             if v.name.endswith("_average")]
    saved = [(i, v.numpy()) for i, v in enumerate(got.optimizer.variables)
             if v.name.endswith("_average")]
    assert [i for i, _ in plain] == [i for i, _ in saved] and len(plain) == 4
    assert max_weight_diff([a for _, a in plain], [a for _, a in saved]) < 1e-6


def test_keras_own_overwrite_fails_under_mirrored_strategy():
    """Keras 3.15 overwrites the weights every ema_overwrite_frequency steps with
    a merge_call inside a cond, which MirroredStrategy refuses; tf_zero's
    sharded averages do it in replica context (the tests above)."""
    with pytest.raises(RuntimeError, match="merge_call"):
        fit(mirrored_strategy(3), CASES["adam"], zero=False, epochs=1)


def test_averages_are_sharded_and_checkpointed(tmp_path):
    """Each replica keeps a quarter of the averages; a checkpoint at N=4 resumes
    at N=2 and continues as one device that trains on without saving. (Each
    `fit` ends with the weights set to their averages, as in Keras.)"""
    make = CASES["adam"]
    model = fit(zero_strategy(4), make, epochs=1, stage=2)
    report = tf_zero.memory_report(model.optimizer)
    assert report.max_replica.slots < 0.3 * report.unsharded.slots  # m, v and average
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    one = fit(None, make, zero=False, epochs=1)
    reference = fit(None, None, model=one, epochs=1, initial_epoch=1).get_weights()
    with zero_strategy(2).scope():
        resumed = mlp()
        resumed.compile(optimizer=tf_zero.ZeroOptimizer(make(), stage=2), loss="mse")
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
        prefix).assert_existing_objects_matched()
    fit(None, None, model=resumed, epochs=1, initial_epoch=1)
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


def test_stage3_refuses_ema_naming_stage2():
    strategy = zero_strategy(2, stage=3, persistence_threshold=0)
    with strategy.scope():
        model = mlp()
        opt = tf_zero.ZeroOptimizer(CASES["adam"]())
        with pytest.raises(ValueError, match="stage 2"):
            opt.build(model.trainable_variables)
