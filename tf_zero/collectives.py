"""Cross-replica operations, one signature each, whatever the backend.

All functions run in replica context (inside `strategy.run`, inside a
`tf.function`) and take 1-D tensors. The backend is chosen per call from the
current strategy:

* `"nccl"`: collective reduce-scatter (GPU replicas of a collective strategy).
* `"all_to_all"`: on CPU, where TensorFlow has no reduce-scatter kernel, an
  all-to-all followed by a local sum is a true reduce-scatter with the same
  traffic.
* `"replica_context"`: strategies without collective launchers (e.g.
  `MirroredStrategy` with NCCL all-reduce): `ReplicaContext.all_reduce` and
  a slice (twice the traffic), `ReplicaContext.all_gather`.

Ranks follow `replica_id_in_sync_group`: shard `r` of a reduce-scatter goes to
replica `r`, and an all-gather concatenates in replica order.

Eagerly (`strategy.run` without `tf.function`, Keras' `run_eagerly=True`) a
raw collective would hang: the strategy runs the replicas' Python threads one
at a time, so the first replica would wait forever for the others. There, each
collective leaves replica context through `merge_call` (every replica reaches
it) and runs, for all replicas at once, inside a `tf.function` of its own.
"""

from __future__ import annotations

import functools
import weakref

import tensorflow as tf

from tf_zero import _private


def backend(strategy=None) -> str:
    """The reduce-scatter backend the current replica uses."""
    strategy = strategy or tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if launcher is None:
        return "replica_context"
    if "GPU" in _private.launcher_device(launcher).upper():
        return "nccl"
    return "all_to_all"


# {strategy: {(operation, options): tf.function running it on every replica}}
_eager_functions = weakref.WeakKeyDictionary()


def _eager_via_merge_call(operation):
    """Runs `operation` through `merge_call` and a `tf.function` when eager."""

    @functools.wraps(operation)
    def run(x, options=None):
        strategy = tf.distribute.get_strategy()
        if (not tf.executing_eagerly() or _num_replicas() == 1
                or _private.collective_launcher(strategy) is None):
            return operation(x, options)
        x = tf.convert_to_tensor(x)
        return tf.distribute.get_replica_context().merge_call(
            _run_on_every_replica, args=(operation, x, options))

    return run


def _run_on_every_replica(strategy, operation, x, options):
    functions = _eager_functions.setdefault(strategy, {})
    key = (operation, id(options))
    if key not in functions:
        def on_every_replica(values):
            return strategy.run(operation, args=(values,), kwargs={"options": options})

        functions[key] = (tf.function(on_every_replica, autograph=False), options)
    return functions[key][0](x)


def _check_1d(x, op_name):
    if x.shape.rank != 1:
        raise ValueError(f"{op_name} takes a 1-D tensor, got shape {x.shape}")


def _num_replicas():
    return tf.distribute.get_replica_context().num_replicas_in_sync


def rank() -> int:
    """This replica's rank (its global replica id) as a Python int."""
    return _private.global_replica_id()


@_eager_via_merge_call
def reduce_scatter(x: tf.Tensor, options=None) -> tf.Tensor:
    """Sums `x` over replicas; replica `r` receives slice `r` of the sum.

    Args:
        x: 1-D tensor whose length is a multiple of the replica count (its
            static length may be unknown; it is then checked when run).
        options: optional `tf.distribute.experimental.CommunicationOptions`.

    Returns:
        1-D tensor of length `len(x) / num_replicas`.
    """
    _check_1d(x, "reduce_scatter")
    n = _num_replicas()
    length = x.shape[0]
    if length is None:
        # Known only when the step runs: check it there.
        length = tf.shape(x)[0]
        with tf.control_dependencies([tf.debugging.assert_equal(
                length % n, 0, message=f"reduce_scatter needs a length divisible "
                f"by {n} replicas; pad the input (the shard plan does).")]):
            x = tf.identity(x)
    elif length % n:
        raise ValueError(
            f"reduce_scatter needs a length divisible by {n} replicas, got "
            f"{length}; pad the input (the shard plan does).")
    if n == 1:
        return tf.identity(x)
    shard = length // n
    strategy = tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, x, options=options)
        return total[rank() * shard:(rank() + 1) * shard]
    params = _private.LaunchParams(launcher, options)
    if "GPU" in params.device.upper():
        return _private.raw_reduce_scatter(x, params)
    # All-to-all moves data without arithmetic, so 16-bit types travel as
    # float16 bits (CPU kernels lack bfloat16) and are summed in float32.
    wire = x if x.dtype != tf.bfloat16 else tf.bitcast(x, tf.float16)
    received = _private.raw_all_to_all(tf.reshape(wire, [n, shard]), params)
    if x.dtype == tf.bfloat16:
        received = tf.bitcast(received, tf.bfloat16)
    if x.dtype in (tf.bfloat16, tf.float16):
        return tf.cast(tf.reduce_sum(tf.cast(received, tf.float32), axis=0),
                       x.dtype)
    return tf.reduce_sum(received, axis=0)


@_eager_via_merge_call
def all_gather(x: tf.Tensor, options=None) -> tf.Tensor:
    """Concatenates every replica's `x` in replica order.

    Args:
        x: 1-D tensor of the same length on every replica.
        options: optional `tf.distribute.experimental.CommunicationOptions`.

    Returns:
        1-D tensor of length `num_replicas * len(x)`.
    """
    _check_1d(x, "all_gather")
    if _num_replicas() == 1:
        return tf.identity(x)
    strategy = tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_gather(x, axis=0, options=options)
    params = _private.LaunchParams(launcher, options)
    if x.dtype == tf.bfloat16:  # no bfloat16 gather kernel: move the bits
        gathered = _private.raw_all_gather(tf.bitcast(x, tf.float16), params)
        return tf.bitcast(gathered, tf.bfloat16)
    return _private.raw_all_gather(x, params)


@_eager_via_merge_call
def all_reduce_sum(x: tf.Tensor, options=None) -> tf.Tensor:
    """Sums `x` over replicas; every replica receives the full sum."""
    _check_1d(x, "all_reduce_sum")
    if _num_replicas() == 1:
        return tf.identity(x)
    strategy = tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x, options=options)
    return _private.raw_all_reduce(x, _private.LaunchParams(launcher, options))
