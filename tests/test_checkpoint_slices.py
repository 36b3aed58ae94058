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
