"""`tf_zero.Checkpoint` saved in the background: the snapshot of the call,
training going on meanwhile, failures raised by the next save or `sync`.
Multi-worker faults in the background path are in test_checkpoint_async_faults.py."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp, regression_data, zero_strategy
from sliced_models import fresh_model, training_state

import tf_zero
from tf_zero.checkpoint import parallel

ASYNC = tf.train.CheckpointOptions(enable_async=True)


@pytest.fixture
def held(monkeypatch):
    """Background saves wait, before writing anything, until `release` is set."""
    started, release = threading.Event(), threading.Event()
    run = parallel._Save._run

    def held_run(save):
        started.set()
        assert release.wait(120), "the test never released the background save"
        run(save)

    monkeypatch.setattr(parallel._Save, "_run", held_run)
    return started, release


def _model(n, stage, optimizer):
    with (zero_strategy(n, stage=3, persistence_threshold=0) if stage == 3
          else zero_strategy(n)).scope():
        model = mlp(hidden=40)
        model.compile(optimizer=tf_zero.ZeroOptimizer(optimizer(), stage=stage), loss="mse")
        model.optimizer.build(model.trainable_variables)
    return model


OPTIMIZERS = {"adam": lambda: keras.optimizers.Adam(0.01),
              "lamb": lambda: keras.optimizers.Lamb(0.01)}  # slots placed whole, by owner


@pytest.mark.parametrize("stage,optimizer", [(1, "adam"), (2, "adam"), (3, "adam"), (2, "lamb")])
def test_a_background_save_holds_the_state_of_the_call_while_training_goes_on(
        tmp_path, held, stage, optimizer):
    started, release = held
    x, y = regression_data()
    model = _model(4, stage, OPTIMIZERS[optimizer])
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    snapshot = training_state(model)
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), 3)
    path = manager.save(options=ASYNC)
    assert started.wait(60)
    assert not tf.io.gfile.exists(path + ".index")  # returned before writing anything
    # Training goes on while the save waits: every value changes in place.
    model.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0)
    trained = training_state(model)
    assert all(not np.array_equal(a, b) for a, b in zip(snapshot, trained)
               if a.size > 1)  # every tensor but the learning rate
    # A restore (another checkpoint object) waits for the background save.
    threading.Timer(0.5, release.set).start()
    restored = _model(3, stage, OPTIMIZERS[optimizer])
    tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).restore(
        path).assert_consumed()
    for a, b in zip(training_state(restored), snapshot):
        np.testing.assert_array_equal(a, b)
    checkpoint.sync()
    assert manager.latest_checkpoint == path
    assert tf.train.latest_checkpoint(str(tmp_path)) == path
    if optimizer == "adam":  # an ordinary TensorFlow checkpoint: plain Keras restores it
        plain = mlp(hidden=40)
        plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        plain.optimizer.build(plain.trainable_variables)
        tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).restore(
            path).assert_consumed()
        for a, b in zip(training_state(plain), snapshot):
            np.testing.assert_array_equal(a, b)
    # TensorFlow's Checkpoint.save numbers it and records it once written.
    again = checkpoint.save(str(tmp_path / "own"), options=ASYNC)
    checkpoint.sync()
    assert tf.train.latest_checkpoint(str(tmp_path)) == again
    reread = _model(2, stage, OPTIMIZERS[optimizer])
    tf_zero.Checkpoint(model=reread, optimizer=reread.optimizer).restore(again).assert_consumed()
    for a, b in zip(training_state(reread), trained):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(training_state(model), trained):  # nothing written into the model
        np.testing.assert_array_equal(a, b)


def _failing_once(monkeypatch):
    write = parallel._write_entries
    failures = [OSError("No space left on device (simulated)")]

    def failing(*args, **kwargs):
        if failures:
            raise failures.pop()
        return write(*args, **kwargs)

    monkeypatch.setattr(parallel, "_write_entries", failing)


def test_a_failed_background_save_is_raised_by_the_next_save_and_publishes_nothing(
        tmp_path, monkeypatch):
    model = fresh_model(4)
    x, y = regression_data()
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), 3)
    first = manager.save(options=ASYNC)
    checkpoint.sync()
    saved = training_state(model)
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0)
    _failing_once(monkeypatch)
    failed = manager.save(options=ASYNC)  # returns: the failure comes in the background
    with pytest.raises(OSError, match="No space left"):
        manager.save(options=ASYNC)
    assert not tf.io.gfile.exists(failed + ".index")
    assert manager.latest_checkpoint == first
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    restored = fresh_model(2)
    tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).restore(
        tf.train.latest_checkpoint(str(tmp_path))).assert_consumed()
    for a, b in zip(training_state(restored), saved):
        np.testing.assert_array_equal(a, b)
    # Raised once; the next saves work; `sync` raises a failure as well.
    path = manager.save(options=ASYNC)
    checkpoint.sync()
    assert manager.latest_checkpoint == path
    _failing_once(monkeypatch)
    checkpoint.write(str(tmp_path / "w"), options=ASYNC)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.sync()
    checkpoint.sync()
    assert not tf.io.gfile.exists(str(tmp_path / "w.index"))
    # A save nobody waits for leaves the process's list once it has written;
    # a failed one stays listed until it is raised (or reported at exit).
    unwaited = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    unwaited.write(str(tmp_path / "u"), options=ASYNC)
    written = unwaited._tf_zero_save  # noqa: SLF001
    written.thread.join()
    assert written not in parallel._pending  # noqa: SLF001
    _failing_once(monkeypatch)
    unwaited.write(str(tmp_path / "v"), options=ASYNC)
    failed = unwaited._tf_zero_save  # noqa: SLF001
    failed.thread.join()
    assert failed in parallel._pending  # noqa: SLF001
    assert failed.error in parallel.wait_for_saves()
    with pytest.raises(OSError, match="No space left"):
        unwaited.sync()
    assert failed not in parallel._pending  # noqa: SLF001


def test_a_save_without_sharded_state_is_tensorflows_own_asynchronous_save(tmp_path):
    """No ZeroStrategy: TensorFlow's asynchronous checkpoint, restored as ever."""
    model = mlp(hidden=5)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.optimizer.build(model.trainable_variables)
    checkpoint = tf_zero.Checkpoint(model=model, optimizer=model.optimizer)
    path = checkpoint.save(str(tmp_path / "plain"), options=ASYNC)
    checkpoint.sync()
    other = mlp(hidden=5, seed=2)
    tf_zero.Checkpoint(model=other).read(path).expect_partial()
    for a, b in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
