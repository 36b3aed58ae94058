"""What the workers of one job agree through: the coordination service's
key-value store, with timeouts that name what did not happen, and the
constants the launcher, the strategy and the backup callbacks share.

See docs/multi-worker.md.
"""

from __future__ import annotations

import hashlib
import itertools
import signal
import time

import tensorflow as tf

from tf_zero import _private

DEVICES_ENV = "TF_ZERO_DEVICES_PER_WORKER"
"""Environment variable `tf_zero.launch` sets: logical CPU replicas per worker."""

PREEMPTED_EXIT_CODE = 75
"""Exit status of a worker that saved a backup on SIGTERM (EX_TEMPFAIL: run again)."""

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of a worker that got SIGTERM with no backup callback (nothing saved)."""

AGREEMENT_TIMEOUT_MS = 300_000
"""How long a worker waits for the others' outcome of a save."""

STAGING_TIMEOUT_MS = 300_000
"""How long a worker waits for what the chief publishes to start or end a save."""

ACK_TIMEOUT_MS = 60_000
"""How long the preemption agreement waits for every worker's acknowledgement."""

_agreements = itertools.count()


def kv_get_or_raise(key: str, timeout_ms: int, what: str) -> str:
    """`key` from the job's key-value store, waiting up to `timeout_ms`.

    Raises:
        RuntimeError: nobody set it in time, or the store did not answer (the
            chief, which hosts it, has exited or died); the message says
            `what` a worker did not do and which of the two happened.
    """
    start = time.monotonic()
    try:
        return _private.kv_get(key, timeout_ms=timeout_ms)
    except tf.errors.DeadlineExceededError as e:
        raise RuntimeError(f"{what} within {timeout_ms // 1000}s ({key}).") from e
    except tf.errors.OpError as e:
        raise RuntimeError(
            f"{what}: after {time.monotonic() - start:.1f}s the job's coordination service "
            f"did not answer ({type(e).__name__}; it runs on the chief, which has probably "
            f"exited or died) ({key}).") from e


def worker_agreement(strategy, ok: bool, unknown: str = "", key: str | None = None) -> bool:
    """True on every worker if `ok` is true on every worker.

    Each worker posts its outcome in the job's key-value store (the
    coordination service) and reads everyone's: a few milliseconds, where an
    eager `strategy.gather` costs about half a second (TensorFlow traces a new
    function for each). Agreements are numbered per process, so every worker
    must make the same sequence of them, as the collectives of a save require.

    Args:
        strategy: the model's strategy.
        ok: this worker's outcome.
        unknown: what the caller's save has or has not published at this
            point, said when a worker's outcome cannot be learned.
        key: the agreement's own name, unique in the job, for an agreement
            made outside the numbered sequence (a background save's).

    Raises:
        RuntimeError: a worker's outcome could not be read.
    """
    return not failed_workers(strategy, ok, unknown, key)


def failed_workers(strategy, ok: bool, unknown: str = "", key: str | None = None) -> list[int]:
    """The workers whose outcome was not ok (`worker_agreement`'s answer, by worker)."""
    if not _private.in_multi_worker_mode(strategy):
        return [] if ok else [0]
    key = key or f"tf_zero/save/{next(_agreements)}"
    _private.kv_set(f"{key}/{_private.worker_index(strategy)}", "ok" if ok else "failed")
    outcomes = [kv_get_or_raise(
        f"{key}/{i}", AGREEMENT_TIMEOUT_MS,
        f"Worker {i}'s outcome of a save could not be learned"
        + (f" ({unknown})" if unknown else ""))
        for i in range(_private.worker_count(strategy))]
    return [i for i, o in enumerate(outcomes) if o != "ok"]


def sha256_file(path: str, block_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file (any filesystem TensorFlow reads), read in blocks."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()
