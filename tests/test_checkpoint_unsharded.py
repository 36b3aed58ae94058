"""Checkpoints look unsharded, lose nothing, and reload on any replica count."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy, mlp,
                      regression_data, zero_strategy)

import tf_zero

BATCH = 24
OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
              "adam": lambda: keras.optimizers.Adam(0.01),
              # Whole-variable partition; factored slots of other shapes than
              # their variables, named after the variable, not its path.
              "adafactor": lambda: keras.optimizers.Adafactor(0.01),
              # Whole-variable partition with split variables: the matrices
              # owned whole, the biases (Muon's AdamW) spread in runs.
              "muon": lambda: keras.optimizers.Muon(0.01)}


def compiled(strategy, make_opt, zero=True, stage=None):
    scope = strategy.scope() if strategy is not None else _null()
    with scope:
        model = mlp()
        opt = make_opt()
        if zero:
            opt = tf_zero.ZeroOptimizer(opt, stage=stage)
        model.compile(optimizer=opt, loss="mse")
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(model, epochs=1, initial_epoch=0, callbacks=()):
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs, initial_epoch=initial_epoch,
              shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def saved(request, tmp_path_factory):
    """One epoch at N=4 stage 2, saved both ways; and the uninterrupted run."""
    name = request.param
    make = OPTIMIZERS[name]
    path = tmp_path_factory.mktemp(f"ckpt_{name}")
    model = train(compiled(zero_strategy(4), make, stage=2))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=model.optimizer), str(path / "tf"), 2)
    prefix = manager.save()
    model.save_weights(str(path / "m.weights.h5"))
    model.save(str(path / "m.keras"))
    reference = train(compiled(zero_strategy(4), make, stage=2), epochs=2).get_weights()
    return dict(name=name, make=make, prefix=prefix, h5=str(path / "m.weights.h5"),
                keras=str(path / "m.keras"), reference=reference, model=model)


TARGETS = [("n1", 1, 2), ("n2", 2, 2), ("n3", 3, 2), ("n4", 4, 2), ("n4_stage1", 4, 1),
           ("no_strategy_plain", None, None)]


@pytest.mark.parametrize("target, n, stage", TARGETS, ids=[t[0] for t in TARGETS])
def test_tf_checkpoint_resumes_on_any_replica_count(saved, target, n, stage):
    if n is None:
        model = compiled(None, saved["make"], zero=False)
    else:
        model = compiled(zero_strategy(n), saved["make"], stage=stage)
    # Restored before the optimizer exists: the shards receive it at build.
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(
        saved["prefix"]).assert_existing_objects_matched()
    train(model, initial_epoch=1)
    assert max_weight_diff(model.get_weights(), saved["reference"]) < 1e-6
    if n:
        assert_replicas_identical(model)


@pytest.mark.parametrize("target, n, stage", TARGETS, ids=[t[0] for t in TARGETS])
def test_weights_h5_resumes_on_any_replica_count(saved, target, n, stage):
    if n is None:
        model = compiled(None, saved["make"], zero=False)
        model.optimizer.build(model.trainable_variables)
    else:
        model = compiled(zero_strategy(n), saved["make"], stage=stage)
    model.load_weights(saved["h5"])  # optimizer not built yet for ZeRO: deferred
    train(model, initial_epoch=1)
    assert max_weight_diff(model.get_weights(), saved["reference"]) < 1e-6


@pytest.mark.parametrize("n", [None, 3])
def test_keras_file_loads_anywhere(saved, n):
    if n is None:
        model = keras.models.load_model(saved["keras"])  # inference, no strategy
        assert not model.optimizer.is_sharded
    else:
        with zero_strategy(n).scope():
            model = keras.models.load_model(saved["keras"])
        assert model.optimizer.is_sharded
    x, _ = regression_data()
    np.testing.assert_allclose(model.predict(x[:8], verbose=0),
                               saved["model"].predict(x[:8], verbose=0), atol=1e-6)
    assert isinstance(model.optimizer, tf_zero.ZeroOptimizer)
    train(model, initial_epoch=1)
    assert max_weight_diff(model.get_weights(), saved["reference"]) < 1e-6


def test_checkpoint_moves_between_plans_with_and_without_buckets_of_their_own(tmp_path):
    """At 1 KiB buckets the 8x64 kernel is a bucket of its own; at the default
    size it shares one with the rest. A checkpoint written under either plan
    resumes under the other, on another replica count, as the run that was
    never interrupted."""
    def model_at(n, bucket_size_bytes):
        with zero_strategy(n).scope():
            model = mlp(hidden=64)
            model.compile(optimizer=tf_zero.ZeroOptimizer(
                OPTIMIZERS["adam"](), bucket_size_bytes=bucket_size_bytes), loss="mse")
        return model

    reference = train(model_at(4, 1024), epochs=2)
    assert [[s.size for s in b.segments] for b in reference.optimizer.plan.buckets] == [
        [512], [64, 192], [3]]
    for i, (saved_at, resumed_at) in enumerate([((4, 1024), (3, None)), ((3, None), (4, 1024))]):
        model = train(model_at(*saved_at))
        prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
            str(tmp_path / f"c{i}"))
        resumed = model_at(*resumed_at)
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
            prefix).assert_existing_objects_matched()
        train(resumed, initial_epoch=1)
        assert max_weight_diff(resumed.get_weights(), reference.get_weights()) < 1e-6
        assert_replicas_identical(resumed)


def test_restore_into_a_built_optimizer(saved):
    model = compiled(zero_strategy(2), saved["make"])
    model.optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(saved["prefix"])
    train(model, initial_epoch=1)
    assert max_weight_diff(model.get_weights(), saved["reference"]) < 1e-6


def test_plain_keras_checkpoint_restores_into_zero(tmp_path):
    make = OPTIMIZERS["adam"]
    plain = train(compiled(mirrored_strategy(4), make, zero=False))
    prefix = tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).write(
        str(tmp_path / "plain"))
    plain.save_weights(str(tmp_path / "plain.weights.h5"))
    reference = train(plain, initial_epoch=1).get_weights()
    for how in ("tf", "h5"):
        model = compiled(zero_strategy(3), make)
        if how == "tf":
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(prefix)
        else:
            model.load_weights(str(tmp_path / "plain.weights.h5"))
        train(model, initial_epoch=1)
        assert max_weight_diff(model.get_weights(), reference) < 1e-6, how


def test_saved_slots_hold_every_replicas_shard(tmp_path):
    """Regression: a naive save keeps replica 0's shard only (data loss)."""
    make = OPTIMIZERS["adam"]
    zero = train(compiled(zero_strategy(4), make))
    plain = train(compiled(mirrored_strategy(4), make, zero=False))
    zp = tf.train.Checkpoint(optimizer=zero.optimizer).write(str(tmp_path / "z"))
    pp = tf.train.Checkpoint(optimizer=plain.optimizer).write(str(tmp_path / "p"))
    zr, pr = tf.train.load_checkpoint(zp), tf.train.load_checkpoint(pp)
    keys = [k for k, _ in tf.train.list_variables(pp) if k.startswith("optimizer/_variables/")]
    assert sorted(keys) == sorted(k for k, _ in tf.train.list_variables(zp)
                                  if k.startswith("optimizer/_variables/"))
    assert len(keys) == 2 * 4  # Adam: momentum and velocity of 4 variables
    for key in keys:
        np.testing.assert_allclose(zr.get_tensor(key), pr.get_tensor(key), atol=1e-6)
        assert np.count_nonzero(zr.get_tensor(key)) > 0.9 * zr.get_tensor(key).size


class _Crash(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("name", ["adam", "muon"])  # element split; whole variables and runs
def test_backup_and_restore_resumes_after_a_crash(tmp_path, name):
    make = OPTIMIZERS[name]
    reference = train(compiled(zero_strategy(4), make), epochs=3).get_weights()
    backup = str(tmp_path / "backup")
    model = compiled(zero_strategy(4), make)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup),
                                          _Crash(epoch=2, batch=2)])
    resumed = compiled(zero_strategy(4), make)  # a fresh process would do this
    train(resumed, epochs=3, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6
    assert int(resumed.optimizer.iterations.numpy()) == 12


def test_model_checkpoint_callback(tmp_path):
    model = compiled(zero_strategy(2), OPTIMIZERS["adam"])
    path = str(tmp_path / "e{epoch}.weights.h5")
    train(model, epochs=2, callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    restored = compiled(zero_strategy(4), OPTIMIZERS["adam"])
    restored.load_weights(str(tmp_path / "e2.weights.h5"))
    restored.optimizer.build(restored.trainable_variables)
    assert int(restored.optimizer.iterations.numpy()) == 8
    assert max_weight_diff(restored.get_weights(), model.get_weights()) == 0


def test_mismatched_checkpoints_raise(tmp_path, saved):
    # A different model: same optimizer, other shapes.
    with zero_strategy(2).scope():
        other = mlp(hidden=5)
        other.compile(optimizer=tf_zero.ZeroOptimizer(saved["make"]()), loss="mse")
        other.optimizer.build(other.trainable_variables)
    # Sliced slots: TensorFlow's restore op compares the shapes before reading
    # (InvalidArgumentError naming the key and both shapes); whole tensors: assign.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="shape"):
        tf.train.Checkpoint(optimizer=other.optimizer).restore(saved["prefix"])
    # A different inner optimizer: other slot count.
    model = compiled(zero_strategy(2), lambda: keras.optimizers.RMSprop(centered=True))
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="different (model or )?optimizer"):
        model.load_weights(saved["h5"])


@pytest.mark.parametrize("stage", [2, 3])
def test_tf_zero_backup_and_restore_single_process(tmp_path, stage):
    from tf_zero.callbacks import BackupAndRestore

    make = OPTIMIZERS["adam"]
    strategy = zero_strategy(2, stage=stage, persistence_threshold=0)
    reference = train(compiled(strategy, make), epochs=3).get_weights()
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(strategy, make), epochs=3,
              callbacks=[BackupAndRestore(backup), _Crash(epoch=1, batch=1)])
    assert sorted(__import__("os").listdir(backup)) == ["backup-000001-000000.weights.h5",
                                                        "latest.json"]
    resumed = train(compiled(strategy, make), epochs=3,
                    callbacks=[BackupAndRestore(backup)])
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


def test_export_and_saved_model_serve_the_trained_model(tmp_path, saved):
    """model.export and tf.saved_model.save work with a sharded optimizer."""
    model = saved["model"]
    x, _ = regression_data()
    want = model.predict(x[:8], verbose=0)
    model.export(str(tmp_path / "exported"))
    served = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(served.serve(x[:8]).numpy(), want, atol=1e-6)
    # The raw SavedModel keeps the weights (and the step, not the shards).
    tf.saved_model.save(model, str(tmp_path / "saved_model"))
    reader = tf.train.load_checkpoint(str(tmp_path / "saved_model" / "variables" / "variables"))
    stored = sorted((k for k in reader.get_variable_to_shape_map() if "kernel" in k))
    assert stored
    kernels = [w for w in model.get_weights() if w.ndim == 2]
    assert any(np.array_equal(reader.get_tensor(k), kernels[0]) for k in stored)
