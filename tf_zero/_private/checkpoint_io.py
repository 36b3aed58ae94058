"""Checkpoint entries stored as slices (TensorFlow 2.21's private saver API).

TensorFlow's object checkpoints save a `Trackable` through
`_serialize_to_tensors`, which may return several slices of one tensor, but
their restore passes only the first slice back to `_restore_from_tensors`
(`TrackableSaveable.restore` maps one tensor per local name). The older
`SaveableObject` interface restores every slice, in the order of its specs,
and is what partitioned variables used; a sliced state object answers
`_gather_saveables_for_checkpoint` with `sliced_saveables(self)`.

`local_serialized_slices` lists what a checkpoint of a root object would
write for such objects only, under the checkpoint keys of that root: a
worker that writes only its own slices of a multi-worker checkpoint.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint as _checkpoint
from tensorflow.python.checkpoint import graph_view as _graph_view
from tensorflow.python.checkpoint import save_util as _save_util
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
        super().__init__(owner, specs, name)

    def restore(self, restored_tensors, restored_shapes=None):
        del restored_shapes
        self._owner.restore_slices(
            {spec.slice_spec: t for spec, t in zip(self.specs, restored_tensors)})
        return tf.no_op()


def sliced_saveables(owner) -> dict:
    """`_gather_saveables_for_checkpoint`'s answer for a sliced state object."""
    return {VARIABLE_VALUE_KEY: functools.partial(_SlicedSaveable, owner)}


def local_serialized_slices(root, is_sliced) -> list[tuple[str, str, tf.Tensor]]:
    """(checkpoint key, slice spec, tensor) of every object `is_sliced(obj)` under
    `root`, as `tf.train.Checkpoint(root).write` would save them."""
    serialized = _save_util.serialize_graph_view(_graph_view.ObjectGraphView(root))[0]
    out = []
    for trackable, tensors in serialized.items():
        if not is_sliced(getattr(trackable, "obj", trackable)):
            continue
        for key, slices in tensors.items():
            if not isinstance(slices, dict):
                slices = {"": slices}
            for spec, tensor in slices.items():
                if isinstance(tensor, _saveable_object.SaveSpec):
                    tensor = tensor.tensor  # a callable's value
                out.append((key, spec, tensor))
    return out


def run_write_callbacks(options, save_path) -> None:
    """Runs `options.experimental_write_callbacks` (what `Checkpoint.save` adds to
    record the checkpoint in the directory's "checkpoint" file)."""
    if options is not None and options.experimental_write_callbacks:
        _checkpoint._execute_callbacks(options.experimental_write_callbacks, save_path)
