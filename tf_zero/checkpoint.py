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
   replicated variables, with the sliced entries (the element split's slots,
   stage-3 weights) recorded but empty; state that is still gathered, the
   whole-partition slots, is read collectively there, every worker joining;
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
For a plain Keras file from a sharded checkpoint, read one tensor at a time:

    python -m tf_zero.checkpoint consolidate CKPT OUT.weights.h5 --model factory.py:make
    python -m tf_zero.checkpoint check CKPT
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
from tf_zero.sharded_variable import is_sharded

CHUNK_BYTES = 8 * 2**20
"""Most bytes of slices one write or read handles (one bucket by default)."""
MANIFEST_KEY = "_tf_zero/manifest"
STAGING_TIMEOUT_MS = 300_000
_saves = itertools.count()


def _is_sliced(obj) -> bool:
    return isinstance(obj, UnshardedSlot) or is_sharded(obj)


def _sliced(obj):
    """The object that saves and restores `obj`'s slices: a slot's face, or a
    stage-3 weight's `ShardedVariable`."""
    return obj if isinstance(obj, UnshardedSlot) else _private.sharded_storage(obj)


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
        check(save_path)
        entries = [(key, _sliced(obj))
                   for key, obj in _private.matched_objects(self, save_path, _is_sliced)]
        check(save_path, entries, files=False)
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
                # Gathered state (whole-partition slots) is read
                # collectively: join the chief's reads, write nothing.
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
                _private.run_write_callbacks(options, file_prefix)
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
    return file_prefix  # as given, as TensorFlow's saver returns it


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
    entries = [(key, _sliced(obj), *s)
               for key, obj in _private.sliced_objects(checkpoint, _is_sliced)
               for s in _sliced(obj).local_slices(_max_elements(_sliced(obj)))]
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


def check(save_path, entries=(), files=True) -> None:
    """Checks a checkpoint before anything is restored from it.

    Every data file must exist; where the checkpoint has a tf_zero manifest,
    with the size and SHA-256 recorded at save (unless `files` is false).
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


def _max_elements(obj) -> int:
    return max(1, CHUNK_BYTES // obj.storage_dtype.size)


def _read_slices(save_path, entries) -> None:
    """Reads this worker's slices of `entries`, `CHUNK_BYTES` at a time."""
    wanted = [(key, obj, spec, dtype) for key, obj in entries
              for spec, _, dtype, _ in obj.local_slices(_max_elements(obj))]
    for chunk in _chunks(wanted, lambda e: _slice_bytes(e[3], e[2], e[1].shape)):
        _read_chunk(save_path, chunk)


def _read_chunk(save_path, chunk) -> None:
    """One restore op for `chunk`'s slices, written into their shards (its
    tensors die with this call)."""
    with tf.device("/cpu:0"):
        values = tf.raw_ops.RestoreV2(prefix=save_path, tensor_names=[e[0] for e in chunk],
                                      shape_and_slices=[e[2] for e in chunk],
                                      dtypes=[e[3] for e in chunk])
    by_object = {}
    for (_, obj, spec, _), value in zip(chunk, values):
        by_object.setdefault(id(obj), (obj, {}))[1][spec] = value
    for obj, restored in by_object.values():
        obj.restore_slices(restored)


# -- a plain Keras file from a checkpoint ---------------------------------


def load_model_factory(spec: str):
    """A Keras model from `spec`: a `.keras` file, or `module:function` /
    `path/to/file.py:function` returning a built model."""
    import importlib
    import importlib.util

    import keras

    if spec.endswith(".keras"):
        return keras.models.load_model(spec, compile=False)
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"--model {spec!r}: expected a .keras file, module:function or "
                         "file.py:function.")
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location("tf_zero_model_factory", module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)()


def consolidate(save_path, output, model, root="model") -> int:
    """Writes the weights of `model` found in checkpoint `save_path` (saved as
    `Checkpoint(**{root: model, ...})`) to a Keras `.weights.h5` file, reading
    one tensor at a time: memory holds the model and one tensor.

    Returns the number of weights written.

    Raises:
        ValueError: `output` is not a `.weights.h5` path, or the checkpoint
            lacks a weight of `model` or holds it with another shape (named).
    """
    import keras

    if not str(output).endswith(".weights.h5"):
        raise ValueError(f"{output}: the output must be a .weights.h5 file.")
    check(save_path)
    reader = tf.train.load_checkpoint(save_path)
    shapes = reader.get_variable_to_shape_map()
    entries = _private.matched_objects(tf.train.Checkpoint(**{root: model}), save_path,
                                       lambda o: isinstance(o, keras.Variable))
    if len(entries) != len(model.weights):
        found = {id(v) for _, v in entries}
        missing = [w.path for w in model.weights if id(w) not in found]
        raise ValueError(f"Checkpoint {save_path} holds no value for {', '.join(missing[:5])}: "
                         f"it was not saved as Checkpoint({root}=<this model>, ...).")
    for key, variable in entries:
        if tuple(shapes[key]) != tuple(variable.shape):
            raise ValueError(f"Checkpoint {save_path} holds {key} with shape "
                             f"{tuple(shapes[key])}, but {variable.path} has shape "
                             f"{tuple(variable.shape)}: another model.")
    for key, variable in entries:
        with tf.device("/cpu:0"):
            value = tf.raw_ops.RestoreV2(prefix=save_path, tensor_names=[key],
                                         shape_and_slices=[""], dtypes=[variable.dtype])[0]
        variable.assign(value)
        del value
    model.save_weights(str(output))
    return len(entries)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tf_zero.checkpoint",
                                     description="Tools for tf_zero checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write a checkpoint's model weights as one Keras "
                       ".weights.h5 file, one tensor at a time")
    c.add_argument("checkpoint", help="checkpoint prefix (e.g. ckpt/ckpt-3)")
    c.add_argument("output", help="the .weights.h5 file to write")
    c.add_argument("--model", required=True,
                   help="the model: a .keras file, module:function or file.py:function")
    c.add_argument("--root", default="model",
                   help="the name the model was saved under: Checkpoint(model=...) (default)")
    k = sub.add_parser("check", help="check that every data file is present, complete and "
                       "of this save")
    k.add_argument("checkpoint", help="checkpoint prefix")
    args = parser.parse_args(argv)
    if args.command == "check":
        check(args.checkpoint)
        print(f"{args.checkpoint}: complete")
        return 0
    count = consolidate(args.checkpoint, args.output, load_model_factory(args.model), args.root)
    print(f"wrote {count} weights to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
