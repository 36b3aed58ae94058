"""tf_zero.callbacks in one process: exact mid-epoch resume, SIGTERM, bad backups."""

import json
import os
import signal
import time

import keras
import pytest
from conftest import max_weight_diff, mlp, regression_data, zero_strategy

import tf_zero
from tf_zero.callbacks import PREEMPTED_EXIT_CODE, BackupAndRestore

BATCH = 24  # 96 samples: 4 batches per epoch


def compiled(strategy, hidden=7, make_opt=lambda: keras.optimizers.Adam(0.01), stage=None):
    with strategy.scope():
        model = mlp(hidden=hidden)
        model.compile(optimizer=tf_zero.ZeroOptimizer(make_opt(), stage=stage), loss="mse")
    return model


def train(model, callbacks=(), epochs=3):
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


class Trace(keras.callbacks.Callback):
    """Records (epoch, batch) of every batch trained."""

    def __init__(self):
        super().__init__()
        self.batches, self.epoch = [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.append((self.epoch, batch))


class SignalAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch, action):
        super().__init__()
        self.at, self.action, self.epoch = (epoch, batch), action, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.action()


def crash():
    raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def reference():
    return train(compiled(zero_strategy(4))).get_weights()


def test_import_tf_zero_exposes_callbacks():
    assert tf_zero.callbacks.BackupAndRestore is BackupAndRestore
    with pytest.raises(ValueError, match="positive number of batches"):
        BackupAndRestore("d", save_freq=0)


@pytest.mark.parametrize("make_callback", [BackupAndRestore, keras.callbacks.BackupAndRestore],
                         ids=["tf_zero", "keras"])
def test_mid_epoch_backup_resumes_at_that_batch(tmp_path, reference, make_callback):
    """save_freq=3 over 4-batch epochs: a crash in epoch 1 resumes after batch 2 of it.

    Keras' own callback (under a ZeroStrategy it runs as tf_zero's) would
    restart epoch 1 on weights that already saw its first batches.
    """
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(4)),
              [make_callback(backup, save_freq=3), SignalAt(1, 3, crash)])
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (1, 2)
    trace = Trace()
    resumed = train(compiled(zero_strategy(2)), [make_callback(backup, save_freq=3), trace])
    assert trace.batches[0] == (latest["epoch"], latest["batch"])
    assert len(trace.batches) == 12 - (4 * latest["epoch"] + latest["batch"])
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6
    assert int(resumed.optimizer.iterations.numpy()) == 12
    assert not os.path.exists(backup)  # removed after a complete run


def test_sigterm_saves_that_step_and_exits(tmp_path, reference):
    """SIGTERM in epoch 1 batch 1: backup after that batch, exit 75, exact resume."""
    backup = str(tmp_path / "b")
    callback = BackupAndRestore(backup)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        train(compiled(zero_strategy(4)),
              [callback, SignalAt(1, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    print(f"signal to exit: {callback.last_preemption_seconds:.3f}s "
          f"(whole interrupted fit {time.monotonic() - start:.1f}s)")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (1, 2)
    trace = Trace()
    resumed = train(compiled(zero_strategy(4)), [BackupAndRestore(backup), trace])
    assert trace.batches[:2] == [(1, 2), (1, 3)] and len(trace.batches) == 6
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


def test_backup_restores_at_another_replica_count_and_stage(tmp_path, reference):
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(4), stage=2),
              [BackupAndRestore(backup), SignalAt(1, 1, crash)])
    resumed = train(compiled(zero_strategy(3), stage=1), [BackupAndRestore(backup)])
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


@pytest.fixture
def interrupted(tmp_path):
    """A backup directory left by a crash in epoch 1 (backup of epoch 0's end)."""
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(2)), [BackupAndRestore(backup), SignalAt(1, 0, crash)])
    latest = json.load(open(os.path.join(backup, "latest.json")))
    return backup, os.path.join(backup, latest["weights"])


def _restore(backup, **kwargs):
    train(compiled(zero_strategy(2), **kwargs), [BackupAndRestore(backup)], epochs=1)


def test_truncated_backup_is_refused(interrupted):
    backup, weights = interrupted
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        _restore(backup)


def test_corrupted_backup_is_refused(interrupted):
    backup, weights = interrupted
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted.*checksum differs"):
        _restore(backup)


def test_backup_of_another_model_is_refused(interrupted):
    backup, _ = interrupted
    with pytest.raises(ValueError, match="written for another model"):
        _restore(backup, hidden=5)
    with pytest.raises(ValueError, match="optimizer SGD"):
        _restore(backup, make_opt=lambda: keras.optimizers.SGD())


def test_damaged_pointer_and_missing_file_are_refused(interrupted):
    backup, weights = interrupted
    os.remove(weights)
    with pytest.raises(ValueError, match="missing: another job"):
        _restore(backup)
    open(os.path.join(backup, "latest.json"), "w").write("{\"epoch\": 1")
    with pytest.raises(ValueError, match="not a tf_zero backup pointer"):
        _restore(backup)


def test_directory_written_by_two_jobs_is_refused(interrupted):
    """Another job replacing latest.json while this one trains stops this one's backups."""
    backup, _ = interrupted
    pointer = os.path.join(backup, "latest.json")

    def other_job_writes():
        latest = json.load(open(pointer))
        latest["job"] = "another-job"
        json.dump(latest, open(pointer, "w"))

    with pytest.raises(RuntimeError, match="also written by another job"):
        train(compiled(zero_strategy(2)),
              [BackupAndRestore(backup), SignalAt(1, 2, other_job_writes)])


def test_keras_layout_backup_is_refused(tmp_path):
    """A directory Keras' own callback wrote (no batch, no checksum) is not skipped silently."""
    backup = tmp_path / "b"
    backup.mkdir()
    (backup / "latest.weights.h5").write_bytes(b"")
    (backup / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    with pytest.raises(ValueError, match="Keras' own layout"):
        _restore(str(backup))
