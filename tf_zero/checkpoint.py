"""TensorFlow checkpoints of sharded state: written by every worker in parallel,
a few slices at a time, and checked before anything is restored.

Any `tf.train.Checkpoint` of a `ZeroOptimizer` already stores each slot as
slices of the full tensor, each replica's pieces written straight from its
shard and read back by pieces at any replica count (`tf_zero.sharded_state`,
`tf_zero.slices`); plain Keras objects restore from it. TensorFlow's saver
still handles every slice in one operation, though: all of them are in host
memory at once, and under several workers its rule (every worker saves, only
the chief's file counts) makes every slot gather to every worker.

`Checkpoint` writes the same checkpoint differently:

1. the chief picks a staging directory beside the target (through the job's
   key-value store under several workers);
2. TensorFlow's saver writes, on the chief, the object graph and the
   replicated variables, with the sliced entries recorded but empty (state
   that is still gathered, the whole-partition slots and stage-3 weights,
   is read collectively there, every worker joining);
3. every worker writes its own slices into parts of its own, at most
   `CHUNK_BYTES` of them per write (no worker sends a shard to another),
   and hashes what it wrote;
4. once every worker has reported success, the chief adds a manifest (each
   data file's size and SHA-256) and merges the parts' indexes
   (`MergeV2Checkpoints`: data files are moved, not copied), then publishes:
   data files first, the index last, by rename, so that a reader finds no
   index or a complete checkpoint; `save` then records it in the
   directory's `checkpoint` file;
5. every worker returns after the publish, or raises if any worker failed:
   nothing is published and the previous checkpoint is intact.

`Checkpoint.read` / `restore` first check the checkpoint: every data file
present with its recorded size and hash, and every sliced entry of this
model there with its shape and dtype. A missing, truncated or foreign file
or another model's checkpoint raises an error naming it before any value is
restored. Then TensorFlow restores the rest and each worker reads the slices
of its own pieces, `CHUNK_BYTES` at a time.

Under several workers the directory must be one filesystem shared by them
(as for TensorFlow's sharded savers). Every worker calls `save` / `write`
in the same order, with the chief's path or a scratch path of its own: the
shards land in the chief's checkpoint either way.

Keras' single-file formats (`.weights.h5`, `.keras`) hold full tensors by
definition: saving one assembles each slot on the host (`tf_zero.saving`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
import uuid

import tensorflow as tf

from tf_zero import _private, saving, slices
from tf_zero.sharded_state import UnshardedSlot

CHUNK_BYTES = 8 * 2**20
"""Most bytes of slices one write or read handles (one bucket by default)."""
MANIFEST_KEY = "_tf_zero/manifest"
STAGING_TIMEOUT_MS = 300_000
_saves = itertools.count()


def _is_sliced(obj) -> bool:
    return isinstance(obj, UnshardedSlot)


def strategy_of(root):
    """The strategy of the sharded state under `root` (or of a multi-worker
    Keras model there), or None."""
    found = None
    for obj in tf.train.TrackableView(root).descendants():
        if isinstance(obj, UnshardedSlot):
            return obj._shards.strategy
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
    reads any checkpoint `tf.train.Checkpoint` reads. Without sharded state
    it is `tf.train.Checkpoint`.
    """

    def _write(self, file_prefix, options=None):
        strategy = strategy_of(self)
        if strategy is None:
            return super()._write(file_prefix, options=options)
        return _write(self, strategy, os.fspath(file_prefix), options)

    def read(self, save_path, options=None):
        return self._restore_with(super().read, save_path, options)

    def restore(self, save_path, options=None):
        if save_path is None:
            return super().restore(save_path, options=options)
        return self._restore_with(super().restore, save_path, options)

    def _restore_with(self, restore, save_path, options):
        strategy = strategy_of(self)
        if strategy is None:
            return restore(save_path, options=options)
        save_path = os.fspath(save_path)
        entries = _private.sliced_objects(self, _is_sliced)
        check(save_path, entries)
        with slices.deferring():
            status = restore(save_path, options=options)
        _read_slices(save_path, entries)
        return status


# -- writing --------------------------------------------------------------


def _write(checkpoint, strategy, file_prefix, options):
    multi = _private.in_multi_worker_mode(strategy)
    chief = not multi or _private.is_chief(strategy)
    worker = _private.worker_index(strategy) if multi else 0
    key = f"tf_zero/checkpoint/{next(_saves)}"
    target = os.path.abspath(file_prefix)
    if chief:
        staging = os.path.join(os.path.dirname(target),
                               f".{os.path.basename(target)}.staging-{uuid.uuid4().hex[:12]}")
        tf.io.gfile.makedirs(staging)
        if multi:
            _private.kv_set(f"{key}/staging", staging)
    else:
        staging = _kv_get(f"{key}/staging", "start the save")
    error, parts = None, []
    try:
        with slices.deferring():
            if chief:
                part_options = copy.copy(options) or tf.train.CheckpointOptions()
                part_options.experimental_write_callbacks = None
                tf.train.Checkpoint._write(checkpoint, os.path.join(staging, "part-00000-graph"),
                                           options=part_options)
            else:
                # Gathered state (whole-partition slots, stage-3 weights) is
                # read collectively: join the chief's reads, write nothing.
                _private.serialize_only(checkpoint)
        parts = _write_own_slices(checkpoint, os.path.join(staging, f"part-{worker:05d}"))
        if multi:
            _private.kv_set(f"{key}/parts/{worker}", json.dumps(parts))
    except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
        error = e
    everyone_wrote = saving.worker_agreement(strategy, error is None) if multi else error is None
    if chief:
        try:
            if everyone_wrote:
                if multi:
                    parts = [p for w in range(_private.worker_count(strategy))
                             for p in json.loads(_kv_get(f"{key}/parts/{w}", "report its parts"))]
                _merge_and_publish(staging, target, parts)
                _private.run_write_callbacks(options, target)
        except Exception as e:  # noqa: BLE001
            error = error or e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    everyone_published = (saving.worker_agreement(strategy, error is None) if multi
                          else error is None)
    if error is not None:
        raise error
    if not (everyone_wrote and everyone_published):
        raise RuntimeError(
            f"Writing checkpoint {file_prefix} failed on another worker (see its log); "
            "nothing was published and the previous checkpoint is intact.")
    return target if chief else file_prefix


def _kv_get(key, what):
    try:
        return _private.kv_get(key, timeout_ms=STAGING_TIMEOUT_MS)
    except tf.errors.OpError as e:
        raise RuntimeError(
            f"A worker did not {what} for checkpoint {key} within "
            f"{STAGING_TIMEOUT_MS // 1000}s; every worker must call save/write in the "
            "same order.") from e


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


def _slice_bytes(dtype, spec, shape):
    return slices.spec_size(spec, shape) * tf.as_dtype(dtype).size


def _write_own_slices(checkpoint, prefix) -> list:
    """Writes this worker's slices, a chunk per part; returns [(part, size, sha256)]."""
    entries = [(key, obj, *s) for key, obj in _private.sliced_objects(checkpoint, _is_sliced)
               for s in obj.local_slices()]
    parts = []
    for i, chunk in enumerate(_chunks(entries, lambda e: _slice_bytes(e[4], e[2], e[1].shape))):
        part = f"{prefix}-{i:05d}"
        with tf.device("/cpu:0"):
            tf.raw_ops.SaveV2(prefix=part, tensor_names=[e[0] for e in chunk],
                              shape_and_slices=[e[2] for e in chunk],
                              tensors=[e[3]() for e in chunk])
        parts.append(os.path.basename(part))
    return [(p, *_size_and_hash(os.path.join(os.path.dirname(prefix),
                                             p + ".data-00000-of-00001")))
            for p in parts]


def _size_and_hash(path):
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return tf.io.gfile.stat(path).length, digest.hexdigest()


def _merge_and_publish(staging, target, parts):
    """Merges the graph part, the slice parts and a manifest into `target`."""
    graph = os.path.join(staging, "part-00000-graph")
    files = [_size_and_hash(graph + ".data-00000-of-00001")] + [p[1:] for p in parts]
    manifest = os.path.join(staging, "zzzzz-manifest")
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(prefix=manifest, tensor_names=[MANIFEST_KEY], shape_and_slices=[""],
                          tensors=[tf.constant(json.dumps(
                              {"data_files": [{"size": s, "sha256": h} for s, h in files]}))])
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


def check(save_path, entries=()) -> None:
    """Checks a checkpoint before anything is restored from it.

    Every data file must exist; where the checkpoint has a tf_zero manifest,
    with the size and SHA-256 recorded at save. Every sliced entry of
    `entries` ([(key, object)]) must be there with the object's shape and
    dtype.

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
    if MANIFEST_KEY in shapes:
        files = json.loads(reader.get_tensor(MANIFEST_KEY))["data_files"]
        count = len(files) + 1  # the manifest's own data file is the last
        for i, recorded in enumerate(files):
            path = f"{save_path}.data-{i:05d}-of-{count:05d}"
            if not tf.io.gfile.exists(path):
                raise FileNotFoundError(
                    f"Checkpoint data file {path} is missing; the checkpoint cannot be "
                    "restored. Copy the whole checkpoint (every .data file and the .index).")
            size, digest = _size_and_hash(path)
            if size != recorded["size"] or digest != recorded["sha256"]:
                raise ValueError(
                    f"Checkpoint data file {path} is not the one this checkpoint wrote "
                    f"({size} bytes, SHA-256 {digest[:12]}..., recorded {recorded['size']} "
                    f"bytes, {recorded['sha256'][:12]}...): it is truncated, damaged or from "
                    "another save. Nothing was restored; restore a complete checkpoint.")
    for key, obj in entries:
        if key not in shapes:
            raise ValueError(
                f"Checkpoint {save_path} has no {key} ({obj.name}): it is the checkpoint of "
                "another model or optimizer. Nothing was restored.")
        if tuple(shapes[key]) != tuple(obj.shape) or tf.as_dtype(dtypes[key]) != obj.storage_dtype:
            raise ValueError(
                f"Checkpoint {save_path} holds {key} with shape {tuple(shapes[key])} and "
                f"dtype {tf.as_dtype(dtypes[key]).name}, but {obj.name} has shape {tuple(obj.shape)} and "
                f"dtype {obj.storage_dtype.name}: it is the checkpoint of another model or "
                "optimizer. Nothing was restored.")


def _read_slices(save_path, entries) -> None:
    """Reads this worker's slices of `entries`, `CHUNK_BYTES` at a time."""
    wanted = [(key, obj, spec, dtype) for key, obj in entries
              for spec, _, dtype, _ in obj.local_slices()]
    for chunk in _chunks(wanted, lambda e: _slice_bytes(e[3], e[2], e[1].shape)):
        with tf.device("/cpu:0"):
            values = tf.raw_ops.RestoreV2(prefix=save_path, tensor_names=[e[0] for e in chunk],
                                          shape_and_slices=[e[2] for e in chunk],
                                          dtypes=[e[3] for e in chunk])
        by_object = {}
        for (key, obj, spec, _), value in zip(chunk, values):
            by_object.setdefault(id(obj), (obj, {}))[1][spec] = value
        for obj, restored in by_object.values():
            obj.restore_slices(restored)
        del values, by_object
