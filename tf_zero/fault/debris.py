"""What a killed save leaves beside checkpoints and backups, and its removal.

A save writes first where no reader looks and publishes by rename: a
`tf_zero.Checkpoint` into a `.NAME.staging-<id>` directory beside its
target (up to a whole checkpoint), a backup or a multi-worker Keras save into
a `.NAME.tmp-worker<w>-<pid>-NAME` file. A save that completes removes its
own; one that is killed cannot. The next successful save into the same
directory sweeps what earlier ones left (a directory holds one job's saves,
and that job saves one file at a time), and `python -m tf_zero.checkpoint
clean DIR` does it by hand. The other workers join a save by writing a copy
they discard into a `scratch_directory` of this host's temporary directory,
named with their process id; one killed mid-save leaves that copy, and the
next save on the host removes it (`sweep_scratch`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import tensorflow as tf

_STAGING = re.compile(r"\..+\.staging-[0-9a-f]{12}")
_TEMPORARY = re.compile(r"\..+\.tmp-worker\d+-\d+-.+")


def staging_name(target: str, unique: str) -> str:
    """The staging directory of a save of `target`, beside it."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.staging-{unique}")


def temporary_name(filepath, worker: int) -> str:
    """The file `worker` writes before it is renamed to `filepath`."""
    head, tail = os.path.split(os.fspath(filepath))
    return os.path.join(head, f".{tail}.tmp-worker{worker}-{os.getpid()}-{tail}")


def leftovers(directory) -> list[str]:
    """Paths of the staging directories and temporary files in `directory`."""
    directory = os.fspath(directory) or "."
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(os.path.join(directory, name.rstrip("/"))
                  for name in tf.io.gfile.listdir(directory)
                  if _STAGING.fullmatch(name.rstrip("/")) or _TEMPORARY.fullmatch(name))


def sweep(directory) -> list[str]:
    """Removes `leftovers(directory)`; returns what it removed.

    Called after a save has published: nothing of this job's is in flight
    there, so what is left is a killed save's.
    """
    removed = []
    for path in leftovers(directory):
        try:
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
        except tf.errors.NotFoundError:
            continue  # removed meanwhile
        removed.append(path)
    return removed


_SCRATCH = re.compile(r"tf_zero_worker\d+-(\d+)-.+")


def scratch_directory(worker: int, parent: str | None = None) -> str:
    """A new directory where `worker`, which joins a save the chief publishes,
    writes its own discarded copy; in this host's temporary directory, named
    with this process's id so that `sweep_scratch` can tell a killed one's."""
    return tempfile.mkdtemp(prefix=f"tf_zero_worker{worker}-{os.getpid()}-", dir=parent)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sweep_scratch(parent: str | None = None) -> list[str]:
    """Removes the `scratch_directory`s of processes no longer running on this
    host (a worker killed mid-save leaves a copy of the file); returns them."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        found = _SCRATCH.fullmatch(name)
        if found and not _running(int(found.group(1))):
            path = os.path.join(parent, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
