"""Keras saving under several workers: one complete file, written once, published atomically.

With several workers every worker runs the same script, so `model.save(...)`,
`model.save_weights(...)` and Keras' `ModelCheckpoint` / `BackupAndRestore`
save on every worker, to the same path. Reading a sharded optimizer's slots
is collective (each worker holds only its replicas' shards), so every worker
must take part in the save; but only one may write. Left to Keras, two
workers create the same HDF5 file: HDF5's lock fails on one of them, and the
other is left in the middle of a collective gather with a half-written file
(its first two optimizer entries, the step and the learning rate, written
before the first gathered slot) that a later restore rejects.

Here, when the model's strategy spans several workers:

* the chief (TensorFlow's `should_checkpoint` worker) writes into a temporary
  file beside the target and renames it over the target: readers see the old
  file or the new one, never a partial one;
* every other worker runs the same save into a private temporary directory
  (joining the collectives) and deletes it;
* the save returns on every worker only after the file is published (each
  worker's outcome goes through the job's key-value store): a worker that loads the file
  right after saving finds it complete, and a failure on any worker raises on
  every worker.

Single-worker saves are Keras' own. Paths that cannot be published this way
(a weights file split with `max_shard_size`, an unzipped model directory, a
file object, a Hugging Face `hf://` path) raise an error naming a `.keras` or
`.weights.h5` path instead; so does the legacy `.h5` format.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading

import tensorflow as tf

from tf_zero import _private

AGREEMENT_TIMEOUT_MS = 300_000
_state = threading.local()
_published: list[str] = []
_agreements = itertools.count()


def published_files() -> list[str]:
    """Paths this worker has published through `publish`, oldest first."""
    return list(_published)


def is_multi_worker(model) -> bool:
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and _private.in_multi_worker_mode(strategy)


def worker_agreement(strategy, ok: bool) -> bool:
    """True on every worker if `ok` is true on every worker.

    Each worker posts its outcome in the job's key-value store (the
    coordination service) and reads everyone's: a few milliseconds, where an
    eager `strategy.gather` costs about half a second (TensorFlow traces a new
    function for each). Saves are numbered per process, so every worker must
    make the same sequence of saves, as the collectives inside a save require.

    Raises:
        RuntimeError: a worker did not report within `AGREEMENT_TIMEOUT_MS`.
    """
    if not _private.in_multi_worker_mode(strategy):
        return ok
    key = f"tf_zero/save/{next(_agreements)}"
    _private.kv_set(f"{key}/{_private.worker_index(strategy)}", "ok" if ok else "failed")
    outcomes = []
    for i in range(_private.worker_count(strategy)):
        try:
            outcomes.append(_private.kv_get(f"{key}/{i}", timeout_ms=AGREEMENT_TIMEOUT_MS))
        except tf.errors.OpError as e:
            raise RuntimeError(
                f"Worker {i} did not report the outcome of a save within "
                f"{AGREEMENT_TIMEOUT_MS // 1000}s ({type(e).__name__}); it may have died. "
                "Nothing was published by this save.") from e
    return all(o == "ok" for o in outcomes)


def _temporary_name(filepath, worker):
    head, tail = os.path.split(os.fspath(filepath))
    return os.path.join(head, f".{tail}.tmp-worker{worker}-{os.getpid()}-{tail}")


def publish(model, filepath, write, atomic=False):
    """Runs `write(path)` on every worker; the chief's file lands at `filepath`.

    Args:
        model: the model being saved (its strategy decides who writes).
        filepath: the final path; its directory must exist on the chief.
        write: a function writing the whole file at the path it is given;
            every worker calls it (it may run collectives).
        atomic: with a single worker, also write a temporary file and rename
            it (with several workers the rename always happens).

    Raises:
        RuntimeError: the save failed on another worker (named); nothing was
            published.
        Exception: this worker's own failure, after the others learned of it.
    """
    strategy = model.distribute_strategy
    if getattr(_state, "active", False):
        return write(filepath)
    if not _private.in_multi_worker_mode(strategy):
        if not atomic:
            return write(filepath)
        tmp = _temporary_name(filepath, 0)
        try:
            result = write(tmp)
            tf.io.gfile.rename(tmp, os.fspath(filepath), overwrite=True)
        finally:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        return result
    chief = _private.is_chief(strategy)
    worker = _private.worker_index(strategy)
    error, result = None, None
    with _publishing():
        if chief:
            tmp = _temporary_name(filepath, worker)
            try:
                result = write(tmp)
                tf.io.gfile.rename(tmp, os.fspath(filepath), overwrite=True)
            except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
                error = e
                if tf.io.gfile.exists(tmp):
                    tf.io.gfile.remove(tmp)
        else:
            scratch = tempfile.mkdtemp(prefix=f"tf_zero_worker{worker}_")
            try:
                result = write(os.path.join(scratch, os.path.basename(os.fspath(filepath))))
            except Exception as e:  # noqa: BLE001
                error = e
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    everyone_ok = worker_agreement(strategy, error is None)
    if error is not None:
        raise error
    if not everyone_ok:
        raise RuntimeError(
            f"Saving {os.fspath(filepath)} failed on another worker (see its log); "
            "nothing was published. Fix that worker's error and save again.")
    if chief:
        _published.append(os.fspath(filepath))
    return result


@contextlib.contextmanager
def _publishing():
    """Saves nested in a publish (a callback's own save) write where they are told."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def _unsafe_path_error(filepath, why):
    return ValueError(
        f"Cannot save {filepath!s} under a multi-worker strategy: {why}. Every worker "
        "runs the save and only one file can be published atomically: save to a local "
        "or shared `.keras` file (model.save) or `.weights.h5` file "
        "(model.save_weights).")


def _route(kind, writer, model, filepath, args, kwargs):
    if not is_multi_worker(model) or getattr(_state, "active", False):
        return writer(model, filepath, *args, **kwargs)
    path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
    if path is None:
        raise _unsafe_path_error(filepath, "a file object is written by every worker")
    if path.startswith("hf://"):
        raise _unsafe_path_error(path, "a Hugging Face upload is not atomic")
    if kind == "legacy_h5":
        raise _unsafe_path_error(path, "the legacy HDF5 (.h5) format is not supported there")
    if kind == "weights" and (args[:1] not in ((), (None,)) or
                              kwargs.get("max_shard_size") is not None):
        raise _unsafe_path_error(path, "max_shard_size splits the weights into several files")
    if kind == "model":
        zipped = kwargs.get("zipped", args[1] if len(args) > 1 else True)
        if not zipped:
            raise _unsafe_path_error(path, "an unzipped model directory is several files")
    return publish(model, path, lambda target: writer(model, target, *args, **kwargs))


_private.route_keras_saves(_route)
