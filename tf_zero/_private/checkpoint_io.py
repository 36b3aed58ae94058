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
itself, a few at a time.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2 as _object_graph_pb2
from tensorflow.python.checkpoint import checkpoint as _checkpoint
from tensorflow.python.checkpoint import graph_view as _graph_view
from tensorflow.python.checkpoint import save_util as _save_util
from tensorflow.python.trackable import trackable_utils as _trackable_utils
from tensorflow.python.training.saving import saveable_object as _saveable_object

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


def serialize_only(root) -> None:
    """Serializes `root` as `tf.train.Checkpoint(root).write` would, writing
    nothing: a worker whose file would be discarded still joins the
    collectives that reading gathered state runs, in the same order."""
    _save_util.serialize_graph_view(_graph_view.ObjectGraphView(root))


def run_write_callbacks(options, save_path) -> None:
    """Runs `options.experimental_write_callbacks` (what `Checkpoint.save` adds to
    record the checkpoint in the directory's "checkpoint" file)."""
    if options is not None and options.experimental_write_callbacks:
        _checkpoint._execute_callbacks(options.experimental_write_callbacks, save_path)
