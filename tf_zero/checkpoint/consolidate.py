"""A plain Keras weights file from a checkpoint, one tensor at a time.

`python -m tf_zero.checkpoint consolidate CKPT OUT.weights.h5 --model F` and
`check CKPT`. See docs/checkpoints.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private
from tf_zero.checkpoint.parallel import check


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
