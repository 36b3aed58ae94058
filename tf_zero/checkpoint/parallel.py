"""`tf_zero.Checkpoint`: TensorFlow checkpoints of sharded state, written by
every worker in parallel, a chunk at a time (in the background on request),
and checked before a restore.

Each worker writes its own slices into parts of a staging directory beside
the target, at most `CHUNK_BYTES` per write; once every worker has reported
success, the chief merges the parts with a manifest of the data files' sizes
and publishes data files first, index last, by rename. A failure anywhere
publishes nothing; a publish sweeps the staging directories and temporary
files that killed saves left there. Integrity: TensorFlow's writer records a
CRC32C of every entry as it writes it, and its reader checks the CRC32C of
every entry it reads; a restore first checks the files (present, of their
recorded size), the model and optimizer against the checkpoint both ways,
and the checksums of what this worker will read, then each worker reads its
own pieces, a chunk at a time. `integrity="sha256"` also records each data
file's SHA-256 and checks it before a restore (as checkpoints of earlier
versions do). What it writes is an ordinary TensorFlow checkpoint. See
docs/checkpoints.md.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import copy
import functools
import itertools
import json
import os
import re
import shutil
import sys
import threading
import uuid

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.checkpoint import slices
from tf_zero.checkpoint.faces import PlacedSlot, UnshardedSlot
from tf_zero.config import DEFAULT_BUCKET_SIZE_BYTES
from tf_zero.fault import debris
from tf_zero.fault.coordination import (STAGING_TIMEOUT_MS, kv_get_or_raise, sha256_file,
                                        worker_agreement)

CHUNK_BYTES = 8 * DEFAULT_BUCKET_SIZE_BYTES
"""Most bytes of slices one write or read handles (64 MiB: eight default
buckets). Each write or read costs a file or a call, so smaller chunks save
memory and cost time: at 8 MiB a save took 2.5x and a restore 4x
`tf.train.Checkpoint`'s (50M-parameter Adam MLP, docs/checkpoints.md)."""
MANIFEST_KEY = "_tf_zero/manifest"
INTEGRITY = ("crc32c", "sha256")
"""`Checkpoint(integrity=...)`: "crc32c" (default; TensorFlow's own checksum
of every entry, computed as it is written, checked for what is read) or
"sha256" (also a SHA-256 of every data file, checked before a restore)."""
_saves = itertools.count()
_pending = []  # background saves not yet waited for
_pending_lock = threading.Lock()


_SLOT_FACES = (UnshardedSlot, PlacedSlot)


def _is_sliced(obj) -> bool:
    return isinstance(obj, _SLOT_FACES) or _private.sharded_storage(obj) is not None


def _sliced(obj):
    """The object that saves and restores `obj`'s slices: a slot's face (of a
    bucket's shards, or of a whole variable's owner or runs), or the sharded
    storage of a weight (`tf_zero.weights`)."""
    return obj if isinstance(obj, _SLOT_FACES) else _private.sharded_storage(obj)


def strategy_of(root):
    """The strategy of the sharded state under `root` (or of a multi-worker
    Keras model there), or None."""
    found = None
    for obj in tf.train.TrackableView(root).descendants():
        if isinstance(obj, _SLOT_FACES):
            return obj.strategy
        strategy = getattr(obj, "distribute_strategy", None)  # a Keras model's
        if found is None and strategy is not None and _private.in_multi_worker_mode(strategy):
            found = strategy  # state gathered to the chief still needs one writer
    return found


class Checkpoint(tf.train.Checkpoint):
    """`tf.train.Checkpoint` that writes and reads sharded state a few slices at a
    time, each worker its own, and checks a checkpoint before restoring it.

    Use it as `tf.train.Checkpoint`, also under `tf.train.CheckpointManager`.
    What it writes is an ordinary TensorFlow checkpoint: `tf.train.Checkpoint`,
    plain Keras objects and any replica count or stage restore it, and it
    reads any checkpoint `tf.train.Checkpoint` reads. A restore first checks
    that it restores everything, both ways (`check_objects`), and raises
    naming what is on one side only. Without sharded state it is otherwise
    `tf.train.Checkpoint`.

    With `tf.train.CheckpointOptions(enable_async=True)`, `save` and `write`
    return once every worker holds a snapshot of its state (copy-on-write,
    `_Save`) and write it in the background; the next save, `sync()` and a
    restore wait for it, and its failure on any worker is raised on every
    worker by the next save or `sync()`.

    Args:
        root, **kwargs: the objects to save, as for `tf.train.Checkpoint`.
        integrity: "crc32c" (default): the data files' sizes are recorded,
            and a restore checks, before it writes anything, the CRC32C
            TensorFlow keeps of every entry this worker reads. "sha256": each
            data file's SHA-256 is recorded too and checked before a restore
            (every worker reads every data file). Restores check what the
            checkpoint recorded, whatever this setting is.

    Raises:
        ValueError: another `integrity`.
    """

    def __init__(self, root=None, *, integrity="crc32c", **kwargs):
        if integrity not in INTEGRITY:
            raise ValueError(f"integrity must be one of {INTEGRITY}, got {integrity!r}")
        super().__init__(root, **kwargs)
        self._tf_zero_integrity = integrity
        self._tf_zero_background = False  # save() asked for an asynchronous write
        self._tf_zero_save = None  # the background save not yet waited for

    def save(self, file_prefix, options=None):
        # TensorFlow's own asynchronous save copies every variable first; with
        # sharded state, TensorFlow's save numbers and records the checkpoint
        # and `_write` writes it in the background.
        if not (_asynchronous(options) and strategy_of(self) is not None):
            return super().save(file_prefix, options=options)
        options = copy.copy(options)
        options.experimental_enable_async_checkpoint = False
        self._tf_zero_background = True
        try:
            return super().save(file_prefix, options=options)
        finally:
            self._tf_zero_background = False

    def _write(self, file_prefix, options=None):  # TensorFlow's hook of save and write
        strategy = strategy_of(self)
        if strategy is None:
            return _private.write_checkpoint(self, file_prefix, options)
        self.sync()  # the previous save first, and its failure
        background = self._tf_zero_background or _asynchronous(options)
        save = _Save(self, strategy, os.fspath(file_prefix), options,
                     self._tf_zero_integrity == "sha256", background)
        if not background:
            return save.finish()
        self._tf_zero_save = save
        save.start()
        return os.fspath(file_prefix)

    def sync(self):
        """Waits for this checkpoint's background save (and TensorFlow's own).

        Raises:
            Exception: the background save failed, on this worker or another
                (then nothing was published and the previous checkpoint is
                intact). Raised once, here or by the next save.
        """
        super().sync()
        save, self._tf_zero_save = self._tf_zero_save, None
        if save is not None:
            save.wait()

    # TensorFlow's `restore` calls `read` (after turning a SavedModel directory
    # into its variables' prefix): the checks and the slices are done here, once.
    def read(self, save_path, options=None):
        self.sync()
        wait_for_saves()  # another checkpoint's background save may write this one
        if save_path is None:  # no checkpoint yet: TensorFlow's initialization-only status
            return super().read(save_path, options=options)
        save_path = os.fspath(save_path)
        strategy = strategy_of(self)
        if strategy is None:
            if tf.io.gfile.exists(save_path + ".index"):  # else TensorFlow's own error
                check_objects(self, save_path)
            return super().read(save_path, options=options)
        error = None
        try:
            check(save_path)
            with _named_data_loss(save_path):
                check_objects(self, save_path)
            entries = [(key, _sliced(obj))
                       for key, obj in _private.matched_objects(self, save_path, _is_sliced)]
            check(save_path, entries, files=False)
            held = _read_slices(save_path, entries)
        except Exception as e:  # noqa: BLE001  (raised after the agreement)
            error = e
        # Every worker restores or none: a worker's pieces may be damaged
        # where another's are not.
        if _private.in_multi_worker_mode(strategy) and not worker_agreement(
                strategy, error is None, "nothing was restored here"):
            raise error or ValueError(
                f"Checkpoint {save_path} failed its checks on another worker (see its log); "
                "nothing was restored. Restore a complete checkpoint.")
        if error is not None:
            raise error
        with slices.deferring(), _named_data_loss(save_path):
            status = super().read(save_path, options=options)
        _write_slices(save_path, held, entries)
        return status


# -- writing --------------------------------------------------------------


def _asynchronous(options) -> bool:
    return bool(options is not None and options.experimental_enable_async_checkpoint)


class _Save:
    """One save of sharded state. Created on every worker in the training
    thread: it takes the snapshot (TensorFlow's serialization, the reads of
    this worker's slices); `finish` writes this worker's part, agrees with
    the others and, on the chief, publishes, in this thread or in the
    background (`start`).

    A background save reads every slice when it is created and keeps the
    tensors: a read shares the variable's buffer, which TensorFlow copies
    before the next update of that variable (copy-on-write), so training
    goes on at once and the extra host memory is at most this worker's own
    state (the variables updated before they are written). A save in this
    thread reads a chunk at a time instead.
    """

    def __init__(self, checkpoint, strategy, file_prefix, options, sha256, background):
        self.strategy, self.options, self.sha256 = strategy, options, sha256
        self.file_prefix = file_prefix
        self.multi = _private.in_multi_worker_mode(strategy)
        self.chief = not self.multi or _private.is_chief(strategy)
        self.worker = _private.worker_index(strategy) if self.multi else 0
        self.key = f"tf_zero/checkpoint/{next(_saves)}"
        self.target = os.path.abspath(file_prefix)
        self.thread, self.error, self.graph, self.entries = None, None, None, []
        if self.chief:
            self.staging = debris.staging_name(self.target, uuid.uuid4().hex[:12])
            tf.io.gfile.makedirs(self.staging)
            if self.multi:
                _private.kv_set(f"{self.key}/staging", self.staging)
        else:
            self.staging = _kv_get(f"{self.key}/staging", "start the save")
        try:
            with slices.deferring():  # every sliced entry is written below, not by TF's saver
                graph = _private.snapshot(checkpoint)
            self.graph = graph if self.chief else None  # the others joined its collective reads
            self.entries = _own_entries(checkpoint, read_now=background)
        except Exception as e:  # noqa: BLE001  (raised after the agreement, in finish)
            self.error = e

    def start(self):
        self.thread = threading.Thread(target=self._run, name=f"tf_zero save {self.key}")
        with _pending_lock:
            _pending.append(self)
        self.thread.start()

    def _run(self):
        try:
            self.finish()
        except BaseException as e:  # noqa: BLE001  (raised by wait())
            self.error = e
        finally:
            self.entries = []  # the snapshot's buffers go now, not at the next save
            if self.error is None:  # a failure stays listed until it is raised or reported
                self._unlist()

    def _unlist(self):
        with _pending_lock:
            if self in _pending:
                _pending.remove(self)

    def wait(self):
        """Waits for a background save; raises its failure (once)."""
        if self.thread is not None:
            self.thread.join()
            self._unlist()
            self.thread = None
            error, self.error = self.error, None
            if error is not None:
                raise error

    def finish(self):
        error, parts, staging, key = self.error, [], self.staging, self.key
        if error is None:
            try:
                if self.graph is not None:
                    part_options = copy.copy(self.options) or tf.train.CheckpointOptions()
                    part_options.experimental_write_callbacks = None
                    part_options.experimental_enable_async_checkpoint = False
                    self.graph(os.path.join(staging, "part-00000-graph"), part_options)
                    self.graph = None
                parts = _write_entries(self.entries, os.path.join(
                    staging, f"part-{self.worker:05d}"), self.sha256)
                self.entries = []
                if self.multi:
                    _private.kv_set(f"{key}/parts/{self.worker}", json.dumps(parts))
            except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
                error = e
        file_prefix, chief, strategy = self.file_prefix, self.chief, self.strategy
        everyone_wrote = (worker_agreement(strategy, error is None, (
            "nothing was published and the previous checkpoint is intact" if chief else
            f"the chief publishes {file_prefix} once every worker has reported, so whether it "
            "did is unknown here: check it"), key=f"{key}/wrote") if self.multi
            else error is None)
        if chief:
            try:
                if everyone_wrote:
                    if self.multi:
                        parts = [p for w in range(_private.worker_count(strategy))
                                 for p in json.loads(_kv_get(f"{key}/parts/{w}",
                                                             "report its parts"))]
                    _merge_and_publish(staging, self.target, parts, self.sha256)
                    _private.run_write_callbacks(self.options, file_prefix)
            except Exception as e:  # noqa: BLE001
                error = error or e
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if error is None and everyone_wrote:
                debris.sweep(os.path.dirname(self.target))  # what killed saves left there
        everyone_published = (worker_agreement(strategy, error is None, (
            (f"this worker, the chief, had published {file_prefix}" if everyone_wrote
             and error is None else "nothing was published") if chief else
            f"whether the chief published {file_prefix} is unknown here: check it"),
            key=f"{key}/published") if self.multi else error is None)
        if error is not None:
            raise error
        if not (everyone_wrote and everyone_published):
            raise RuntimeError(
                f"Writing checkpoint {file_prefix} failed on another worker (see its log); "
                "nothing was published and the previous checkpoint is intact.")
        return file_prefix  # as given, as TensorFlow's saver returns it


def wait_for_saves() -> list:
    """Waits for every background save of this process; returns their
    failures (each also raised by its checkpoint's next save or `sync`)."""
    with _pending_lock:
        pending = list(_pending)
    for save in pending:
        if save.thread is not None:
            save.thread.join()
    return [save.error for save in pending if save.error is not None]


def _report_unwaited():
    """At exit: a background save's failure nobody waited for is said."""
    for error in wait_for_saves():
        print(f"[tf_zero] a background checkpoint save failed and was never waited for: "
              f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)


atexit.register(_report_unwaited)


def _kv_get(key, what):
    return kv_get_or_raise(key, STAGING_TIMEOUT_MS,
                           f"A worker did not {what} for checkpoint {key}; every worker must "
                           "call save/write in the same order")


def _chunks(items, size_of):
    """Consecutive groups of `items` of at most `CHUNK_BYTES` (one item at least)."""
    group, total = [], 0
    for item in items:
        if group and total + size_of(item) > CHUNK_BYTES:
            yield group
            group, total = [], 0
        group.append(item)
        total += size_of(item)
    if group:
        yield group


def _entry_bytes(entry):
    """Bytes of a slice entry (key, object, spec, dtype, ...)."""
    _, obj, spec, dtype = entry[:4]
    return slices.spec_size(spec, obj.shape) * tf.as_dtype(dtype).size


def _own_entries(checkpoint, read_now=False) -> list:
    """This worker's slices: [(key, owner, spec, dtype, read)]; with `read_now`
    each `read` returns a tensor read here and now."""
    entries = [(key, _sliced(obj), *s)
               for key, obj in _private.sliced_objects(checkpoint, _is_sliced)
               for s in _sliced(obj).local_slices(_max_elements(_sliced(obj)))]
    if not read_now:
        return [(*e[:3], e[4], e[3]) for e in entries]
    values = {}  # a component's value, read once for all its slices
    return [(*e[:3], e[4], _read_at_call(e[3], values)) for e in entries]


def _read_at_call(read, values):
    """`read` as a function of values read now: a slice of a shard reads the
    shard (one read shares its buffer) and is cut from it when written."""
    if isinstance(read, functools.partial) and read.func is slices.read_slice:
        component, offset, piece = read.args
        if id(component) not in values:
            values[id(component)] = (component, component.read_value())
        return functools.partial(slices.slice_of, values[id(component)][1], component.device,
                                 offset, piece)
    tensor = read()
    return lambda: tensor


def _write_entries(entries, prefix, sha256=False) -> list:
    """Writes slices, a chunk per part; returns [(part, size, SHA-256 or None)]."""
    parts = []
    chunks = list(_chunks(entries, _entry_bytes))
    # The next chunk's slices are cut on a second thread while this one is
    # written: a slice whose start is not 64-byte aligned is a copy.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tf_zero slices") as cut:
        tensors = cut.submit(_cut, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            values = tensors.result()
            if i + 1 < len(chunks):
                tensors = cut.submit(_cut, chunks[i + 1])
            part = f"{prefix}-{i:05d}"
            with tf.device("/cpu:0"):
                tf.raw_ops.SaveV2(prefix=part, tensor_names=[e[0] for e in chunk],
                                  shape_and_slices=[e[2] for e in chunk], tensors=values)
            del values
            parts.append(os.path.basename(part))
    return [(p, *_size_and_hash(os.path.join(os.path.dirname(prefix),
                                             p + ".data-00000-of-00001"), sha256))
            for p in parts]


def _cut(chunk) -> list:
    return [e[4]() for e in chunk]


def _size_and_hash(path, sha256=True):
    """(size, SHA-256 or None) of a data file."""
    return tf.io.gfile.stat(path).length, sha256_file(path, CHUNK_BYTES) if sha256 else None


def _merge_and_publish(staging, target, parts, sha256=False):
    """Merges the graph part, the slice parts and a manifest into `target`."""
    graph = os.path.join(staging, "part-00000-graph")
    files = [_size_and_hash(graph + ".data-00000-of-00001", sha256)] + [p[1:] for p in parts]
    records = [{"size": size, **({"sha256": digest} if digest else {})}
               for size, digest in files]
    manifest = os.path.join(staging, "zzzzz-manifest")
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(prefix=manifest, tensor_names=[MANIFEST_KEY], shape_and_slices=[""],
                          tensors=[tf.constant(json.dumps(
                              {"checksum": "sha256" if sha256 else "crc32c",
                               "data_files": records}))])
    prefixes = [graph] + [os.path.join(staging, p[0]) for p in parts] + [manifest]
    merged = os.path.join(staging, "merged")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=prefixes, destination_prefix=merged,
                                  delete_old_dirs=False)
    old = set(tf.io.gfile.glob(f"{target}.data-*"))
    new = []
    for path in sorted(tf.io.gfile.glob(f"{merged}.data-*")):
        final = target + path[len(merged):]
        tf.io.gfile.rename(path, final, overwrite=True)
        new.append(final)
    tf.io.gfile.rename(f"{merged}.index", f"{target}.index", overwrite=True)
    for stale in old - set(new):
        tf.io.gfile.remove(stale)


# -- reading --------------------------------------------------------------


def check(save_path, entries=(), files=True, full=False) -> None:
    """Checks a checkpoint before anything is restored from it.

    Every data file must exist; where the checkpoint has a tf_zero manifest,
    with the size recorded at save, and the SHA-256 where one was recorded
    (unless `files` is false). With `full`, every entry is read once, which
    checks TensorFlow's CRC32C of each (what `python -m tf_zero.checkpoint
    check` does; a restore checks only what its worker reads).
    Every sliced entry of `entries` ([(key, object)]) must be there with the
    object's shape and dtype.

    Raises:
        FileNotFoundError: the index or a data file is missing (named).
        ValueError: a data file is truncated or from another save, or an
            entry is missing or of another shape or dtype (the checkpoint of
            another model or optimizer); named.
    """
    if not tf.io.gfile.exists(save_path + ".index"):
        raise FileNotFoundError(f"No checkpoint index at {save_path}.index.")
    reader = tf.train.load_checkpoint(save_path)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    if files and MANIFEST_KEY in shapes:
        files = _manifest(reader, save_path)
        count = len(files) + 1  # the manifest's own data file is the last
        for i, recorded in enumerate(files):
            path = f"{save_path}.data-{i:05d}-of-{count:05d}"
            if not tf.io.gfile.exists(path):
                raise FileNotFoundError(
                    f"Checkpoint data file {path} is missing; the checkpoint cannot be "
                    "restored. Copy the whole checkpoint (every .data file and the .index).")
            size = tf.io.gfile.stat(path).length
            if size != recorded["size"]:
                raise ValueError(
                    f"Checkpoint data file {path} is not the one this checkpoint wrote "
                    f"({size} bytes, recorded {recorded['size']} bytes): it is truncated, "
                    "damaged or from another save. Nothing was restored; restore a complete "
                    "checkpoint.")
            if "sha256" in recorded:
                digest = sha256_file(path, CHUNK_BYTES)
                if digest != recorded["sha256"]:
                    raise ValueError(
                        f"Checkpoint data file {path} is not the one this checkpoint wrote "
                        f"(SHA-256 {digest[:12]}..., recorded {recorded['sha256'][:12]}...): "
                        "it is damaged or from another save. Nothing was restored; restore a "
                        "complete checkpoint.")
    if full:
        _verify(save_path, [(key, "", tf.as_dtype(dtypes[key]),
                             int(np.prod(shapes[key], dtype=np.int64)))
                            for key in sorted(shapes) if key != MANIFEST_KEY])
    for key, obj in entries:
        obj_shape = tuple(obj.shape)
        if key not in shapes:
            raise ValueError(
                f"Checkpoint {save_path} has no {key} ({obj.name}): it is the checkpoint of "
                "another model or optimizer. Nothing was restored.")
        if tuple(shapes[key]) != obj_shape or tf.as_dtype(dtypes[key]) != obj.storage_dtype:
            raise ValueError(
                f"Checkpoint {save_path} holds {key} with shape {tuple(shapes[key])} and "
                f"dtype {tf.as_dtype(dtypes[key]).name}, but {obj.name} has shape {obj_shape} and "
                f"dtype {obj.storage_dtype.name}: it is the checkpoint of another model or "
                "optimizer. Nothing was restored.")


# Left out of the two-way check: the save counter `tf.train.Checkpoint` creates
# at its first save, and an optimizer one side does not have at all (the
# weights of a training checkpoint restored for evaluation, or a checkpoint of
# weights alone restored to train with a new optimizer).
_OPTIONAL = ("save_counter", "optimizer")
_LISTED = 8


def check_objects(root, save_path) -> None:
    """Checks that a restore of `save_path` into `root` restores everything, both ways.

    Every value in the checkpoint must have an object to go to under `root`,
    and every variable under `root` (model weights, optimizer variables and
    slots) a value in the checkpoint; objects are matched as TensorFlow's
    restore matches them, by their names from the root. A value may wait for
    an object that is not built yet (it lands when a Keras layer or optimizer
    builds, as in TensorFlow), and an optimizer may be absent on one side
    altogether.

    Raises:
        ValueError: something is on one side only; the message lists it, by
            checkpoint key and shape on the checkpoint's side and by variable
            path on this side. Nothing was restored.
    """
    unmatched = _private.unmatched_values(root, save_path)
    if unmatched is None:  # a name-based checkpoint: TensorFlow matches by name
        return
    saved_only, live_only = unmatched
    saved_only = [(key, shape, _optimizer_in(live))
                  for key, shape, path, missing, live in saved_only
                  if missing not in _OPTIONAL
                  and not any(getattr(obj, "built", True) is False for obj in live)]
    live_only = [(obj, path) for obj, path, missing in live_only if missing not in _OPTIONAL]
    if not saved_only and not live_only:
        return
    lines = [f"Checkpoint {save_path} does not match what it is restored into: it is the "
             "checkpoint of another model or optimizer. Nothing was restored."]
    if saved_only:
        lines.append(f"In the checkpoint, with nothing here to restore into ({len(saved_only)}):")
        lines += [f"  {key.split('/.ATTRIBUTES/')[0]} {list(shape)}"
                  for key, shape, _ in saved_only[:_LISTED]]
        optimizers = {_optimizer_name(o) for _, _, o in saved_only if o is not None}
        if optimizers:
            lines.append(f"  (state of the saved optimizer that this side's "
                         f"{', '.join(sorted(optimizers))} has no variable for: the slots of "
                         "another optimizer class, or of weights this model does not have)")
    if live_only:
        lines.append(f"Here, with no value in the checkpoint ({len(live_only)}):")
        lines += [f"  {_variable_name(obj)} ({'/'.join(path)})"
                  for obj, path in live_only[:_LISTED]]
    if len(saved_only) > _LISTED or len(live_only) > _LISTED:
        lines.append(f"  (the first {_LISTED} of each)")
    lines.append("Restore into the model and optimizer that were saved (the same layers, the "
                 "same optimizer class), or restore part of a checkpoint on purpose with "
                 "tf.train.Checkpoint(...).read(path).expect_partial().")
    raise ValueError("\n".join(lines))


def _optimizer_in(live):
    """The innermost Keras optimizer among the live objects matched on a path."""
    return next((obj for obj in reversed(live)
                 if isinstance(obj, keras.optimizers.Optimizer)), None)


def _optimizer_name(optimizer) -> str:
    name = type(optimizer).__name__
    inner = getattr(optimizer, "inner_optimizer", None)
    return f"{name}({_optimizer_name(inner)})" if inner is not None else name


def _variable_name(obj) -> str:
    return str(getattr(obj, "path", None) or getattr(obj, "name", None) or type(obj).__name__)


def _manifest(reader, save_path) -> list:
    """The manifest's [{"size", "sha256"}] per data file, or a ValueError that
    names the checkpoint and the manifest's file (the last data file)."""
    try:
        files = json.loads(reader.get_tensor(MANIFEST_KEY))["data_files"]
        if not all(isinstance(f["size"], int) and isinstance(f.get("sha256", ""), str)
                   for f in files):
            raise ValueError("a data file's record has no integer size")
        return files
    except (tf.errors.OpError, ValueError, KeyError, TypeError, IndexError) as e:
        data = sorted(tf.io.gfile.glob(f"{save_path}.data-*-of-*"))
        where = f" (in {data[-1]})" if data else ""
        raise ValueError(
            f"Checkpoint {save_path}: its manifest{where}, the record of its data files' "
            f"sizes, cannot be read ({type(e).__name__}: {e}). The checkpoint is "
            "damaged; nothing was restored. Restore a complete checkpoint.") from None


def _max_elements(obj) -> int:
    return max(1, CHUNK_BYTES // obj.storage_dtype.size)


def _wanted(entries) -> list:
    """(key, object, spec, dtype) of every slice of `entries` this worker
    restores: the slices of all its replicas' pieces, each once (under hybrid
    sharding another worker may save the pieces this one holds)."""
    wanted = {}
    for key, obj in entries:
        for spec, _, dtype, _ in obj.local_slices(_max_elements(obj), writers_only=False):
            wanted.setdefault((key, spec), (key, obj, spec, dtype))
    return list(wanted.values())


def _verify(save_path, wanted) -> None:
    """Reads `wanted` ([(key, spec, dtype, elements)]) a chunk at a time and
    drops it: TensorFlow's reader checks each entry's CRC32C as it reads.

    Raises:
        ValueError: a checksum differs, naming the data file.
    """
    for chunk in _chunks(wanted, lambda e: e[3] * tf.as_dtype(e[2]).size):
        _restore(save_path, [e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk])


@contextlib.contextmanager
def _named_data_loss(save_path):
    """TensorFlow's checksum error, as one that names the data file."""
    try:
        yield
    except tf.errors.OpError as e:  # DataLossError, or an OpError from the py reader
        if not isinstance(e, tf.errors.DataLossError) and "Checksum does not match" not in str(e):
            raise
        shard = re.search(r"shard (\d+)", str(e))
        files = sorted(tf.io.gfile.glob(f"{save_path}.data-*-of-*"))
        path = (files[int(shard.group(1))] if shard and int(shard.group(1)) < len(files)
                else f"{save_path}.data-*")
        raise ValueError(
            f"Checkpoint data file {path} is not the one this checkpoint wrote (a checksum "
            f"of an entry differs: {e.message.strip()[:200]}): it is damaged or from "
            "another save. Nothing was restored; restore a complete checkpoint.") from None


def _read_slices(save_path, entries) -> list:
    """Reads this worker's slices of `entries`, `CHUNK_BYTES` per restore op:
    TensorFlow's reader checks each entry's CRC32C as it reads, so a damaged
    slice is refused before anything is written. The slices are held for
    `_write_slices` (as TensorFlow's own restore reads every value before it
    assigns one) unless they are more than half the host memory available
    now: then each chunk is dropped here and read again when written.

    Returns:
        [(chunk, values or None)], for `_write_slices`.

    Raises:
        ValueError: a checksum differs, naming the data file.
    """
    wanted = _wanted(entries)
    hold = sum(map(_entry_bytes, wanted)) <= available_host_bytes() // 2
    held = []
    for chunk in _chunks(wanted, _entry_bytes):
        values = _restore_chunk(save_path, chunk)
        held.append((chunk, values if hold else None))
    return held


def _restore_chunk(save_path, chunk):
    """The values of `chunk`'s slice entries (key, object, spec, dtype)."""
    return _restore(save_path, [e[0] for e in chunk], [e[2] for e in chunk],
                    [e[3] for e in chunk])


def _restore(save_path, names, specs, dtypes):
    """One restore op on the host; a checksum error names the data file."""
    with tf.device("/cpu:0"), _named_data_loss(save_path):
        return tf.raw_ops.RestoreV2(prefix=save_path, tensor_names=names,
                                    shape_and_slices=specs, dtypes=dtypes)


def available_host_bytes() -> int:
    """The host memory available now (Linux's MemAvailable; elsewhere the free
    physical pages), or 0 when neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _write_slices(save_path, held, entries) -> None:
    """Writes the slices `_read_slices` read into their shards, releasing
    each chunk once written."""
    with slices.assembling([obj.local_runs() for _, obj in entries]):
        while held:
            chunk, values = held.pop(0)
            if values is None:
                values = _restore_chunk(save_path, chunk)
            by_object = {}
            for (_, obj, spec, _), value in zip(chunk, values):
                by_object.setdefault(id(obj), (obj, {}))[1][spec] = value
            del values
            for obj, restored in by_object.values():
                obj.restore_slices(restored)
    for _, obj in entries:
        finished = getattr(obj, "slices_restored", None)
        if finished is not None:
            finished()
