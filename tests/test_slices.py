"""TensorFlow checkpoints of sharded slots hold each replica's pieces as slices."""

import math
import os
import random
import re

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


def test_specs_parse_back_and_runs_split():
    from tf_zero.slices import parse_spec, split_run

    for a, b in [(3, 20), (0, 24), (6, 12), (23, 24)]:
        for piece in flat_slices((4, 6), a, b):
            assert parse_spec(piece.spec, (4, 6)) == (piece.flat_start, piece.size)
    assert split_run(5, 17, 5) == [(5, 10), (10, 15), (15, 17)]
    assert split_run(5, 17, None) == [(5, 17)]


def test_slice_spec_format():
    (first, rows, last) = flat_slices((4, 6), 3, 20)
    assert (first.spec, rows.spec, last.spec) == ("4 6 0,1:3,3", "4 6 1,2:-", "4 6 3,1:0,2")


def _strategy(n, stage):
    if stage == 3:  # every weight sharded
        return zero_strategy(n, stage=3, persistence_threshold=0)
    return zero_strategy(n)


def _fresh(n=2, stage=2, hidden=40):
    """A compiled, built, untrained model: the target of a restore."""
    with _strategy(n, stage).scope():
        model = mlp(hidden=hidden)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
        model.optimizer.build(model.trainable_variables)
    return model


def _trained(n, stage=2):
    with _strategy(n, stage).scope():
        model = mlp(hidden=40)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01), stage=stage),
                      loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    return model


def _assert_plain_keras_restores(prefix, saved):
    """A plain Keras model and optimizer, no strategy, read `prefix` as `saved`."""
    plain = mlp(hidden=40)
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).read(prefix).assert_consumed()
    for a, b in zip(_state(plain), saved):
        np.testing.assert_array_equal(a, b)


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
        restored = _fresh(n, stage)
        with monkeypatch.context() as patch:
            patch.setattr(UnshardedSlot, "assign", refuse)
            patch.setattr(UnshardedSlot, "value", refuse)
            tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
                prefix).assert_consumed()
        for a, b in zip(_state(restored), saved):
            np.testing.assert_array_equal(a, b)

    _assert_plain_keras_restores(prefix, saved)


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


def _data_files(prefix):
    import glob

    return sorted(glob.glob(str(prefix) + ".data-*"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tf_zero.Checkpoint at N=4, and a second save of other values."""
    path = tmp_path_factory.mktemp("sharded")
    model = _trained(4)
    prefix = tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(str(path / "a"))
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    other = tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(str(path / "b"))
    return prefix, other, model




def test_tf_zero_checkpoint_writes_slices_in_chunks(written, monkeypatch, tmp_path):
    prefix, _, _ = written
    assert len(_data_files(prefix)) >= 3  # the graph part, slices, the manifest
    model = _trained(4)
    # Small chunks: one write per slice; the checkpoint reads back the same.
    monkeypatch.setattr(tf_zero.checkpoint, "CHUNK_BYTES", 64)
    small = tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "s"))
    assert len(_data_files(small)) > 10
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    for n in (1, 3):
        restored = _fresh(n)
        tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).read(small).assert_consumed()
        for a, b in zip(_state(restored), _state(model)):
            np.testing.assert_array_equal(a, b)


def _unchanged_after(model, error, match, read):
    before = _state(model)
    with pytest.raises(error, match=match):
        read()
    for a, b in zip(_state(model), before):
        np.testing.assert_array_equal(a, b)  # nothing was restored


def _copy(prefix, to):
    import shutil

    for path in _data_files(prefix) + [str(prefix) + ".index"]:
        shutil.copy(path, str(to) + path[len(str(prefix)):])
    return str(to)


def test_bad_checkpoints_are_refused_before_anything_is_restored(written, tmp_path):
    prefix, other, _ = written
    model = _fresh()

    def read(path):
        return lambda: tf_zero.Checkpoint(model=model, optimizer=model.optimizer).read(path)

    # A missing data file.
    missing = _copy(prefix, tmp_path / "missing")
    victim = _data_files(missing)[1]
    os.remove(victim)
    _unchanged_after(model, FileNotFoundError, re.escape(victim), read(missing))
    # A truncated data file.
    truncated = _copy(prefix, tmp_path / "truncated")
    victim = _data_files(truncated)[1]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    _unchanged_after(model, ValueError, re.escape(victim) + ".*truncated", read(truncated))
    # A data file of another save of the same model (same size, other values).
    mixed = _copy(prefix, tmp_path / "mixed")
    victim = _data_files(mixed)[1]
    replacement = _data_files(other)[1]
    assert os.path.getsize(victim) == os.path.getsize(replacement)
    import shutil

    shutil.copy(replacement, victim)
    _unchanged_after(model, ValueError, re.escape(victim) + ".*another save", read(mixed))
    # The checkpoint of another model.
    wider = _fresh(hidden=41)
    _unchanged_after(wider, ValueError, "another model", lambda: tf_zero.Checkpoint(
        model=wider, optimizer=wider.optimizer).read(prefix))
    # No checkpoint at all.
    _unchanged_after(model, FileNotFoundError, "No checkpoint index", read(str(tmp_path / "none")))


def test_a_failed_save_leaves_the_previous_checkpoint(written, monkeypatch, tmp_path):
    _, _, model = written
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    prefix = checkpoint.write(str(tmp_path / "ckpt"))
    files = {p: open(p, "rb").read() for p in _data_files(prefix) + [prefix + ".index"]}
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    real = tf.raw_ops.SaveV2
    calls = []

    def failing(**kwargs):
        calls.append(kwargs["prefix"])
        if len(calls) == 2:  # the second chunk of slices
            raise OSError("disk full (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(tf.raw_ops, "SaveV2", failing)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.write(str(tmp_path / "ckpt"))
    monkeypatch.undo()
    assert {p: open(p, "rb").read() for p in files} == files  # untouched
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in files)
    tf_zero.checkpoint.check(prefix)


def test_consolidate_writes_a_plain_keras_weights_file(written, tmp_path):
    import subprocess
    import sys

    prefix, _, model = written
    factory = tmp_path / "factory.py"
    factory.write_text("import keras\n"
                       "def make():\n"
                       "    keras.utils.set_random_seed(7)\n"
                       "    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(40, 'relu'),"
                       " keras.layers.Dense(3)])\n")
    out = tmp_path / "m.weights.h5"
    r = subprocess.run([sys.executable, "-m", "tf_zero.checkpoint", "consolidate", prefix, str(out),
                        "--model", f"{factory}:make"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 4 weights" in r.stdout
    plain = mlp(hidden=40)
    plain.load_weights(str(out))
    reference = mlp(hidden=40, seed=3)
    tf.train.Checkpoint(model=reference).read(prefix).expect_partial()
    assert max(np.abs(a - b).max() for a, b in zip(mlp(hidden=40, seed=3).get_weights(),
                                                  reference.get_weights())) > 0
    for a, b in zip(plain.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    r = subprocess.run([sys.executable, "-m", "tf_zero.checkpoint", "check", prefix],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "complete" in r.stdout, r.stderr[-2000:]
    with pytest.raises(ValueError, match=".weights.h5"):
        tf_zero.checkpoint.consolidate(prefix, tmp_path / "m.h5", plain)


def test_stage3_weights_are_written_and_read_by_shards(tmp_path, monkeypatch):
    """tf_zero.Checkpoint writes a stage-3 weight from each replica's shard and
    reads it back by shards: no full weight is gathered either way."""
    from tf_zero.sharded_variable import ShardedVariable

    model = _trained(4, stage=3)
    saved = _state(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a full weight or slot was assembled")

    with monkeypatch.context() as patch:
        patch.setattr(ShardedVariable, "full_value", refuse)
        patch.setattr(UnshardedSlot, "value", refuse)
        prefix = tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(
            str(tmp_path / "ckpt"))
    key = next(k for k, shape in tf.train.list_variables(prefix)
               if not k.startswith("optimizer/_variables/") and shape == [8, 40])
    assert tf.train.load_checkpoint(prefix).get_tensor(key).shape == (8, 40)
    restored = _fresh(3, stage=3)
    assert tf_zero.is_sharded(restored.layers[0].kernel)
    with monkeypatch.context() as patch:
        patch.setattr(ShardedVariable, "assign", refuse)
        patch.setattr(UnshardedSlot, "assign", refuse)
        tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).read(
            prefix).assert_consumed()
    for a, b in zip(_state(restored), saved):
        np.testing.assert_array_equal(a, b)
    _assert_plain_keras_restores(prefix, saved)


@pytest.mark.parametrize("stage", [2, 3])
def test_keras_hub_gpt2_round_trips_across_replica_counts(tmp_path, stage):
    """A keras_hub GPT-2 trained by fit (with a Keras callback) on 4 replicas,
    saved by tf_zero.Checkpoint and read on 2: every weight and slot bit for bit."""
    keras_hub = pytest.importorskip("keras_hub")

    def build(n):
        with _strategy(n, stage).scope():
            keras.utils.set_random_seed(0)
            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=64,
                intermediate_dim=128, max_sequence_length=32)
            lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
            lm.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.AdamW(1e-3)),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return lm

    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 256, (16, 32)), "padding_mask": np.ones((16, 32), bool)}
    y = rng.integers(0, 256, (16, 32))
    lm = build(4)
    lm.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    prefix = tf_zero.Checkpoint(model=lm, optimizer=lm.optimizer).write(str(tmp_path / "lm"))
    restored = build(2)
    restored.optimizer.build(restored.trainable_variables)
    tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).read(prefix).assert_consumed()
    saved, got = _state(lm), _state(restored)
    assert len(got) == len(saved) > 100
    for a, b in zip(got, saved):
        np.testing.assert_array_equal(a, b)
