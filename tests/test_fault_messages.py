"""What a worker says when a save or a signal goes wrong under several workers
says what happened: the coordination service lost rather than a timeout,
whether the chief had published, which worker failed and on which target,
and whether earlier backups stand."""

import signal
import threading
import types

import pytest
import tensorflow as tf

from tf_zero import _private
from tf_zero.fault import coordination, preemption, saving


@pytest.fixture
def worker_1_of_2(monkeypatch):
    """This process as worker 1 (not the chief) of a 2-worker job whose
    key-value store answers with `store[key]` or raises what it holds."""
    store = {}
    monkeypatch.setattr(_private, "in_multi_worker_mode", lambda strategy: True)
    monkeypatch.setattr(_private, "worker_index", lambda strategy: 1)
    monkeypatch.setattr(_private, "worker_count", lambda strategy: 2)
    monkeypatch.setattr(_private, "is_chief", lambda strategy: False)
    monkeypatch.setattr(_private, "kv_set", lambda key, value: store.setdefault(key, value))

    def kv_get(key, timeout_ms=0):
        value = store.get(key, store.get("*"))
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(_private, "kv_get", kv_get)
    return store


def test_a_chief_gone_is_not_called_a_timeout_nor_nothing_published(worker_1_of_2):
    worker_1_of_2["*"] = tf.errors.UnavailableError(None, None, "Socket closed")
    with pytest.raises(RuntimeError) as raised:
        coordination.worker_agreement(None, True, "whether the chief published ckpt-3 is "
                                                  "unknown here: check it")
    text = str(raised.value)
    assert "Worker 0's outcome of a save could not be learned (whether the chief published " \
           "ckpt-3 is unknown here: check it)" in text
    assert "did not answer (UnavailableError" in text and "exited or died" in text
    assert "within" not in text and "othing was published" not in text
    worker_1_of_2["*"] = tf.errors.DeadlineExceededError(None, None, "timed out")
    with pytest.raises(RuntimeError, match=r"could not be learned within 300s"):
        coordination.worker_agreement(None, True)


def test_a_failed_save_names_the_worker_and_the_target(worker_1_of_2, tmp_path):
    model = types.SimpleNamespace(distribute_strategy=None)
    target = str(tmp_path / "model.weights.h5")

    def fails(path):
        raise OSError(f"disk full writing {path}")

    worker_1_of_2["*"] = "ok"  # the chief's outcome
    with pytest.raises(RuntimeError, match=rf"Saving {target} failed on worker 1, which joins "
                                           r"the chief's collective reads and writes a scratch "
                                           r"copy in .*tf_zero_worker1-.* OSError: disk full"):
        saving.publish(model, target, fails)
    # As the chief's peer reports the chief's failure: named, nothing published.
    worker_1_of_2.clear()
    worker_1_of_2["*"] = "failed"
    with pytest.raises(RuntimeError, match=rf"Saving {target} failed on worker 0 \(see its "
                                           r"log\); the chief failed, so nothing was "
                                           rf"published and the previous {target}, if any, is "
                                           r"intact"):
        saving.publish(model, target, lambda path: None)


def test_the_chief_publishes_only_once_every_worker_has_written(worker_1_of_2, monkeypatch,
                                                                 tmp_path):
    """As the chief: worker 1's write fails, so the new file is not published
    and the previous one stands; when every worker wrote, it is."""
    monkeypatch.setattr(_private, "worker_index", lambda strategy: 0)
    monkeypatch.setattr(_private, "is_chief", lambda strategy: True)
    model = types.SimpleNamespace(distribute_strategy=None)
    target = tmp_path / "model.weights.h5"
    target.write_text("previous")

    def write(path):
        with open(path, "w") as f:
            f.write("new")

    worker_1_of_2["*"] = "failed"  # worker 1's outcome
    with pytest.raises(RuntimeError, match=rf"Saving {target} failed on worker 1 \(see its "
                                           r"log\); nothing was published and the previous"):
        saving.publish(model, str(target), write)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.weights.h5"]
    worker_1_of_2.clear()
    worker_1_of_2["*"] = "ok"
    saving.publish(model, str(target), write)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.weights.h5"]


@pytest.mark.parametrize("watched, removed, said", [
    (0, False, "no backup callback (tf_zero.callbacks.BackupAndRestore or keras.callbacks."
               "BackupAndRestore) is saving this run, so nothing was saved. Exiting with "
               "status 143."),
    (1, False, "no fit with a backup callback is running at this moment, so nothing was saved "
               "for this signal; a relaunch resumes from the last complete backup. Exiting"),
    (1, True, "the last fit with a backup callback completed and removed its backups "
              "(delete_checkpoint=True), so nothing was saved for this signal; a relaunch "
              "trains from the start. Exiting"),
])
def test_sigterm_outside_a_watched_fit_says_whether_backups_stand(
        monkeypatch, capsys, watched, removed, said):
    monkeypatch.setattr(_private, "worker_index", lambda strategy: 3)
    monkeypatch.setattr(preemption, "_watched_fits", watched)
    monkeypatch.setattr(preemption, "_fit_removed_backups", removed)

    def exit(code):
        raise SystemExit(code)

    monkeypatch.setattr(preemption.os, "_exit", exit)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        preemption.exit_on_sigterm(None)
        with pytest.raises(SystemExit, match="143"):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert f"[tf_zero] worker 3: SIGTERM received; {said}" in capsys.readouterr().err


@pytest.fixture
def two_watches(monkeypatch):
    """Two workers' PreemptionWatch of one fit, in this process, over a shared
    key-value store (kv_get blocks until the key is set)."""
    store, changed = {}, threading.Condition()
    monkeypatch.setattr(_private, "in_multi_worker_mode", lambda strategy: True)
    monkeypatch.setattr(_private, "worker_index", lambda strategy: strategy)
    monkeypatch.setattr(_private, "worker_count", lambda strategy: 2)
    monkeypatch.setattr(_private, "on_fit_exit", lambda release: None)

    def kv_set(key, value):
        with changed:
            if key in store:
                return False
            store[key] = value
            changed.notify_all()
            return True

    def kv_get(key, timeout_ms=0):
        with changed:
            assert changed.wait_for(lambda: key in store, timeout=20), f"{key} never set"
            return store[key]

    monkeypatch.setattr(_private, "kv_set", kv_set)
    monkeypatch.setattr(_private, "kv_get", kv_get)
    counter = next(preemption._fit_counter)
    watches = []
    for worker in (0, 1):
        monkeypatch.setattr(preemption, "_fit_counter", iter([counter]))
        watches.append(preemption.PreemptionWatch(worker))
    previous = signal.getsignal(signal.SIGTERM)
    yield watches, store
    for watch in watches:
        watch.stop()
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_after_the_last_step_is_agreed_by_every_worker(two_watches):
    """Worker 1's SIGTERM comes after the last step boundary: both workers'
    end of fit says "save now" (the first value in the store wins)."""
    (w0, w1), store = two_watches
    for watch in (w0, w1):
        watch.start()
        assert not watch.step_boundary()  # the last step
    w1._on_sigterm(signal.SIGTERM, None)
    assert w1.stop(at_end=True) is True
    assert w0.stop(at_end=True) is True  # its watcher read worker 1's "end"
    assert list(store.values()).count("end") == 1


def test_a_sigterm_that_loses_to_the_end_of_fit_waits_for_no_one(two_watches):
    """Worker 0 ended fit (no signal) and wrote "stop"; worker 1's SIGTERM in
    its last step boundary then announces in vain: it returns at once (it
    used to wait for acknowledgements that never come), and its end of fit
    says "no save" like worker 0's; the signal is its own (`received`)."""
    (w0, w1), store = two_watches
    for watch in (w0, w1):
        watch.start()
    assert w0.stop(at_end=True) is False
    w1._on_sigterm(signal.SIGTERM, None)
    assert w1.step_boundary() is False
    assert w1.stop(at_end=True) is False and w1.received
