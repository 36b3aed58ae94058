"""Every private TensorFlow and Keras API tf_zero touches, in one place.

TensorFlow exposes no public way to launch a reduce-scatter or all-to-all on
the devices of a `tf.distribute` strategy, to write one replica's component of
a distributed variable, or to choose the local devices of a multi-worker
strategy; Keras none to run an optimizer's update on replica-local shards, to
agree on loss-scale overflow, or to resume `fit` mid-epoch. The few private
entry points used for that are wrapped in this package, checked against the
TensorFlow and Keras versions in `CHECKED_COMBINATIONS`, and covered by
`tests/test_private_api.py`. No other tf_zero module imports `tensorflow.python`
or `keras.src`, or reads a TensorFlow or Keras object's underscore names.

Modules: `distribute` (collectives, replicas, per-replica variables, the
coordination service), `checkpoint_io` (checkpoint entries stored as
slices), `keras_optimizer` (update step, loss scaling, saving walker,
optimizer state), `keras_layers` (autocast, weight creation, layer state),
`keras_training` (the trainer's hooks and its traced step) and
`keras_callbacks` (the saving callbacks' hooks), `graphs` (the bodies of the
functions a traced graph calls), `patches` (every replaced Keras attribute,
in one table, installed once by `import tf_zero`). Everything else is
re-exported here: callers write `_private.components(v)`.
"""

from __future__ import annotations

import tensorflow as tf

CHECKED_COMBINATIONS = {
    "2.19": ("3.10", "3.15"),
    "2.20": ("3.11", "3.15"),
    "2.21": ("3.15",),
}
"""The TensorFlow and Keras minor versions tf_zero was tested on together: every
wrapper in this package by `tests/test_private_api.py`, and a compat subset of
the suite by `tests/compat/run_matrix.sh` (TensorFlow 2.19.1, 2.20.0 and 2.21.0;
Keras 3.10.0, 3.11.3 and 3.15.1; see docs/compat.md). For each TensorFlow, the
Keras pip installed beside it when that TensorFlow was new, and the newest
Keras. TensorFlow 2.21 itself needs Keras 3.12 or later."""

CHECKED_TF_VERSIONS = tuple(CHECKED_COMBINATIONS)
"""TensorFlow minor versions on which every wrapper in this package was verified."""

CHECKED_KERAS_VERSIONS = tuple(sorted({k for ks in CHECKED_COMBINATIONS.values() for k in ks},
                                      key=lambda v: tuple(map(int, v.split(".")))))
"""Keras minor versions the `keras_*` modules were verified on (with the
TensorFlow versions `CHECKED_COMBINATIONS` pairs them with)."""

MIN_KERAS_VERSION = (3, 10)
"""Keras 3.9 has no `keras.Variable(synchronization=...)`, which every sharded
state variable is created with: no Keras before 3.10 can work."""


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_versions(tf_version: str | None = None, keras_version: str | None = None) -> None:
    """Fails loudly on a TensorFlow and Keras never tested together.

    tf_zero reads private TensorFlow collective and checkpoint APIs and private
    Keras trainer and optimizer APIs, which change between releases; a
    combination outside `CHECKED_COMBINATIONS` is refused with the install
    that gives a tested one (the installed TensorFlow's newest tested Keras,
    or the newest tested pair).

    Raises:
        RuntimeError: the pair of minor versions is not in `CHECKED_COMBINATIONS`.
    """
    import keras

    tf_version = tf_version or tf.__version__
    keras_version = keras_version or keras.__version__
    tf_minor, keras_minor = _minor(tf_version), _minor(keras_version)
    if keras_minor in CHECKED_COMBINATIONS.get(tf_minor, ()):
        return
    if tf_minor in CHECKED_COMBINATIONS:
        fix = f"pip install 'keras=={CHECKED_COMBINATIONS[tf_minor][-1]}.*'"
    else:
        newest = CHECKED_TF_VERSIONS[-1]
        fix = (f"pip install 'tensorflow=={newest}.*' "
               f"'keras=={CHECKED_COMBINATIONS[newest][-1]}.*'")
    tested = "; ".join(f"TensorFlow {t} with Keras {' or '.join(ks)}"
                       for t, ks in CHECKED_COMBINATIONS.items())
    why = ""
    if tuple(int(p) for p in keras_minor.split(".")) < MIN_KERAS_VERSION:
        why = (" Keras before 3.10 has no keras.Variable(synchronization=...), "
               "which sharded state needs.")
    raise RuntimeError(
        f"tf_zero was tested on {tested}, but TensorFlow {tf_version} with Keras "
        f"{keras_version} is installed.{why} tf_zero uses private TensorFlow and "
        f"Keras APIs that change between releases: install a tested combination "
        f"({fix}).")


check_versions()

from tf_zero._private.distribute import (  # noqa: E402
    CollectiveAllReduceExtendedBase, CollectiveAllReduceStrategyBase, LaunchParams,
    LocalDevicesExtended, SUBGROUP_KEY_OFFSET, collective_key_base, collective_launcher,
    components, eager_mode,
    export_to_saved_model_graph, global_replica_id, in_multi_worker_mode, in_save_context,
    initialize_strategy_base, is_chief, is_composite_tensor, is_distributed_variable,
    is_sharded, is_sync_on_read, kv_get, kv_set, launcher_device, local_component,
    local_replica_index, local_replica_ranks, local_variable_creator, new_mirrored_strategy,
    new_multi_worker_strategy, next_collective_key_base, own_buffers, raw_all_gather,
    raw_all_reduce, raw_all_to_all, raw_reduce_scatter, replace_buffer, host_copy,
    sharded_storage, strategy_of,
    tf_variable, uninitialized, unique_id, worker_count, worker_index, write_object_proto)
from tf_zero._private.checkpoint_io import (  # noqa: E402
    matched_objects, run_write_callbacks, sliced_objects, sliced_saveables,
    snapshot,
    track_trackable, unmatched_values, write_checkpoint)
from tf_zero._private.keras_layers import (  # noqa: E402
    add_weight_arguments, added_loss_count, autocast_dtype, autocast_scope, layer_adding_weight,
    own_trainable_variables)
from tf_zero._private.keras_optimizer import (  # noqa: E402
    VARIABLE_VALUE_KEY, Trackable, accumulated_gradients, clip_gradients,
    detach_from_strategy, is_multi_optimizer, iterations_variable, keras_tracking, keras_view,
    learning_rate_variable, mark_local_update, multi_optimizer_choices, muon_uses_adamw,
    own_variables, register_keras_saving_skiplist, share_iterations, slot_prefix,
    slots_initialized_from_variable, stand_in, track_variable, trackable_children,
    trained_variables, update_step, uses_weight_decay, variable_path,
    without_keras_tracking)
from tf_zero._private.keras_training import (  # noqa: E402
    epoch_item, on_fit_exit, set_batches_to_skip, set_initial_epoch, symbolic_build,
    train_step_function)
from tf_zero._private.graphs import defines_function, function_graph  # noqa: E402
