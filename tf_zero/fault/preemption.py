"""SIGTERM under several workers: agree on a step, save it, exit.

A multi-worker TensorFlow process does not die on SIGTERM: the coordination
service installs a preemption notifier that only records it. A multi-worker
`ZeroStrategy` takes SIGTERM back (`exit_on_sigterm`: exit 143, saying that
nothing was saved); while a backup callback is in `fit`, `PreemptionWatch`
has every worker agree on a step boundary, save that step and exit with
`PREEMPTED_EXIT_CODE`. See docs/multi-worker.md ("Preemption").
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time

import tensorflow as tf

from tf_zero import _private
from tf_zero.fault.coordination import ACK_TIMEOUT_MS, TERMINATED_EXIT_CODE

_STOP = "stop"
_END = "end"  # a SIGTERM after the last step boundary: every worker saves as fit ends
_fit_counter = itertools.count()
_watched_fits = 0  # fits a backup callback has watched in this process
_fit_removed_backups = False  # the last watched fit completed and removed its backups


def fit_ended(removed_backups: bool) -> None:
    """Records how the last watched fit ended, for what SIGTERM says after it."""
    global _fit_removed_backups
    _fit_removed_backups = removed_backups


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_on_sigterm(strategy) -> None:
    """Makes SIGTERM end this worker promptly (status 143), saying nothing was saved.

    Installed by a multi-worker `ZeroStrategy`; a backup callback replaces it
    during `fit`. No-op outside the main thread (Python delivers signals there).
    """
    if not _in_main_thread():
        return
    worker = _private.worker_index(strategy)

    def terminate(signum, frame):
        if _fit_removed_backups:
            why = ("the last fit with a backup callback completed and removed its backups "
                   "(delete_checkpoint=True), so nothing was saved for this signal; a "
                   "relaunch trains from the start")
        elif _watched_fits:
            # A backup callback ran in this process, but not at this moment
            # (before its fit began or after it ended): its backups stand.
            why = ("no fit with a backup callback is running at this moment, so nothing was "
                   "saved for this signal; a relaunch resumes from the last complete backup")
        else:
            why = ("no backup callback (tf_zero.callbacks.BackupAndRestore or "
                   "keras.callbacks.BackupAndRestore) is saving this run, so nothing was saved")
        message = (f"[tf_zero] worker {worker}: SIGTERM received; {why}. Exiting with "
                   f"status {TERMINATED_EXIT_CODE}.\n")
        try:
            sys.stderr.write(message)
            sys.stderr.flush()
            sys.stdout.flush()
        except RuntimeError:  # the main thread was inside a write to the stream
            os.write(2, message.encode())
        os._exit(TERMINATED_EXIT_CODE)

    signal.signal(signal.SIGTERM, terminate)


class PreemptionWatch:
    """Tells each worker, at a step boundary, that it is time to save and exit.

    Args:
        strategy: the model's strategy (single- or multi-worker).

    Call `start()` when training begins, `step_boundary()` after each training
    step (True: save this step now, then exit), `stop()` when training ends.
    """

    def __init__(self, strategy):
        self._strategy = strategy
        self._multi_worker = _private.in_multi_worker_mode(strategy)
        self._worker = _private.worker_index(strategy)
        self._workers = _private.worker_count(strategy)
        self._prefix = f"tf_zero/preemption/fit{next(_fit_counter)}"
        self.signal_time = None  # monotonic time of this worker's own SIGTERM
        self._own_signal = threading.Event()
        self._agreed = threading.Event()
        self._agreed_boundary = None
        self._announced = False
        self._boundary = 0
        self._previous_handler = None
        self._watcher = None

    # -- lifecycle ------------------------------------------------------------

    def start(self):
        global _watched_fits
        _watched_fits += 1
        if _in_main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            self._previous_handler = signal.SIG_DFL if previous is None else previous
            signal.signal(signal.SIGTERM, self._on_sigterm)
        _private.on_fit_exit(self.stop)  # also when fit raises
        if self._multi_worker:
            self._watcher = threading.Thread(
                target=self._watch, name=f"tf_zero-preemption-{self._worker}", daemon=True)
            self._watcher.start()

    def stop(self, at_end: bool = False) -> bool:
        """Restores the previous SIGTERM handler and ends the watcher thread.

        Args:
            at_end: fit completed its steps (not: it raised).

        Returns:
            Whether every worker saves now, as fit ends: a SIGTERM came after
            the last step boundary at which the workers could agree to save
            (in the last step, or in what follows it: validation, the
            callbacks' epoch end). The workers agree on it as on a step
            (the first value in the store wins: "end", or "stop" from a
            worker that ended without a signal).
        """
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        unsaved = self._own_signal.is_set() and not self._agreed.is_set()
        if self._watcher is not None:
            if self._watcher.is_alive():
                try:  # one worker's value wins
                    _private.kv_set(f"{self._prefix}/step",
                                    _END if at_end and unsaved else _STOP)
                except tf.errors.OpError:
                    pass  # the coordination service is gone: so is the job
                self._watcher.join(timeout=10)
            self._watcher = None
        elif not self._multi_worker and at_end and unsaved:
            self._agreed_boundary = float("inf")
            self._agreed.set()
        return (at_end and self._agreed.is_set() and
                self._agreed_boundary > self._boundary)

    def leave_together(self):
        """Before a preempted worker exits: worker 0 leaves last.

        Worker 0 hosts the coordination service; a worker still reading the
        last save's agreement from it would fail if it left first.
        """
        if not self._multi_worker:
            return
        key = f"{self._prefix}/leaving"
        if self._worker != 0:
            try:
                _private.kv_set(f"{key}/{self._worker}", "1")
            except tf.errors.OpError:
                pass  # worker 0 has left already: the backup is complete either way
            return
        for i in range(1, self._workers):
            try:
                _private.kv_get(f"{key}/{i}", timeout_ms=ACK_TIMEOUT_MS)
            except tf.errors.OpError:
                pass  # that worker is gone already

    @property
    def received(self) -> bool:
        """Whether this worker itself got SIGTERM."""
        return self._own_signal.is_set()

    # -- signals and agreement --------------------------------------------------

    def _on_sigterm(self, signum, frame):
        if not self._own_signal.is_set():
            self.signal_time = time.monotonic()
            self._own_signal.set()

    def _watch(self):
        value = _private.kv_get(f"{self._prefix}/step")
        if value == _STOP:
            return
        self._agreed_boundary = float("inf") if value == _END else int(value)
        self._agreed.set()  # before the acknowledgement: the announcer waits for it
        _private.kv_set(f"{self._prefix}/ack/{self._worker}", "1")

    def step_boundary(self) -> bool:
        """Call after each training step; True when every worker saves here."""
        self._boundary += 1
        if self._own_signal.is_set() and not self._announced:
            self._announced = True
            if not self._multi_worker:
                self._agreed_boundary = self._boundary
                self._agreed.set()
            else:
                # Peers may already be inside the next step: save after it.
                step = f"{self._prefix}/step"
                if (_private.kv_set(step, str(self._boundary + 1)) or
                        _private.kv_get(step) != _STOP):
                    for i in range(self._workers):
                        _private.kv_get(f"{self._prefix}/ack/{i}", timeout_ms=ACK_TIMEOUT_MS)
                # else another worker has ended fit: this was its last step, and
                # this worker's SIGTERM is for after fit (stop() says so).
        if not self._agreed.is_set():
            return False
        if self._boundary > self._agreed_boundary:
            raise RuntimeError(
                f"Preemption: the workers agreed to save after step {self._agreed_boundary} "
                f"of this fit but worker {self._worker} is already at step {self._boundary}; "
                "the steps of fit must communicate across workers.")
        return self._boundary == self._agreed_boundary
