"""TensorFlow checkpoints of sharded slots hold each replica's pieces as slices of
the full tensor, read back by pieces at any split."""

import math
import random

import numpy as np
import pytest
import tensorflow as tf
from sliced_models import (assert_plain_keras_restores, fresh_model, trained_model,
                           training_state)

from tf_zero.checkpoint.faces import UnshardedSlot
from tf_zero.checkpoint.slices import flat_slices


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


def test_specs_parse_back_and_runs_split():
    from tf_zero.checkpoint.slices import parse_spec, split_run

    for a, b in [(3, 20), (0, 24), (6, 12), (23, 24)]:
        for piece in flat_slices((4, 6), a, b):
            assert parse_spec(piece.spec, (4, 6)) == (piece.flat_start, piece.size)
    assert split_run(5, 17, 5) == [(5, 10), (10, 15), (15, 17)]
    assert split_run(5, 17, None) == [(5, 17)]


def test_slice_spec_format():
    (first, rows, last) = flat_slices((4, 6), 3, 20)
    assert (first.spec, rows.spec, last.spec) == ("4 6 0,1:3,3", "4 6 1,2:-", "4 6 3,1:0,2")


@pytest.mark.parametrize("stage", [2, 3])
def test_slots_are_written_from_the_shards_and_read_back_by_pieces(tmp_path, monkeypatch, stage):
    """No full slot is assembled to save or to restore; every replica reads its
    pieces of a checkpoint written at another replica count."""
    model = trained_model(4, stage)
    saved = training_state(model)

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
        restored = fresh_model(n, stage)
        with monkeypatch.context() as patch:
            patch.setattr(UnshardedSlot, "assign", refuse)
            patch.setattr(UnshardedSlot, "value", refuse)
            tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
                prefix).assert_consumed()
        for a, b in zip(training_state(restored), saved):
            np.testing.assert_array_equal(a, b)

    assert_plain_keras_restores(prefix, saved)


@pytest.mark.parametrize("stage, writer", [(2, "tf_zero"), (3, "tf_zero"), (3, "tf"),
                                           (2, "keras")])
def test_restored_shards_are_read_without_a_copy(tmp_path, stage, writer):
    """A restore writes each shard whole where its slice covers it: a
    partial write would leave the variable in TensorFlow's copy-on-read mode,
    in which every read (each training step's gather, the publish) copies
    the shard. After a restore (`tf_zero.Checkpoint`, `tf.train.Checkpoint`
    at stage 3, a Keras `.weights.h5` file), reading any replica's shard or
    slot allocates nothing, as before it, and training goes on."""
    import keras
    from conftest import regression_data, zero_strategy

    import tf_zero
    from tf_zero import _private

    strategy = zero_strategy(4, stage=stage, persistence_threshold=0)

    def model():
        with strategy.scope():
            m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(256, activation="tanh"),
                                  keras.layers.Dense(3)])
            m.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
        return m

    def components(m):
        shards = m.optimizer.shards  # each bucket's shard and its slots
        variables = list(shards.storage) + [s for slots in shards.slots for s in slots]
        return [c for v in variables for c in _private.components(_private.tf_variable(v))
                if c.shape.num_elements() >= 128]

    def read_allocates(component):
        """Bytes a read of `component` allocates (the least of 3 reads: the
        process's other threads, a dataset iterator's release, share the
        allocator)."""
        read = tf.function(lambda: tf.reduce_sum(component.read_value()))
        read()
        peaks = []
        for _ in range(3):
            before = tf.config.experimental.get_memory_info("CPU:0")["current"]
            tf.config.experimental.reset_memory_stats("CPU:0")
            read()
            peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
        return min(peaks)

    x, y = regression_data(24)
    saved = model()
    saved.fit(x, y, batch_size=24, epochs=1, verbose=0)
    restored = model()
    restored.optimizer.build(restored.trainable_variables)
    if writer == "keras":  # a .weights.h5 file, as Keras' BackupAndRestore and ModelCheckpoint
        saved.save_weights(str(tmp_path / "model.weights.h5"))
        restored.load_weights(str(tmp_path / "model.weights.h5"))
    else:
        checkpoint = tf_zero.Checkpoint if writer == "tf_zero" else tf.train.Checkpoint
        prefix = checkpoint(model=saved, optimizer=saved.optimizer).write(str(tmp_path / "ckpt"))
        checkpoint(model=restored, optimizer=restored.optimizer).restore(prefix)
    fresh = [read_allocates(c) for c in components(saved)]
    comps = components(restored)
    assert len(comps) == len(fresh) >= 12, len(comps)
    sizes = [c.shape.num_elements() * c.dtype.size for c in comps]
    assert all(f < size for f, size in zip(fresh, sizes)), (fresh, sizes)
    # A copy-on-read variable allocates its whole size at every read.
    copies = [read_allocates(c) for c in comps]
    assert all(c < size for c, size in zip(copies, sizes)), (copies, sizes)
    for a, b in zip(restored.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)
    restored.fit(x, y, batch_size=24, epochs=1, verbose=0)
    saved.fit(x, y, batch_size=24, epochs=1, verbose=0)
    for a, b in zip(restored.get_weights(), saved.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
