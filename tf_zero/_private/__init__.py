"""Every private TensorFlow and Keras API tf_zero touches, in one place.

TensorFlow exposes no public way to launch a reduce-scatter or all-to-all on
the devices of a `tf.distribute` strategy, to write one replica's component of
a distributed variable, or to choose the local devices of a multi-worker
strategy; Keras none to run an optimizer's update on replica-local shards, to
agree on loss-scale overflow, or to resume `fit` mid-epoch. The few private
entry points used for that are wrapped in this package, checked against the
TensorFlow versions in `CHECKED_TF_VERSIONS`, and covered by
`tests/test_private.py`. No other tf_zero module imports `tensorflow.python`
or `keras.src`, or reads a TensorFlow or Keras object's underscore names.

Modules: `distribute` (collectives, replicas, per-replica variables, the
coordination service), `checkpoint_io` (checkpoint entries stored as
slices), `keras_optimizer` (update step, loss scaling, saving
walker, optimizer state), `keras_layers` (autocast, weight creation, layer
state), `keras_training` (the trainer's hooks). Everything is re-exported
here: callers write `_private.components(v)`.
"""

from __future__ import annotations

import tensorflow as tf

CHECKED_TF_VERSIONS = ("2.21",)
"""TensorFlow minor versions on which every wrapper in this package was verified
(and Keras 3.15, the version `keras_*` modules were read against)."""


def check_tensorflow_version(version: str | None = None) -> None:
    """Fails loudly on a TensorFlow whose private APIs were never checked.

    Raises:
        RuntimeError: the installed TensorFlow minor version is not one of
            `CHECKED_TF_VERSIONS`.
    """
    version = version or tf.__version__
    minor = ".".join(version.split(".")[:2])
    if minor not in CHECKED_TF_VERSIONS:
        raise RuntimeError(
            f"tf_zero was verified on TensorFlow {', '.join(CHECKED_TF_VERSIONS)} "
            f"but TensorFlow {version} is installed. tf_zero uses private "
            "collective APIs that change between releases: install a checked "
            f"version (pip install 'tensorflow=={CHECKED_TF_VERSIONS[-1]}.*')."
        )


check_tensorflow_version()

from tf_zero._private.distribute import (  # noqa: E402
    CollectiveAllReduceExtendedBase, CollectiveAllReduceStrategyBase, LaunchParams,
    LocalDevicesExtended, components, collective_launcher, eager_mode, global_replica_id,
    in_multi_worker_mode, in_save_context, initialize_strategy_base, is_chief,
    is_distributed_variable, is_sync_on_read, kv_get, kv_set, launcher_device,
    local_component, local_replica_index, own_buffers, local_replica_ranks, new_mirrored_strategy,
    new_multi_worker_strategy, next_collective_key_base, raw_all_gather, raw_all_reduce,
    raw_all_to_all, raw_reduce_scatter, sharded_storage, strategy_of, tf_variable,
    worker_count, worker_index, local_variable_creator, unique_id, is_composite_tensor, export_to_saved_model_graph, write_object_proto)
from tf_zero._private.checkpoint_io import (  # noqa: E402
    matched_objects, run_write_callbacks, serialize_only, sliced_objects, sliced_saveables)
from tf_zero._private.keras_layers import (  # noqa: E402
    added_loss_count, autocast_dtype, autocast_scope, layer_adding_weight,
    own_trainable_variables)
from tf_zero._private.keras_optimizer import (  # noqa: E402
    VARIABLE_VALUE_KEY, Trackable, accumulated_gradients, clip_gradients, iterations_variable,
    learning_rate_variable, mark_local_update, multi_optimizer_choices, muon_uses_adamw,
    keras_view, share_iterations, stand_in,
    detach_from_strategy, keras_tracking, without_keras_tracking, register_keras_saving_skiplist,
    trackable_children, trained_variables, update_step, uses_weight_decay)
from tf_zero._private.keras_training import (  # noqa: E402
    on_fit_exit, route_keras_saves, set_batches_to_skip, set_initial_epoch)
