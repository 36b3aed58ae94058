"""Checkpoint entries stored as slices (TensorFlow 2.21's private saver API).

TensorFlow's object checkpoints save a `Trackable` through
`_serialize_to_tensors`, which may return several slices of one tensor, but
their restore passes only the first slice back to `_restore_from_tensors`
(`TrackableSaveable.restore` maps one tensor per local name). The older
`SaveableObject` interface restores every slice, in the order of its specs,
and is what partitioned variables used; a sliced state object answers
`_gather_saveables_for_checkpoint` with `sliced_saveables(self)`.

`sliced_objects` finds such objects under a root with the checkpoint keys a
save of that root gives them, and `matched_objects` with the keys a saved
checkpoint holds them under, so that tf_zero can write and read their slices
itself, a few at a time; `unmatched_values` what a restore would leave out
on either side.
"""

from __future__ import annotations

import functools
import os

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2 as _object_graph_pb2
from tensorflow.python.checkpoint import checkpoint as _checkpoint
from tensorflow.python.checkpoint import functional_saver as _functional_saver
from tensorflow.python.checkpoint import graph_view as _graph_view
from tensorflow.python.trackable import trackable_utils as _trackable_utils
from tensorflow.python.training.saving import saveable_object as _saveable_object
from tensorflow.python.training.saving import saveable_object_util as _saveable_object_util

from tf_zero._private.keras_optimizer import VARIABLE_VALUE_KEY


class _SlicedSaveable(_saveable_object.SaveableObject):
    """The slices an owner saves and restores, as one `SaveableObject`.

    The owner defines `checkpoint_slices()`: a list of `(spec, read, dtype,
    device)`, `read` a function returning that slice's tensor (called only
    when saving); and `restore_slices({spec: tensor})`.
    """

    def __init__(self, owner, name):
        self._owner = owner
        specs = [_saveable_object.SaveSpec(read, spec, name, dtype=dtype, device=device)
                 for spec, read, dtype, device in owner.checkpoint_slices()]
        # Zero specs (the slices are written or read by tf_zero.checkpoint
        # itself): the object graph still records the entry.
        super().__init__(owner, specs, name)

    def restore(self, restored_tensors, restored_shapes=None):
        del restored_shapes
        self._owner.restore_slices(
            {spec.slice_spec: t for spec, t in zip(self.specs, restored_tensors)})
        return tf.no_op()


def sliced_saveables(owner) -> dict:
    """`_gather_saveables_for_checkpoint`'s answer for a sliced state object."""
    return {VARIABLE_VALUE_KEY: functools.partial(_SlicedSaveable, owner)}


def sliced_objects(root, is_sliced) -> list[tuple[str, object]]:
    """(checkpoint key, object) of every object `is_sliced(obj)` under `root`, in
    the order a checkpoint of `root` lists them, found without serializing
    anything (no value is read, no collective runs)."""
    objects, paths = _graph_view.ObjectGraphView(root).breadth_first_traversal()
    return [(_trackable_utils.checkpoint_key(_trackable_utils.object_path_to_string(paths[obj]),
                                             VARIABLE_VALUE_KEY), obj)
            for obj in objects if is_sliced(obj)]


def matched_objects(root, save_path, is_wanted) -> list[tuple[str, object]]:
    """(checkpoint key, object) of every object `is_wanted(obj)` under `root`
    that checkpoint `save_path` holds a value for, matched as TensorFlow's
    restore matches them: the saved object graph and the live objects walked
    together from the root, child by child name. (A key is one path to the
    object in the graph it was saved from, so the same object can have
    another key in a checkpoint of another root.)"""
    graph = _object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(tf.train.load_checkpoint(save_path).get_tensor(
        "_CHECKPOINTABLE_OBJECT_GRAPH"))
    view = _graph_view.ObjectGraphView(root)
    found, seen, queue = [], {0}, [(0, root)]
    while queue:
        node_id, obj = queue.pop(0)
        node = graph.nodes[node_id]
        if is_wanted(obj):
            keys = [a.checkpoint_key for a in node.attributes if a.name == VARIABLE_VALUE_KEY]
            if keys:
                found.append((keys[0], obj))
        live = {child.name: child.ref for child in view.list_children(obj)}
        for child in node.children:
            if child.local_name in live and child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, live[child.local_name]))
    return found


def _saved_object_graph(save_path):
    reader = tf.train.load_checkpoint(save_path)
    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        return None, reader
    graph = _object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph, reader


def holds_checkpoint_value(obj) -> bool:
    """Whether a checkpoint of `obj` stores a value for it (a variable, a
    sliced state object), as opposed to a container of other objects."""
    return (_saveable_object_util.trackable_has_serialize_to_tensor(obj)
            or bool(obj._gather_saveables_for_checkpoint()))


def unmatched_values(root, save_path):
    """What a restore of checkpoint `save_path` into `root` would leave out,
    found without restoring anything: the saved object graph and the live
    objects are walked together from the root, child by child name, as
    TensorFlow's restore matches them.

    Returns:
        None for a checkpoint without an object graph (name-based). Otherwise
        `(saved_only, live_only)`. `saved_only` lists each value the checkpoint
        holds that no live object matches, as `(checkpoint key, shape, path,
        missing, live)`: `path` the names from the root to it, `missing` the
        first name on that path the live objects lack, `live` the live objects
        matched along the path before it. `live_only` lists each live object
        holding a value that the checkpoint has no value for, as `(object,
        path, missing)`: `missing` the first name on its path the checkpoint
        lacks, or None when the checkpoint has the object without a value.
    """
    graph, reader = _saved_object_graph(save_path)
    if graph is None:
        return None
    shapes = reader.get_variable_to_shape_map()
    view = _graph_view.ObjectGraphView(root)
    matched = {0: root}  # saved node id -> live object
    # Saved nodes in breadth-first order, each with its path of names and the
    # live objects matched along it (up to the first name the live side lacks).
    walk = {0: ((), (root,), None)}
    queue = [0]
    while queue:
        node_id = queue.pop(0)
        path, live_chain, missing = walk[node_id]
        obj = matched.get(node_id)
        live = ({child.name: child.ref for child in view.list_children(obj)}
                if obj is not None else {})
        for child in graph.nodes[node_id].children:
            ref = live.get(child.local_name)
            # A node already reached stays as it was, unless this path is the
            # first to match it (the same object can hang under several parents).
            if child.node_id in matched or (child.node_id in walk and ref is None):
                continue
            if ref is not None:
                matched[child.node_id] = ref
            walk[child.node_id] = (
                path + (child.local_name,),
                live_chain + (ref,) if ref is not None else live_chain,
                missing if missing is not None or ref is not None else child.local_name)
            queue.append(child.node_id)
    saved_only = []
    for node_id, (path, live_chain, missing) in walk.items():
        keys = [a.checkpoint_key for a in graph.nodes[node_id].attributes]
        if node_id not in matched and keys:
            saved_only.append((keys[0], tuple(shapes.get(keys[0], ())), path, missing,
                               live_chain))
    with_value = {id(matched[i]) for i in matched if graph.nodes[i].attributes}
    seen = {id(obj) for obj in matched.values()}
    live_only = []
    objects, paths = view.breadth_first_traversal()
    for obj in objects:
        if id(obj) in with_value or not holds_checkpoint_value(obj):
            continue
        names = tuple(ref.name for ref in paths[obj])
        missing = next((ref.name for ref in paths[obj] if id(ref.ref) not in seen), None)
        live_only.append((obj, names, missing))
    return saved_only, live_only


def snapshot(root):
    """Serializes `root` as `tf.train.Checkpoint(root).write` would and reads
    every value now; returns `write(file_prefix, options)`, which writes that
    snapshot (from any thread).

    A read shares the variable's buffer, and TensorFlow copies a variable's
    buffer before changing it while another reference to it is alive
    (`AssignVariableOp` replaces the buffer; the in-place update kernels copy
    it first when it is shared): the snapshot keeps this moment's values,
    costing host memory only for the variables updated before it is
    written. A worker whose file would be discarded calls it too, to join
    the collectives that reading gathered state runs, in the same order.
    """
    saver = getattr(root, "_saver", None)  # a tf.train.Checkpoint's, with its attached objects
    if not isinstance(saver, _checkpoint.TrackableSaver):
        saver = _checkpoint.TrackableSaver(_graph_view.ObjectGraphView(root))
    serialized, _, registered, _ = saver._gather_serialized_tensors(None)
    frozen = type(serialized)()  # keyed by identity
    for obj, tensors in serialized.items():
        frozen[obj] = _read_now(tensors)

    def write(file_prefix, options=None):
        tf.io.gfile.makedirs(os.path.dirname(file_prefix))
        with tf.device("/cpu:0"):
            prefix = tf.constant(file_prefix)
        _functional_saver.MultiDeviceSaver(frozen, registered).save(
            prefix, options=options or tf.train.CheckpointOptions())

    return write


def _read_now(value):
    if isinstance(value, dict):
        return {k: _read_now(v) for k, v in value.items()}
    if isinstance(value, _saveable_object.SaveSpec):
        tensor = value.tensor  # calls a deferred read
        return value if tensor is None else tensor  # None: uninitialized, as TF keeps it
    if isinstance(value, tf.Variable):  # a distributed variable saves itself: its primary's value
        return value.read_value()
    return value


def run_write_callbacks(options, save_path) -> None:
    """Runs `options.experimental_write_callbacks` (what `Checkpoint.save` adds to
    record the checkpoint in the directory's "checkpoint" file)."""
    if options is not None and options.experimental_write_callbacks:
        _checkpoint._execute_callbacks(options.experimental_write_callbacks, save_path)


def write_checkpoint(checkpoint, file_prefix, options=None):
    """TensorFlow's own write of a `tf.train.Checkpoint` (the method that
    `tf_zero.Checkpoint` overrides)."""
    return tf.train.Checkpoint._write(checkpoint, file_prefix, options=options)


def track_trackable(parent, child, name: str) -> None:
    """Makes `child` the checkpoint dependency `name` of `parent`."""
    parent._track_trackable(child, name=name, overwrite=True)
