"""ZeroStrategy: a MultiWorkerMirroredStrategy that carries the ZeRO config.

One worker over local devices, or a `TF_CONFIG` / cluster-resolver cluster;
collective keys of its own; at stage 3 its scope creates weights sharded
(`tf_zero.weights`), and under a mixed policy at stages 1-2 as 16-bit working
copies over float32 master shards. See docs/multi-worker.md, docs/stage3.md
and docs/mixed-precision.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import tensorflow as tf

from tf_zero import _private
from tf_zero.config import (DEFAULT_BUCKET_SIZE_BYTES, DEFAULT_PERSISTENCE_THRESHOLD,
                            DEFAULT_PREFETCH_DEPTH, DEFAULT_QUANTIZATION_BLOCK_SIZE, WORKER,
                            ZeroConfig, positive_int)
from tf_zero.fault import preemption, shutdown, startup
from tf_zero.fault.coordination import DEVICES_ENV
from tf_zero.weights.creator import sharding_creator, uses_creator


def _default_local_devices():
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tuple(d.name for d in gpus)
    return tuple(d.name for d in tf.config.list_logical_devices("CPU"))


class ZeroStrategy(_private.CollectiveAllReduceStrategyBase):
    """Data parallelism whose optimizer state is sharded across replicas.

    `ZeroStrategy` is a `tf.distribute.MultiWorkerMirroredStrategy`: variables
    created under `scope()` are mirrored, gradients travel through collective
    ops, and `model.fit` works unchanged. It adds the ZeRO configuration that a
    `tf_zero.ZeroOptimizer` created under its scope picks up (stage, bucket
    size, reduce dtype), gives every instance its own collective keys (so
    several strategies can live in one process), and fixes two Keras 3
    failures of `model.fit` under multi-worker collective strategies
    (keras-team/keras#20585): `Strategy.reduce` on a nest of per-replica
    values, and `axis=0` reductions of per-replica scalars.

    Without `TF_CONFIG` or a cluster resolver it is a one-worker strategy over
    `devices` (default: every local GPU, else every logical CPU device). With
    `TF_CONFIG` (or `cluster_resolver`) it spans all workers of the cluster;
    there SIGTERM ends a worker again (TensorFlow's coordination service
    swallows it), or, with a backup callback in `fit`, saves the current step
    on every worker first (see `tf_zero.fault.preemption`).

    Args:
        devices: device names for a single-worker strategy.
        stage: ZeRO stage, 1, 2 or 3 (see `tf_zero.ZeroConfig`). At stage 3
            the trainable float weights created under `scope()` are stored
            as 1/N shards (see docs/stage3.md).
        bucket_size_bytes: gradient bucket size.
        reduce_dtype: optional dtype for gradient communication.
        persistence_threshold, prefetch_depth, recompute: stage-3 settings,
            see `tf_zero.ZeroConfig`.
        param_dtype: "compute" (default, None) or "float32": 16-bit working
            copies at stages 1-2 under a mixed policy, see `tf_zero.ZeroConfig`.
        shard_group_size: hybrid sharding over groups of this many replicas
            (stages 1-2), see `tf_zero.ZeroConfig`; "worker": the devices of
            one worker.
        quantized_weights, quantized_gradients, quantization_block_size:
            quantized collectives (ZeRO++'s qwZ and qgZ): "int8" gathers of
            master shards, "int8"/"int4" gradient reduce-scatters, see
            `tf_zero.ZeroConfig` and docs/quantized-collectives.md.
        cluster_resolver: a `tf.distribute.cluster_resolver.ClusterResolver`
            for multi-worker runs (default: read `TF_CONFIG`).
        communication_options: `tf.distribute.experimental.CommunicationOptions`
            (e.g. `timeout_seconds` to turn a dead worker into an error).
        devices_per_worker: in multi-worker runs without GPUs, the number of
            logical CPU devices each worker uses as replicas (default: the
            `TF_ZERO_DEVICES_PER_WORKER` variable that `tf_zero.launch` sets).
        startup_timeout: in multi-worker runs, seconds this constructor waits
            for every worker of the cluster to start (default 600; None:
            TensorFlow's own hour). The workers not serving are named after
            30 s; on timeout, those that never joined are named and this
            worker is SIGKILLed (TensorFlow's wait holds the interpreter, so
            no exception can end it; see `tf_zero.fault.startup`).

    Raises:
        ValueError: both `devices` and a multi-worker cluster are given,
            `TF_CONFIG` is malformed (named), or an invalid ZeRO configuration.

    Example:
        >>> strategy = tf_zero.ZeroStrategy(stage=2)  # doctest: +SKIP
        >>> with strategy.scope():  # doctest: +SKIP
        ...     model.compile(tf_zero.ZeroOptimizer(keras.optimizers.Adam()))
    """

    def __init__(self, devices=None, *, stage=2,
                 bucket_size_bytes=DEFAULT_BUCKET_SIZE_BYTES, reduce_dtype=None,
                 persistence_threshold=DEFAULT_PERSISTENCE_THRESHOLD,
                 prefetch_depth=DEFAULT_PREFETCH_DEPTH, recompute=True, param_dtype=None,
                 shard_group_size=None, quantized_weights=None, quantized_gradients=None,
                 quantization_block_size=DEFAULT_QUANTIZATION_BLOCK_SIZE, cluster_resolver=None, communication_options=None,
                 devices_per_worker=None, startup_timeout=startup.DEFAULT_STARTUP_TIMEOUT):
        per_worker = shard_group_size == WORKER
        if per_worker:
            shard_group_size = None  # resolved once the devices are known
        self._zero_config = ZeroConfig(stage=stage,
                                       bucket_size_bytes=bucket_size_bytes,
                                       reduce_dtype=reduce_dtype,
                                       persistence_threshold=persistence_threshold,
                                       prefetch_depth=prefetch_depth,
                                       recompute=recompute, param_dtype=param_dtype,
                                       shard_group_size=shard_group_size,
                                       quantized_weights=quantized_weights,
                                       quantized_gradients=quantized_gradients,
                                       quantization_block_size=quantization_block_size)
        if communication_options is None:
            communication_options = tf.distribute.experimental.CommunicationOptions()
        if startup_timeout is not None and not startup_timeout > 0:
            raise ValueError(
                f"startup_timeout must be a positive number of seconds or None, got "
                f"{startup_timeout!r}")
        if cluster_resolver is None:
            if not startup.read_tf_config() and startup.in_slurm_step():
                cluster_resolver = startup.slurm_cluster_resolver()  # inside `srun`
        resolver = (cluster_resolver or
                    tf.distribute.cluster_resolver.TFConfigClusterResolver())
        cluster = resolver.cluster_spec().as_dict()
        multi_worker = bool(cluster)
        if multi_worker and devices is not None:
            raise ValueError(
                "ZeroStrategy got both `devices` and a multi-worker cluster "
                "(TF_CONFIG or cluster_resolver). Pass `devices_per_worker` "
                "for multi-worker runs, or unset TF_CONFIG to use `devices`.")
        if devices_per_worker is None and os.environ.get(DEVICES_ENV):
            devices_per_worker = int(os.environ[DEVICES_ENV])  # set by tf_zero.launch
        if devices_per_worker is not None:
            devices_per_worker = positive_int("devices_per_worker", devices_per_worker)
        if not multi_worker:
            devices = tuple(devices) if devices else _default_local_devices()
            resolver = None
        self._collective_key_base = _private.next_collective_key_base()
        tasks = startup.coordinated_tasks(cluster)  # none without a cluster
        # A multi-worker start waits here for every worker of the cluster.
        watch = (startup.StartupWatch(tasks,
                                      (resolver.task_type, resolver.task_id),
                                      timeout=startup_timeout)
                 if multi_worker else contextlib.nullcontext())
        with watch:
            try:
                extended = _private.LocalDevicesExtended(
                    self, cluster_resolver=resolver,
                    communication_options=communication_options,
                    devices=None if multi_worker else devices,
                    devices_per_worker=devices_per_worker)
            except tf.errors.UnavailableError as e:
                if not multi_worker:
                    raise
                raise RuntimeError(startup.unjoined_message(
                    tasks,
                    (resolver.task_type, resolver.task_id), e)) from e
            _private.initialize_strategy_base(self, extended)
        if per_worker:
            shard_group_size = self.num_replicas_in_sync // _private.worker_count(self)
            self._zero_config = dataclasses.replace(self._zero_config,
                                                    shard_group_size=shard_group_size,
                                       quantized_weights=quantized_weights,
                                       quantized_gradients=quantized_gradients,
                                       quantization_block_size=quantization_block_size)
        if shard_group_size is not None and self.num_replicas_in_sync % shard_group_size:
            raise ValueError(
                f"shard_group_size={shard_group_size} must divide the "
                f"{self.num_replicas_in_sync} replicas; use a divisor (the devices of one "
                "worker shard inside the worker and replicate across workers).")
        if multi_worker:
            # TensorFlow's coordination service swallows SIGTERM; take it back
            # (a backup callback saves instead while it is in fit).
            preemption.exit_on_sigterm(self)
            # The coordination service's host leaves last: no error in the
            # others' logs at the end of a run.
            shutdown.leave_last(tasks,
                                (resolver.task_type, resolver.task_id))

    @property
    def zero_config(self) -> ZeroConfig:
        """The frozen ZeRO configuration of this strategy."""
        return self._zero_config

    @property
    def stage(self) -> int:
        return self._zero_config.stage

    def scope(self):
        """`Strategy.scope()`, creating the weights tf_zero stores: at stage 3
        sharded; at stages 1-2 under a mixed policy, 16-bit working copies
        over float32 master shards."""
        scope = super().scope()
        if not uses_creator(self._zero_config):
            return scope
        return _sharding_scope(scope, sharding_creator(self, self._zero_config))

    def reduce(self, reduce_op, value, axis=None):
        """`Strategy.reduce`, mapped over nests; scalars reduce with axis=None."""

        def reduce_one(v):
            rank = _rank_of(v)
            return super(ZeroStrategy, self).reduce(
                reduce_op, v, axis=None if rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


@contextlib.contextmanager
def _sharding_scope(strategy_scope, creator):
    with strategy_scope as strategy, tf.variable_creator_scope(creator):
        yield strategy


def _rank_of(value):
    values = getattr(value, "values", None)
    if values is not None and isinstance(values, tuple):
        value = values[0]
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tf.TensorShape(shape).rank
