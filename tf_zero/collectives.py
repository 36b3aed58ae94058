"""Cross-replica operations, one signature each, whatever the backend.

The reduce-scatter, all-gather and all-reduce of the step run in replica
context (inside `strategy.run`, inside a
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

Hybrid sharding launches the same operations on sub-groups (`Subgroup`,
`shard_groups`): the K replicas of one shard group, or the N/K replicas that
hold the same shard index in every group; each sub-group has a collective key
of its own, derived from the strategy's key base, so every worker computes it
alike.

Outside replica context, `full_value`, `gather_components` and `gather_parts`
assemble per-replica state on the host (concatenated locally on one worker,
gathered across workers). Every collective takes and returns flat 1-D
tensors: `dense_flat`, `join` and `pad` make them. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.traffic import quantize


def backend(strategy=None) -> str:
    """The reduce-scatter backend the current replica uses."""
    strategy = strategy or tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if launcher is None:
        return "replica_context"
    if "GPU" in _private.launcher_device(launcher).upper():
        return "nccl"
    return "all_to_all"


@dataclasses.dataclass(frozen=True)
class Subgroup:
    """The replicas a hybrid-sharding collective spans.

    N replicas form shard groups of K consecutive global replica ids
    (`0..K-1`, `K..2K-1`, ...). `kind="shard"`: the K replicas of this
    replica's shard group, over which state is sharded (reduce-scatter,
    publish). `kind="replica"`: the N/K replicas, one per shard group, that
    hold the same shard index (the all-reduce of a gradient shard across
    groups).

    Attributes:
        kind: "shard" or "replica".
        group_size: K, replicas per shard group.
        replicas: N.
        key_base: the strategy's collective key base.
    """

    kind: str
    group_size: int
    replicas: int
    key_base: int

    @property
    def size(self) -> int:
        """Members of each such sub-group."""
        return self.group_size if self.kind == "shard" else self.replicas // self.group_size

    def key(self, rank: int) -> int:
        """The collective group key of global replica `rank`'s sub-group:
        distinct for every sub-group of every group size of the strategy (a
        key names one set of members)."""
        n, k = self.replicas, self.group_size
        index = rank // k if self.kind == "shard" else n // k + rank % k
        layout = [d for d in range(1, n + 1) if n % d == 0].index(k)
        return self.key_base + _private.SUBGROUP_KEY_OFFSET + layout * 2 * n + index

    def position(self, rank: int) -> int:
        """Replica `rank`'s position in its sub-group (its slice of a reduce-scatter)."""
        k = self.group_size
        return rank % k if self.kind == "shard" else rank // k


def shard_groups(strategy, group_size: int) -> tuple[Subgroup, Subgroup]:
    """(shard group, replica group) of hybrid sharding over groups of
    `group_size` replicas of `strategy`.

    Raises:
        ValueError: `group_size` does not divide the replica count.
    """
    n = strategy.num_replicas_in_sync
    if group_size < 1 or n % group_size:
        raise ValueError(
            f"shard_group_size={group_size} must divide the {n} replicas; choose a divisor "
            "of the replica count (the devices of one worker, for instance).")
    base = _private.collective_key_base(strategy)
    if sum(n % d == 0 for d in range(1, n + 1)) * 2 * n > _private.SUBGROUP_KEY_OFFSET:
        raise ValueError(
            f"{n} replicas have more sub-groups than tf_zero's collective keys number "
            f"({_private.SUBGROUP_KEY_OFFSET}); use full sharding (no shard_group_size).")
    return (Subgroup("shard", group_size, n, base), Subgroup("replica", group_size, n, base))


# {strategy: {(operation, options): tf.function running it on every replica}}
_eager_functions = weakref.WeakKeyDictionary()


def _eager_via_merge_call(operation):
    """Runs `operation` through `merge_call` and a `tf.function` when eager."""

    @functools.wraps(operation)
    def run(x, options=None, group=None):
        strategy = tf.distribute.get_strategy()
        if (not tf.executing_eagerly() or _num_replicas() == 1
                or _private.collective_launcher(strategy) is None):
            return operation(x, options, group)
        x = tf.convert_to_tensor(x)
        return tf.distribute.get_replica_context().merge_call(
            _run_on_every_replica, args=(operation, x, options, group))

    return run


def _run_on_every_replica(strategy, operation, x, options, group):
    functions = _eager_functions.setdefault(strategy, {})
    key = (operation, id(options), group)
    if key not in functions:
        def on_every_replica(values):
            return strategy.run(operation, args=(values,),
                                kwargs={"options": options, "group": group})

        functions[key] = (tf.function(on_every_replica, autograph=False), options)
    return functions[key][0](x)


def _launch(options, group, op_name):
    """(launcher or None, its LaunchParams) of this replica's collective over
    every replica or over `group`."""
    strategy = tf.distribute.get_strategy()
    launcher = _private.collective_launcher(strategy)
    if group is None:
        params = None if launcher is None else _private.LaunchParams(launcher, options)
        return launcher, params
    if launcher is None:
        raise ValueError(
            f"{op_name} over a hybrid-sharding sub-group needs a collective strategy "
            "(tf_zero.ZeroStrategy); this strategy has no collective launchers.")
    r = rank()
    params = _private.LaunchParams(launcher, options, group=(group.size, group.key(r)))
    return launcher, params


def _check_1d(x, op_name):
    if x.shape.rank != 1:
        raise ValueError(f"{op_name} takes a 1-D tensor, got shape {x.shape}")


def _num_replicas():
    return tf.distribute.get_replica_context().num_replicas_in_sync


def rank() -> int:
    """This replica's rank (its global replica id) as a Python int."""
    return _private.global_replica_id()


@_eager_via_merge_call
def reduce_scatter(x: tf.Tensor, options=None, group=None) -> tf.Tensor:
    """Sums `x` over replicas; replica `r` receives slice `r` of the sum.

    Args:
        x: 1-D tensor whose length is a multiple of the replica count (its
            static length may be unknown; it is then checked when run).
        options: optional `tf.distribute.experimental.CommunicationOptions`.
        group: a `Subgroup` to sum over instead of every replica; the
            replica receives the slice of its position in it.

    Returns:
        1-D tensor of length `len(x) / num_replicas` (or `/ group.size`).
    """
    _check_1d(x, "reduce_scatter")
    n = _num_replicas() if group is None else group.size
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
    launcher, params = _launch(options, group, "reduce_scatter")
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, x, options=options)
        return total[rank() * shard:(rank() + 1) * shard]
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
def all_gather(x: tf.Tensor, options=None, group=None) -> tf.Tensor:
    """Concatenates every replica's `x` in replica order.

    Args:
        x: 1-D tensor of the same length on every replica.
        options: optional `tf.distribute.experimental.CommunicationOptions`.
        group: a `Subgroup` to gather over instead of every replica, in the
            order of its members' positions.

    Returns:
        1-D tensor of length `num_replicas * len(x)` (or `group.size * len(x)`).
    """
    _check_1d(x, "all_gather")
    if (_num_replicas() if group is None else group.size) == 1:
        return tf.identity(x)
    launcher, params = _launch(options, group, "all_gather")
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_gather(x, axis=0, options=options)
    if x.dtype == tf.bfloat16:  # no bfloat16 gather kernel: move the bits
        gathered = _private.raw_all_gather(tf.bitcast(x, tf.float16), params)
        return tf.bitcast(gathered, tf.bfloat16)
    return _private.raw_all_gather(x, params)


@_eager_via_merge_call
def all_reduce_sum(x: tf.Tensor, options=None, group=None) -> tf.Tensor:
    """Sums `x` over replicas (or over `group`, a `Subgroup`); every member
    receives the full sum."""
    _check_1d(x, "all_reduce_sum")
    if (_num_replicas() if group is None else group.size) == 1:
        return tf.identity(x)
    launcher, params = _launch(options, group, "all_reduce_sum")
    if launcher is None:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x, options=options)
    return _private.raw_all_reduce(x, params)


@_eager_via_merge_call
def all_to_all(x: tf.Tensor, options=None, group=None) -> tf.Tensor:
    """Sends row `j` of `x` (`n` equal rows laid end to end) to replica `j`;
    returns the rows every replica sent this one, in replica order.

    Args:
        x: 1-D tensor whose length is a multiple of the replica count.
        options: optional `tf.distribute.experimental.CommunicationOptions`.
        group: a `Subgroup` to exchange within instead of every replica.
    """
    _check_1d(x, "all_to_all")
    n = _num_replicas() if group is None else group.size
    if n == 1:
        return tf.identity(x)
    launcher, params = _launch(options, group, "all_to_all")
    if launcher is None:  # no all-to-all there: gather every row, keep ours
        ctx = tf.distribute.get_replica_context()
        rows = tf.reshape(ctx.all_gather(x, axis=0, options=options), [n, n, -1])
        return tf.reshape(rows[:, rank()], [-1])
    return tf.reshape(_private.raw_all_to_all(tf.reshape(x, [n, -1]), params), [-1])


# ---- quantized collectives (ZeRO++): see tf_zero.traffic.quantize ---------------


def quantized_all_gather(x: tf.Tensor, q, dtype, group=None) -> tf.Tensor:
    """`all_gather` of `x` block-quantized by `q` (a
    `tf_zero.traffic.quantize.BlockQuantization`), dequantized into `dtype`.

    Every replica receives the same bytes, so every replica's result is the
    same, its own part included. One collective: codes and scales travel
    together. Without a peer (`n == 1`) `x` is only cast.
    """
    _check_1d(x, "quantized_all_gather")
    n = _num_replicas() if group is None else group.size
    if n == 1:
        return tf.cast(x, dtype)
    length = int(x.shape[0])
    wire = quantize.pack(*quantize.quantize(x, q), q)
    rows = tf.reshape(all_gather(wire, group=group), [n, -1])
    codes, scales = quantize.unpack(rows, length, q)
    return tf.reshape(quantize.dequantize(codes, scales, length, dtype), [-1])


def quantized_reduce_scatter(x: tf.Tensor, q, group=None) -> tf.Tensor:
    """`reduce_scatter` with each replica's slices sent block-quantized by `q`
    (one all-to-all of codes and scales) and summed in float32 on arrival;
    returned in `x.dtype`. A block holding NaN or infinity arrives as NaN.
    """
    _check_1d(x, "quantized_reduce_scatter")
    n = _num_replicas() if group is None else group.size
    if n == 1:
        return tf.identity(x)
    length = int(x.shape[0])
    if length % n:
        raise ValueError(
            f"quantized_reduce_scatter needs a length divisible by {n} replicas, got "
            f"{length}; pad the input (the shard plan does).")
    shard = length // n
    wire = quantize.pack(*quantize.quantize(tf.reshape(x, [n, shard]), q), q)
    received = tf.reshape(all_to_all(tf.reshape(wire, [-1]), group=group), [n, -1])
    codes, scales = quantize.unpack(received, shard, q)
    total = tf.reduce_sum(quantize.dequantize(codes, scales, shard, tf.float32), axis=0)
    return tf.cast(total, x.dtype)


def quantized_all_reduce_sum(x: tf.Tensor, q, group=None) -> tf.Tensor:
    """`all_reduce_sum` whose inputs travel block-quantized by `q` (one
    all-gather), summed in float32 in the same order on every member: every
    member receives the same sum. For the slow hop of hybrid sharding."""
    n = _num_replicas() if group is None else group.size
    if n == 1:
        return tf.identity(x)
    rows = tf.reshape(quantized_all_gather(x, q, tf.float32, group), [n, -1])
    return tf.cast(tf.reduce_sum(rows, axis=0), x.dtype)


def shard_sum(flat: tf.Tensor, reduce_dtype=None, groups=None, quantization=None) -> tf.Tensor:
    """This replica's slice of the sum of `flat` over every replica: the
    gradient reduce-scatter of the step and of stage 3's gathers.

    Args:
        flat: 1-D local gradient, its length a multiple of the shard count.
        reduce_dtype: dtype the gradient travels in (None: its own).
        groups: hybrid sharding's (shard group, replica group): reduce-scatter
            within the shard group, then all-reduce the slice across groups,
            so every replica holding shard `s` receives the sum over all.
        quantization: a `BlockQuantization` the gradient travels in: the
            reduce-scatter without hybrid sharding, only the all-reduce across
            groups with it (the slow hop). Sums are float32 on arrival.

    Returns:
        The summed slice in `flat.dtype`.
    """
    within, across = groups if groups else (None, None)
    if quantization is not None and across is None:
        return quantized_reduce_scatter(flat, quantization, group=within)
    wire = flat if not reduce_dtype else tf.cast(flat, reduce_dtype)
    shard = reduce_scatter(wire, group=within)
    if across is not None:
        shard = (quantized_all_reduce_sum(shard, quantization, group=across)
                 if quantization is not None else all_reduce_sum(shard, group=across))
    return tf.cast(shard, flat.dtype) if shard.dtype != flat.dtype else shard


# ---- the flat layout every collective takes ------------------------------------


def dense_flat(grad, shape) -> tf.Tensor:
    """`grad` of a variable of static `shape` as a dense 1-D tensor.

    The length comes from the variable, never from the gradient: an
    `IndexedSlices` may carry an unknown `dense_shape`, and a tied weight's
    gradient (an embedding also read as the output projection: a sparse plus
    a dense part) loses its static length.

    Args:
        grad: a `tf.Tensor` or `tf.IndexedSlices` (rows of the first axis).
        shape: the variable's fully defined shape.

    Returns:
        A dense tensor of static shape `[prod(shape)]`.
    """
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape, dtype=np.int64))
    if isinstance(grad, tf.IndexedSlices):
        # Densify against the variable's row count, not grad.dense_shape.
        rows = shape[0] if shape else 1
        grad = tf.math.unsorted_segment_sum(grad.values, grad.indices, rows)
    return tf.reshape(grad, [size])


def join(parts) -> tf.Tensor:
    """The 1-D `parts` end to end (the one part itself: no copy)."""
    return tf.concat(parts, 0) if len(parts) > 1 else parts[0]


def pad(flat: tf.Tensor, length: int) -> tf.Tensor:
    """`flat` followed by zeros up to `length` elements (a bucket's padding)."""
    missing = length - int(flat.shape[0])
    if missing <= 0:
        return flat
    return tf.concat([flat, tf.zeros([missing], flat.dtype)], 0)


# ---- per-replica state, assembled outside replica context ------------------------


class ComponentGather:
    """Gathers per-replica variables whole, on every worker: calling it returns,
    for each variable, all replicas' components joined in rank order along
    the first axis (a collective: every worker must call it, for the same
    variables in the same order).

    One collective per dtype carries every variable's components, in a
    function traced at the first call and reused: an eager `strategy.gather`
    traces a function of its own at every call (a quarter to half a second
    each, per variable, per save). Every replica's components must have the
    same shape (shards and slots of shards do).

    Args:
        strategy: the (multi-worker) strategy.
        variables: the per-replica variables.
    """

    def __init__(self, strategy, variables):
        self._strategy = strategy
        self._variables = list(variables)
        self._function = None

    def __call__(self) -> list[tf.Tensor]:
        if self._function is None:
            self._function = tf.function(self._gather, autograph=False)
        return self._function()

    def _gather(self):
        strategy = self._strategy
        offset = _private.local_replica_ranks(strategy)[0]
        n = strategy.num_replicas_in_sync
        comps = [_private.components(v) for v in self._variables]
        shapes = [tuple(c[0].shape) for c in comps]
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        by_dtype = {}
        for i, c in enumerate(comps):
            by_dtype.setdefault(c[0].dtype, []).append(i)
        gathered = [None] * len(comps)
        for indices in by_dtype.values():

            def joined(ctx, indices=indices):
                local = ctx.replica_id_in_sync_group - offset
                return join([tf.reshape(comps[i][local].read_value(), [-1])
                             for i in indices])

            whole = strategy.gather(
                strategy.experimental_distribute_values_from_function(joined), axis=0)
            columns = tf.split(tf.reshape(whole, [n, -1]), [sizes[i] for i in indices], axis=1)
            for i, column in zip(indices, columns):
                shape = shapes[i]
                gathered[i] = tf.reshape(column, [n * shape[0], *shape[1:]] if shape else [n])
        return gathered


def gather_components(strategy, variable) -> tf.Tensor:
    """All replicas' components of a per-replica variable, joined in rank order
    on every worker (a collective: every worker must call it). The gather's
    function is kept on the variable and traced once."""
    gather = getattr(variable, "_tf_zero_gather", None)
    if gather is None:
        gather = ComponentGather(strategy, [variable])
        variable._tf_zero_gather = gather
    return gather()[0]


def full_value(strategy, variable) -> tf.Tensor:
    """Every replica's component of a per-replica variable, joined in rank
    order: concatenated on the host with one worker, gathered with several."""
    if _private.in_multi_worker_mode(strategy):
        return gather_components(strategy, variable)
    parts = []
    for comp in _private.components(variable):
        with tf.device(comp.device):
            parts.append(tf.identity(comp.read_value()))
    with tf.device("/cpu:0"):
        return join(parts)


def gather_parts(strategy, parts: dict, dtype) -> tf.Tensor:
    """The replicas' `parts`, flattened and joined in rank order, on every
    worker (a collective: every worker must call it for the same state).

    Args:
        strategy: the (multi-worker) strategy.
        parts: {rank: variable} for this worker's replicas that hold a part;
            every other replica contributes an empty tensor (which
            `strategy.gather` pads on the wire: saves are rare, and the result
            is the parts bit for bit).
        dtype: the parts' dtype.
    """

    def part(ctx):
        variable = parts.get(ctx.replica_id_in_sync_group)
        if variable is not None:
            return tf.reshape(variable.value, [-1])
        return tf.zeros([0], dtype)

    return strategy.gather(strategy.experimental_distribute_values_from_function(part), axis=0)
