"""TensorFlow checkpoints of sharded state, written by every worker in parallel.

In one process, any `tf.train.Checkpoint` of a `ZeroOptimizer` already
writes each replica's pieces of every slot as slices of the full tensor,
straight from its shard, and restores each replica's pieces from whatever
split the checkpoint holds (`tf_zero.sharded_state`, `tf_zero.slices`).

Under several workers TensorFlow's rule is that every worker saves and only
the chief's file counts, so a plain `tf.train.Checkpoint` gathers every slot
to every worker. `Checkpoint` here instead has every worker write its own
slices, in parallel, into one checkpoint:

1. the chief picks a staging directory beside the target and posts it in the
   job's key-value store;
2. the chief writes the object graph, the replicated variables and its own
   slices there; every other worker writes only its own slices (no worker
   sends a shard to another);
3. once every worker reports success, the chief merges the parts'
   index files (`MergeV2Checkpoints`: data files are moved, not copied) and
   publishes the checkpoint: data files first, the index last, by rename,
   so a reader finds no index or a complete one; `save` then records it in
   the directory's `checkpoint` file;
4. every worker returns only after the publish, or raises if any worker
   failed, in which case nothing was published and the previous checkpoint
   is intact.

The directory must be one filesystem shared by the workers (as for
TensorFlow's sharded savers). Every worker calls `save`/`write` in the same
order, with the chief's path or, following TensorFlow's rule, a scratch
path of its own: the shards land in the chief's checkpoint either way.
Restoring through `Checkpoint.read`/`restore` reads on each worker only
the slices of its own replicas.

Keras' single-file formats (`.weights.h5`, `.keras`) hold full tensors by
definition: saving one assembles each slot (`tf_zero.saving`).
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import uuid

import tensorflow as tf

from tf_zero import _private, saving, slices
from tf_zero.sharded_state import UnshardedSlot

STAGING_TIMEOUT_MS = 300_000
_saves = itertools.count()


def _is_sliced(obj) -> bool:
    return isinstance(obj, UnshardedSlot)


def strategy_of(root):
    """The distribution strategy of the sharded state under `root`, or None."""
    for obj in tf.train.TrackableView(root).descendants():
        if isinstance(obj, UnshardedSlot):
            return obj._shards.strategy
        strategy = getattr(obj, "distribute_strategy", None)
        if strategy is not None and _private.in_multi_worker_mode(strategy):
            return strategy
    return None


class Checkpoint(tf.train.Checkpoint):
    """`tf.train.Checkpoint` whose sharded state every worker writes itself.

    Use it as `tf.train.Checkpoint` (also under `tf.train.CheckpointManager`).
    With one worker it is `tf.train.Checkpoint`. The checkpoint it writes is
    an ordinary TensorFlow checkpoint: `tf.train.Checkpoint`, plain Keras
    objects and any replica count or stage restore it.
    """

    def _write(self, file_prefix, options=None):
        strategy = strategy_of(self)
        if strategy is None or not _private.in_multi_worker_mode(strategy):
            return super()._write(file_prefix, options=options)
        return _parallel_write(self, strategy, os.fspath(file_prefix), options)

    def read(self, save_path, options=None):
        with slices.local_slices():
            return super().read(save_path, options=options)

    def restore(self, save_path, options=None):
        with slices.local_slices():
            return super().restore(save_path, options=options)


def _parallel_write(checkpoint, strategy, file_prefix, options):
    key = f"tf_zero/checkpoint/{next(_saves)}"
    chief = _private.is_chief(strategy)
    worker = _private.worker_index(strategy)
    if chief:
        target = os.path.abspath(file_prefix)
        staging = os.path.join(os.path.dirname(target),
                               f".{os.path.basename(target)}.staging-{uuid.uuid4().hex[:12]}")
        tf.io.gfile.makedirs(staging)
        _private.kv_set(f"{key}/staging", staging)
    else:
        try:
            staging = _private.kv_get(f"{key}/staging", timeout_ms=STAGING_TIMEOUT_MS)
        except tf.errors.OpError as e:
            raise RuntimeError(
                f"The chief did not start checkpoint save {key} within "
                f"{STAGING_TIMEOUT_MS // 1000}s; every worker must call save/write "
                "in the same order.") from e
    part = os.path.join(staging, f"part-{worker:05d}")
    error = None
    try:
        with slices.local_slices():
            if chief:
                part_options = copy.copy(options) or tf.train.CheckpointOptions()
                part_options.experimental_write_callbacks = None
                tf.train.Checkpoint._write(checkpoint, part, options=part_options)
            else:
                _write_own_slices(checkpoint, part)
    except Exception as e:  # noqa: BLE001  (re-raised after the agreement)
        error = e
    everyone_wrote = saving.worker_agreement(strategy, error is None)
    published = None
    if chief:
        try:
            if everyone_wrote:
                _merge_and_publish(staging, target)
                published = target
                _private.run_write_callbacks(options, target)
        except Exception as e:  # noqa: BLE001
            error = error or e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    everyone_published = saving.worker_agreement(strategy, error is None)
    if error is not None:
        raise error
    if not (everyone_wrote and everyone_published):
        raise RuntimeError(
            f"Writing checkpoint {file_prefix} failed on another worker (see its log); "
            "nothing was published and the previous checkpoint is intact.")
    return published or file_prefix


def _write_own_slices(checkpoint, part):
    """This worker's slices of the sharded state, under the checkpoint's keys."""
    entries = _private.local_serialized_slices(checkpoint, _is_sliced)
    if not entries:
        return
    keys, specs, tensors = zip(*entries)
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(prefix=part, tensor_names=list(keys), shape_and_slices=list(specs),
                          tensors=list(tensors))


def _merge_and_publish(staging, target):
    """Merges the workers' parts into `target`: data files, then the index."""
    parts = sorted(os.path.join(staging, f[:-len(".index")])
                   for f in tf.io.gfile.listdir(staging) if f.endswith(".index"))
    merged = os.path.join(staging, "merged")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=merged,
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
