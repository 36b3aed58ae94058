"""tf_zero.callbacks in one process: exact mid-epoch resume, SIGTERM, bad backups."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import pytest
import tensorflow as tf
from conftest import max_weight_diff, mlp, regression_data, zero_strategy

import tf_zero
from tf_zero.callbacks import PREEMPTED_EXIT_CODE, BackupAndRestore
from tf_zero.checkpoint.parallel import wait_for_saves

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


CALLBACKS = pytest.mark.parametrize(
    "make_callback", [BackupAndRestore, keras.callbacks.BackupAndRestore,
                      functools.partial(BackupAndRestore, sharded=True, asynchronous=True)],
    ids=["tf_zero", "keras", "tf_zero_sharded_async"])


def test_import_tf_zero_exposes_callbacks():
    assert tf_zero.callbacks.BackupAndRestore is BackupAndRestore
    with pytest.raises(ValueError, match="positive number of batches"):
        BackupAndRestore("d", save_freq=0)
    with pytest.raises(ValueError, match="pass sharded=True"):
        BackupAndRestore("d", asynchronous=True)


@CALLBACKS
def test_mid_epoch_backup_resumes_at_that_batch(tmp_path, reference, make_callback):
    """save_freq=3 over 4-batch epochs: a crash in epoch 1 resumes after batch 2 of it.

    Keras' own callback (under a ZeroStrategy it runs as tf_zero's) would
    restart epoch 1 on weights that already saw its first batches.
    """
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(4)),
              [make_callback(backup, save_freq=3), SignalAt(1, 3, crash)])
    wait_for_saves()  # as the process would at exit: an asynchronous backup in flight
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (1, 2)
    trace = Trace()
    resumed = train(compiled(zero_strategy(2)), [make_callback(backup, save_freq=3), trace])
    assert trace.batches[0] == (latest["epoch"], latest["batch"])
    assert len(trace.batches) == 12 - (4 * latest["epoch"] + latest["batch"])
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6
    assert int(resumed.optimizer.iterations.numpy()) == 12
    assert not os.path.exists(backup)  # removed after a complete run


@pytest.mark.parametrize("kind", [{}, {"sharded": True, "asynchronous": True}],
                         ids=["weights_h5", "sharded_async"])
def test_sigterm_saves_that_step_and_exits(tmp_path, reference, kind):
    """SIGTERM in epoch 1 batch 1: backup after that batch, exit 75, exact resume.
    Asynchronous backups: the preemption's is written in the foreground."""
    backup = str(tmp_path / "b")
    callback = BackupAndRestore(backup, **kind)
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
    resumed = train(compiled(zero_strategy(4)), [BackupAndRestore(backup, **kind), trace])
    assert trace.batches[:2] == [(1, 2), (1, 3)] and len(trace.batches) == 6
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


class SignalAtTheEnd(keras.callbacks.Callback):
    """SIGTERM to this process as the last epoch ends (after the last step)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.params["epochs"] - 1:
            os.kill(os.getpid(), signal.SIGTERM)


@CALLBACKS
def test_sigterm_after_the_last_step_keeps_the_completed_fit(tmp_path, reference, make_callback):
    """A SIGTERM after the last step boundary used to be dropped (fit ended,
    its backups removed, the process trained on into whatever followed). Now
    the completed state is backed up at (epochs, 0), the worker exits 75, and
    a relaunch trains nothing and has the complete weights."""
    backup = str(tmp_path / "b")
    with pytest.raises(SystemExit) as exit_info:
        train(compiled(zero_strategy(4)), [make_callback(backup), SignalAtTheEnd()])
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (3, 0)
    trace = Trace()
    with pytest.warns(UserWarning, match="trains nothing"):
        resumed = train(compiled(zero_strategy(2)), [make_callback(backup), trace])
    assert trace.batches == []
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6
    assert int(resumed.optimizer.iterations.numpy()) == 12


@CALLBACKS
def test_backup_after_an_epochs_last_batch_resumes_at_the_next_epoch(
        tmp_path, reference, make_callback):
    """save_freq=2 divides the 4-batch epoch: the backup after epoch 1's last batch is (2, 0)."""
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(4)),
              [make_callback(backup, save_freq=2), SignalAt(2, 0, crash)])
    wait_for_saves()
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (2, 0)
    sharded = isinstance(make_callback, functools.partial)
    assert latest["weights"] == "backup-000002-000000" + ("" if sharded else ".weights.h5")
    trace = Trace()
    resumed = train(compiled(zero_strategy(2)), [make_callback(backup, save_freq=2), trace])
    assert trace.batches == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6
    assert int(resumed.optimizer.iterations.numpy()) == 12


def test_pointer_at_an_epochs_end_resumes_at_the_next_epoch(tmp_path, reference):
    """A latest.json that says (1, 4) after 4-batch epochs, as backups used to, resumes at (2, 0)."""
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(4)), [BackupAndRestore(backup), SignalAt(2, 0, crash)])
    pointer = os.path.join(backup, "latest.json")
    latest = json.load(open(pointer))
    assert (latest["epoch"], latest["batch"]) == (2, 0)
    old_name = "backup-000001-000004.weights.h5"
    os.rename(os.path.join(backup, latest["weights"]), os.path.join(backup, old_name))
    latest.update(epoch=1, batch=4, weights=old_name)
    json.dump(latest, open(pointer, "w"))
    trace = Trace()
    resumed = train(compiled(zero_strategy(4)), [BackupAndRestore(backup), trace])
    assert trace.batches == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert max_weight_diff(resumed.get_weights(), reference) < 1e-6


def test_backup_at_the_end_of_an_epoch_of_unknown_length_resumes(tmp_path):
    """Without a known epoch length the backup stays (1, 4); the skip then ends epoch 1."""
    x, y = regression_data()

    def unknown_length():
        return tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(BATCH)

    reference = compiled(zero_strategy(4))
    reference.fit(unknown_length(), epochs=3, verbose=0)
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        compiled(zero_strategy(4)).fit(
            unknown_length(), epochs=3, verbose=0,
            callbacks=[BackupAndRestore(backup, save_freq=2), SignalAt(2, 0, crash)])
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (1, 4)
    resumed, trace = compiled(zero_strategy(4)), Trace()
    resumed.fit(unknown_length(), epochs=3, verbose=0,
                callbacks=[BackupAndRestore(backup, save_freq=2), trace])
    # Keras begins a batch more at the end of an epoch of unknown length and
    # finds the data exhausted: (1, 4) ends epoch 1, (2, 4) epoch 2.
    assert trace.batches == [(1, 4), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert max_weight_diff(resumed.get_weights(), reference.get_weights()) < 1e-6


def test_backup_past_the_end_of_this_fits_epochs_is_refused(tmp_path):
    """A backup after 3 batches of 4 cannot resume a fit whose epochs have 2 (batch size 48)."""
    backup = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compiled(zero_strategy(2)),
              [BackupAndRestore(backup, save_freq=3), SignalAt(0, 3, crash)])
    x, y = regression_data()
    with pytest.raises(ValueError, match="after 3 batches of epoch 0, but this fit's epochs "
                                         "have 2 batches"):
        compiled(zero_strategy(2)).fit(x, y, batch_size=48, epochs=1, verbose=0,
                                       callbacks=[BackupAndRestore(backup)])


def test_sigterm_in_an_epochs_last_batch_resumes_at_the_next_epoch(tmp_path, reference):
    backup = str(tmp_path / "b")
    with pytest.raises(SystemExit) as exit_info:
        train(compiled(zero_strategy(4)),
              [BackupAndRestore(backup),
               SignalAt(1, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))])
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (2, 0)
    trace = Trace()
    resumed = train(compiled(zero_strategy(4)), [BackupAndRestore(backup), trace])
    assert trace.batches == [(2, 0), (2, 1), (2, 2), (2, 3)]
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


def test_pointer_checked_against_its_weights_file_name(interrupted):
    """latest.json's epoch and batch must be whole numbers and those the weights
    file's name records; a resume at or past this fit's epochs warns."""
    backup, weights = interrupted
    pointer = os.path.join(backup, "latest.json")
    latest = json.load(open(pointer))
    assert (latest["epoch"], latest["batch"]) == (1, 0)

    def edited(**fields):
        json.dump(dict(latest, **fields), open(pointer, "w"))

    edited(epoch=2)  # moved by one: would train on from the wrong point
    with pytest.raises(ValueError, match=re.escape(pointer) + r" says epoch 2 batch 0, but the "
                       r"weights file it names, backup-000001-000000.weights.h5, was written at "
                       r"epoch 1 after 0 batches.*Set \"epoch\": 1 and \"batch\": 0"):
        _restore(backup)
    edited(epoch="one")
    with pytest.raises(ValueError, match=re.escape(pointer) + r' has "epoch": "one", which is '
                       "not a whole number"):
        _restore(backup)
    edited(weights="weights.h5")
    with pytest.raises(ValueError, match="names the weights file 'weights.h5'"):
        _restore(backup)
    edited()
    with pytest.warns(UserWarning, match=r"resumes at epoch 1 batch 0, but this fit runs 1 "
                      r"epochs \(0 to 0\): it trains nothing"):
        _restore(backup)


def test_next_backup_sweeps_what_killed_saves_left(interrupted):
    """A temporary weights file of a killed backup, a staging directory of a
    killed tf_zero.Checkpoint: gone after the next backup, and with them the
    directory when the run ends."""
    backup, _ = interrupted
    name = "backup-000001-000002.weights.h5"
    stale_file = os.path.join(backup, f".{name}.tmp-worker0-4242-{name}")
    stale_dir = os.path.join(backup, ".ckpt-3.staging-0123456789ab")
    open(stale_file, "wb").write(b"half a file")
    os.makedirs(stale_dir)
    open(os.path.join(stale_dir, "part-00000-00000.index"), "wb").write(b"")
    train(compiled(zero_strategy(2)), [BackupAndRestore(backup)], epochs=2)
    assert not os.path.exists(backup)


def test_scratch_copies_of_killed_workers_are_swept(tmp_path):
    """The copy a non-chief worker writes and discards in a save, left by a
    worker killed mid-save, goes with the next save on that host; a running
    process's stays."""
    from tf_zero.fault import debris

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    stale = tmp_path / f"tf_zero_worker1-{int(ended.stdout)}-x1y2"
    stale.mkdir()
    (stale / "backup-000000-000003.weights.h5").write_bytes(b"a discarded copy")
    mine = debris.scratch_directory(1, parent=str(tmp_path))
    (tmp_path / "tf_zero_worker1_abc").mkdir()  # no process id: not one of these
    assert debris.sweep_scratch(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), "tf_zero_worker1_abc"])


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
