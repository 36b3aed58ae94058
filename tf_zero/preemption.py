"""SIGTERM under several workers: agree on a step, save it, exit.

Schedulers (Kubernetes, SLURM, spot VMs) send SIGTERM and kill the process
after a grace period. A multi-worker TensorFlow process does not die on
SIGTERM: the coordination service that every multi-worker collective strategy
starts installs TensorFlow's preemption notifier (`preemption_notifier.cc`,
"SIGTERM caught at ..."), whose handler records the signal for
`tf.distribute.experimental.PreemptionCheckpointHandler` and nothing else.
Under Keras' `fit` nothing reads it, so the worker trains on until it is
killed, and everything since the last backup is lost.

tf_zero takes SIGTERM back in two ways:

* `ZeroStrategy` in multi-worker mode installs `exit_on_sigterm`: SIGTERM ends
  the worker at once with status 143, saying that nothing was saved.
* While a backup callback (`tf_zero.callbacks.BackupAndRestore`, or Keras'
  `BackupAndRestore` under a `ZeroStrategy`) is in `fit`, `PreemptionWatch`
  replaces it. Its agreement follows `PreemptionCheckpointHandler`'s: the
  first worker to reach a step boundary after its own SIGTERM publishes
  "save after boundary k+1" in the job's key-value store and waits until
  every worker's watcher thread has acknowledged it. Every step of `fit`
  communicates across workers, so no worker can finish step k+1 before the
  acknowledgements exist, and every worker sees the number by boundary k+1.
  There all workers save one backup of that step together and exit with
  `PREEMPTED_EXIT_CODE`. (TensorFlow's handler itself keeps fixed keys and
  a thread per process, so it serves one training loop per process; the
  keys here are numbered per `fit`.)
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

PREEMPTED_EXIT_CODE = 75
"""Exit status of a worker that saved a backup on SIGTERM (EX_TEMPFAIL: run again)."""

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a worker that got SIGTERM with no backup callback (nothing saved)."""

ACK_TIMEOUT_MS = 60_000
_STOP = "stop"
_fit_counter = itertools.count()


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
        sys.stderr.write(
            f"[tf_zero] worker {worker}: SIGTERM received; no backup callback "
            "(tf_zero.callbacks.BackupAndRestore or keras.callbacks.BackupAndRestore) "
            "is saving this run, so nothing was saved. Exiting with status "
            f"{TERMINATED_EXIT_CODE}.\n")
        sys.stderr.flush()
        sys.stdout.flush()
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
        if _in_main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            self._previous_handler = signal.SIG_DFL if previous is None else previous
            signal.signal(signal.SIGTERM, self._on_sigterm)
        _private.on_fit_exit(self.stop)  # also when fit raises
        if self._multi_worker:
            self._watcher = threading.Thread(
                target=self._watch, name=f"tf_zero-preemption-{self._worker}", daemon=True)
            self._watcher.start()

    def stop(self):
        """Restores the previous SIGTERM handler and ends the watcher thread."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if self._watcher is not None:
            if self._watcher.is_alive():
                try:
                    _private.kv_set(f"{self._prefix}/step", _STOP)  # one worker's wins
                except tf.errors.OpError:
                    pass  # the coordination service is gone: so is the job
                self._watcher.join(timeout=10)
            self._watcher = None

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
        self._agreed_boundary = int(value)
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
                _private.kv_set(f"{self._prefix}/step", str(self._boundary + 1))
                for i in range(self._workers):
                    _private.kv_get(f"{self._prefix}/ack/{i}", timeout_ms=ACK_TIMEOUT_MS)
        if not self._agreed.is_set():
            return False
        if self._boundary > self._agreed_boundary:
            raise RuntimeError(
                f"Preemption: the workers agreed to save after step {self._agreed_boundary} "
                f"of this fit but worker {self._worker} is already at step {self._boundary}; "
                "the steps of fit must communicate across workers.")
        return self._boundary == self._agreed_boundary
