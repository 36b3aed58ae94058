"""Keras saving under several workers: one complete file, written once,
published atomically.

Every worker runs the same script, so `model.save(...)`, `save_weights` and
Keras' saving callbacks save on every worker, to one path, and reading a
sharded optimizer's slots is collective. `publish` lets every worker join the
save while only the chief writes, into a temporary file renamed over the
target, and returns on every worker only once the file is published (or
raises on every worker). A publish then sweeps what killed saves left in
that directory (`debris`). Keras' three writers are routed here (`route`,
installed by `tf_zero._private.patches`). Single-worker saves are Keras' own.
See docs/multi-worker.md ("Saving").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading

import tensorflow as tf

from tf_zero import _private
from tf_zero.fault import debris
from tf_zero.fault.coordination import failed_workers

_state = threading.local()
_published: list[str] = []


def published_files() -> list[str]:
    """Paths this worker has published through `publish`, oldest first."""
    return list(_published)


def is_multi_worker(model) -> bool:
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and _private.in_multi_worker_mode(strategy)


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
        RuntimeError: the save failed on other workers (named; nothing is
            published then), or on this worker when it is not the chief
            (named, with the target, not its discarded scratch copy).
        Exception: the chief's own failure, after the others learned of it.
    """
    strategy = model.distribute_strategy
    if getattr(_state, "active", False):
        return write(filepath)
    if not _private.in_multi_worker_mode(strategy):
        if not atomic:
            return write(filepath)
        tmp = debris.temporary_name(filepath, 0)
        try:
            result = write(tmp)
            tf.io.gfile.rename(tmp, os.fspath(filepath), overwrite=True)
        finally:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)
        debris.sweep(os.path.dirname(os.fspath(filepath)))
        return result
    chief = _private.is_chief(strategy)
    worker = _private.worker_index(strategy)
    path = os.fspath(filepath)
    error, result, tmp = None, None, None
    with _publishing():
        if chief:
            tmp = debris.temporary_name(filepath, worker)
            try:
                result = write(tmp)
            except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
                error = e
        else:
            scratch = debris.scratch_directory(worker)
            try:
                result = write(os.path.join(scratch, os.path.basename(path)))
            except Exception as e:  # noqa: BLE001
                # Its own error names the scratch file it writes and discards.
                error = RuntimeError(
                    f"Saving {path} failed on worker {worker}, which joins the "
                    f"chief's collective reads and writes a scratch copy in {scratch} that is "
                    f"discarded: {type(e).__name__}: {e}")
                error.__cause__ = e
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    # Two agreements: every worker's write, then the chief's rename. The chief
    # publishes only once every worker has written, so a failure anywhere
    # publishes nothing.
    nothing = f"nothing was published and the previous {path}, if any, is intact"
    try:
        failed = failed_workers(strategy, error is None,
                                nothing + " (the chief publishes only once every worker "
                                "has reported)")
    except Exception:
        _remove(tmp)
        raise
    if error is None and not failed and chief:
        try:
            tf.io.gfile.rename(tmp, path, overwrite=True)
        except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
            error = e
    elif chief:
        _remove(tmp)
    if not failed:  # every worker wrote: all learn the rename's outcome
        renamed = failed_workers(
            strategy, error is None,
            f"the chief was publishing {path} by a rename, so it is either the previous "
            "file or the new one, whole: check it")
        if renamed and error is None:
            _remove(tmp)
            raise RuntimeError(
                f"Saving {path}: every worker wrote its part, but publishing the file on the "
                f"chief failed (see its log); {nothing}. Fix the error and save again.")
    if error is not None:
        _remove(tmp)
        raise error
    if failed:
        others = ", ".join(map(str, failed))
        raise RuntimeError(
            f"Saving {path} failed on worker{'s' if len(failed) > 1 else ''} {others} (see "
            f"{'their logs' if len(failed) > 1 else 'its log'}); "
            + ("the chief failed, so " if 0 in failed else "")
            + f"{nothing}. Fix the error and save again.")
    if chief:
        _published.append(path)
        debris.sweep(os.path.dirname(path))
    debris.sweep_scratch()  # copies of workers killed in earlier saves on this host
    return result


def _remove(tmp) -> None:
    if tmp is not None and tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)


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


def route(kind, writer, model, filepath, args, kwargs):
    """Where Keras' writers go: `publish` under several workers (refusing
    paths that cannot be published once), Keras' own writer otherwise."""
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

