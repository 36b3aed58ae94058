"""TensorFlow checkpoints of sharded slots hold each replica's pieces as slices."""

import math
import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp, regression_data, zero_strategy

import tf_zero
from tf_zero.sharded_state import UnshardedSlot
from tf_zero.slices import flat_slices


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 4, 5), (2, 3, 4, 5), (5, 1, 3), (1,)])
def test_flat_slices_cover_the_run_in_order(shape):
    rng = random.Random(0)
    n = math.prod(shape)
    x = np.arange(n).reshape(shape)
    for _ in range(200):
        a = rng.randrange(n)
        b = rng.randrange(a + 1, n + 1)
        pieces = flat_slices(shape, a, b)
        got = np.concatenate([x[tuple(slice(s, s + e) for s, e in zip(p.begin, p.extent))].ravel()
                              for p in pieces])
        np.testing.assert_array_equal(got, np.arange(a, b))
        assert len(pieces) <= 2 * (len(shape) - 1) + 1
        assert [p.flat_start for p in pieces] == list(np.cumsum([a] + [p.size for p in pieces])[:-1])
    assert flat_slices(shape, 0, n)[0].spec == ""  # the whole tensor: a plain entry
    with pytest.raises(ValueError, match="empty or outside"):
        flat_slices(shape, 0, n + 1)


def test_slice_spec_format():
    (first, rows, last) = flat_slices((4, 6), 3, 20)
    assert (first.spec, rows.spec, last.spec) == ("4 6 0,1:3,3", "4 6 1,2:-", "4 6 3,1:0,2")


def _strategy(n, stage):
    if stage == 3:  # every weight sharded
        return zero_strategy(n, stage=3, persistence_threshold=0)
    return zero_strategy(n)


def _trained(n, stage=2):
    with _strategy(n, stage).scope():
        model = mlp(hidden=40)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01), stage=stage),
                      loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    return model


def _state(model):
    return model.get_weights() + [np.asarray(v.numpy()) for v in model.optimizer.variables]


@pytest.mark.parametrize("stage", [2, 3])
def test_slots_are_written_from_the_shards_and_read_back_by_pieces(tmp_path, monkeypatch, stage):
    """No full slot is assembled to save or to restore; every replica reads its
    pieces of a checkpoint written at another replica count."""
    model = _trained(4, stage)
    saved = _state(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a full slot was assembled or assigned")

    with monkeypatch.context() as patch:
        patch.setattr(UnshardedSlot, "value", refuse)
        prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
            str(tmp_path / "ckpt"))
    # The 40x3 kernel's slots are split over 4 replicas: one slice per piece.
    key = next(k for k, shape in tf.train.list_variables(prefix)
               if k.startswith("optimizer/_variables/") and shape == [40, 3])
    half = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[key], shape_and_slices=["40 3 0,20:-"],
                                dtypes=[tf.float32])[0]
    assert half.shape == (20, 3)

    for n in (3, 1):
        with _strategy(n, stage).scope():
            restored = mlp(hidden=40)
            restored.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01),
                                                             stage=stage), loss="mse")
            restored.optimizer.build(restored.trainable_variables)
        with monkeypatch.context() as patch:
            patch.setattr(UnshardedSlot, "assign", refuse)
            patch.setattr(UnshardedSlot, "value", refuse)
            tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
                prefix).assert_consumed()
        for a, b in zip(_state(restored), saved):
            np.testing.assert_array_equal(a, b)

    plain = mlp(hidden=40)
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).read(prefix).assert_consumed()
    for a, b in zip(_state(plain), saved):
        np.testing.assert_array_equal(a, b)


def test_tf_zero_checkpoint_is_tf_checkpoint_in_one_process(tmp_path):
    model = _trained(2)
    manager = tf.train.CheckpointManager(
        tf_zero.Checkpoint(model=model, optimizer=model.optimizer), str(tmp_path), 2)
    path = manager.save()
    assert tf.train.latest_checkpoint(str(tmp_path)) == path
    restored = _trained(4)
    tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).restore(path).assert_consumed()
    for a, b in zip(_state(restored), _state(model)):
        np.testing.assert_array_equal(a, b)
