"""Communication accounting: the bytes each replica sends in one training step.

`collective_traffic` traces a training step without running it (or takes a
graph already traced), finds every collective op and device-to-device copy in
it and in every function body it runs (`traced_ops.py`), and charges each
the bytes a replica sends by the usual ring / direct accounting, for a group of
G replicas and a tensor of M bytes (element count x dtype size):

* all-reduce: 2M(G-1)/G (a reduce-scatter, then an all-gather of M/G);
* reduce-scatter, and all-to-all: M(G-1)/G (a slice of M/G to every peer);
* all-gather of m bytes per replica: m(G-1);
* broadcast of m bytes, and a reduce of M to one replica: m(G-1) over the
  group, an average of m(G-1)/G per replica;
* a copy (a tensor used on another device): its bytes, by its sender.

Each figure is split by destination between replicas of the sender's worker
and replicas of other workers, for N replicas laid out as W workers of K
devices: with L of the group's G members on the sender's worker, an
all-to-all or reduce-scatter pass (or an all-gather) sends (L-1)/G of it inside
the worker and (G-L)/G across workers; an all-reduce counts as a
reduce-scatter plus an all-gather. For a group of all N replicas, L = K. L is
read from the graph (the local devices that run ops of the group's key) under
the layout of the strategy, or under a layout given as `workers` and
`devices_per_worker`, which models W x K for a single-process trace.

Shapes come from the trace; a collective whose tensor has no static size is
listed as dynamic and not counted, never guessed. A collective inside a cond
branch (an accumulation window's end) counts only when its branch runs: the
report gives a step that takes the costliest branch of every cond
(`bytes_per_replica`: the update step) and one that takes the cheapest
(`least_bytes_per_replica`: a step that only accumulates). A collective inside
a while loop counts once per iteration (Keras' `steps_per_execution` loop:
one iteration per step).

Example:
    >>> report = tf_zero.traffic.collective_traffic(model, x, y, batch_size=64)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    >>> report.select(scope="zero_reduce").bytes_per_replica  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import re

import keras
import numpy as np
import tensorflow as tf

from tf_zero import _private
from tf_zero.traffic import traced_ops

KINDS = ("all_reduce", "reduce_scatter", "all_to_all", "all_gather", "broadcast", "reduce",
         "copy", "unknown")
# The name scopes of tf_zero's step links (tf_zero/step/chain.py) and stage-3
# gathers (tf_zero/weights/sharded.py).
ZERO_SCOPES = ("zero_flatten", "zero_reduce", "zero_statistics", "zero_refresh", "zero_update",
               "zero_publish", "zero_gather", "zero_gather_grad")
# Ops that stand for the whole group in the graph (NCCL's receivers or
# senders are added when the graph runs): charged the group's total.
_ONE_OP_PER_GROUP = ("NcclReduce", "NcclBroadcast")


def sent_bytes(kind: str, nbytes: float, group_size: int,
               members_on_worker: int | None = None) -> tuple[float, float]:
    """(inside, across): bytes one replica sends for one collective.

    Args:
        kind: one of `KINDS` except "copy" and "unknown".
        nbytes: the tensor's bytes (an all-gather's: one replica's part).
        group_size: G, the replicas of the collective's group.
        members_on_worker: L, the group's replicas on the sender's worker
            (default: all of them).

    Returns:
        Bytes sent to replicas of the same worker, and to other workers.

    Raises:
        ValueError: an unknown kind.
    """
    g = int(group_size)
    if g <= 1:
        return 0.0, 0.0
    local = g if members_on_worker is None else min(max(int(members_on_worker), 1), g)
    inside, across = (local - 1) / g, (g - local) / g
    if kind == "all_reduce":
        factor = 2.0
    elif kind in ("reduce_scatter", "all_to_all", "broadcast", "reduce"):
        factor = 1.0
    elif kind == "all_gather":
        factor = float(g)
    else:
        raise ValueError(f"sent_bytes knows the kinds {KINDS[:6]}, got {kind!r}.")
    return nbytes * factor * inside, nbytes * factor * across


def name_scope(op_name: str) -> str:
    """The scope an op's traffic is grouped under.

    The innermost tf_zero link (`ZERO_SCOPES`) in the op's name, else its
    name scope without replica prefixes and TensorFlow's `_1` suffixes.
    """
    parts = [p for p in op_name.split("/")[:-1] if not re.fullmatch(r"replica_\d+", p)]
    parts = [re.sub(r"_\d+$", "", p) for p in parts]
    zero = [p for p in parts if p in ZERO_SCOPES]
    if zero:
        return zero[-1]
    return "/".join(parts) or "(top level)"


@dataclasses.dataclass(frozen=True)
class CollectiveTraffic:
    """One collective op (or device copy) of a step and the bytes it sends.

    Attributes:
        name: the op's name in its graph.
        op_type: the TensorFlow op type (`CollectiveReduceV2`, ...).
        kind: "all_reduce", "reduce_scatter", "all_to_all", "all_gather",
            "broadcast", "reduce", "copy" or "unknown".
        scope: see `name_scope` (a copy: its receiving op's).
        device: the device that runs the op (a copy: the sender).
        dtype: the dtype of the tensor sent.
        shape: its static shape (an all-gather: one replica's part), None if
            even its rank is unknown; dimensions may be None.
        elements: its element count, None when the shape is not static.
        group_size, group_key: the collective's group (a copy: 2, None).
        function: the library function that holds the op ("" at top level).
        branch: the cond branches around the op ("" if none), e.g.
            "zero_adam/cond:then".
        loop: the while loops around the op ("" if none).
        bytes_sent: bytes the op's replica sends each time it runs, None if
            the size or group is unknown.
        inside_bytes, across_bytes: `bytes_sent` to replicas of the same
            worker and of other workers.
        destination: a copy's receiving device ("" for collectives).
        sized_by: "trace", or "full-batch trace" where the size came from
            the same Keras step traced on endless data (see
            `collective_traffic`).
    """

    name: str
    op_type: str
    kind: str
    scope: str
    device: str
    dtype: str
    shape: tuple | None
    elements: int | None
    group_size: int | None
    group_key: object
    function: str
    branch: str
    loop: str
    bytes_sent: float | None
    inside_bytes: float | None
    across_bytes: float | None
    destination: str = ""
    sized_by: str = "trace"
    branches: tuple = dataclasses.field(default=(), repr=False)

    @property
    def counted(self) -> bool:
        """Whether its bytes are known (static size, known group)."""
        return self.bytes_sent is not None


@dataclasses.dataclass(frozen=True)
class TrafficReport:
    """The bytes each replica sends in one step, by op, kind, scope and link.

    Per-replica figures are the local devices' totals divided by `replicas`
    (`by_device` shows where they differ, as under `ReductionToOneDevice`).

    Attributes:
        ops: every collective op and device copy, in graph order; ops of all
            local replicas.
        replicas: the local replicas the totals are divided by.
        workers, devices_per_worker: the layout inside/across figures use.
    """

    ops: tuple[CollectiveTraffic, ...]
    replicas: int
    workers: int
    devices_per_worker: int

    def _totals(self, pick) -> tuple[float, float, float]:
        """(total, inside, across) per replica of a step whose conds take the
        branch `pick` (max or min) chooses by total bytes."""
        items = [(op.branches, (op.bytes_sent, op.inside_bytes, op.across_bytes))
                 for op in self.ops if op.counted]
        return tuple(v / max(self.replicas, 1) for v in _step_total(items, pick))

    @property
    def bytes_per_replica(self) -> float:
        """Bytes a replica sends in a step that takes the costliest branch of
        every cond (with accumulation: the update step)."""
        return self._totals(max)[0]

    @property
    def least_bytes_per_replica(self) -> float:
        """Bytes a replica sends in a step that takes the cheapest branch of
        every cond (with accumulation: a step that only accumulates)."""
        return self._totals(min)[0]

    @property
    def inside_bytes_per_replica(self) -> float:
        """Of `bytes_per_replica`, the bytes sent to the replica's own worker."""
        return self._totals(max)[1]

    @property
    def across_bytes_per_replica(self) -> float:
        """Of `bytes_per_replica`, the bytes sent to other workers."""
        return self._totals(max)[2]

    @property
    def by_kind(self) -> dict:
        """{kind: bytes per replica} (costliest branches), kinds present only."""
        return {k: self.select(kind=k).bytes_per_replica for k in KINDS
                if any(op.kind == k for op in self.ops)}

    @property
    def by_scope(self) -> dict:
        """{scope: bytes per replica} (costliest branches), in first-seen order."""
        scopes = dict.fromkeys(op.scope for op in self.ops)
        return {s: self.select(scope=s).bytes_per_replica for s in scopes}

    @property
    def by_device(self) -> dict:
        """{device: bytes it sends} (costliest branches)."""
        devices = dict.fromkeys(op.device for op in self.ops)
        return {d: self.select(device=d).bytes_per_replica * self.replicas for d in devices}

    @property
    def by_branch(self) -> dict:
        """{cond branches: bytes per replica of the ops inside, when taken}."""
        out = collections.OrderedDict()
        for op in self.ops:
            if op.branch and op.counted:
                key = _without_replica(op.branch)
                out[key] = out.get(key, 0.0) + op.bytes_sent / max(self.replicas, 1)
        return dict(out)

    @property
    def dynamic(self) -> tuple[CollectiveTraffic, ...]:
        """The ops whose size or group is not static: not counted."""
        return tuple(op for op in self.ops if not op.counted)

    def select(self, kind=None, scope=None, device=None) -> TrafficReport:
        """The report of the ops of one kind, scope and/or device."""
        ops = tuple(op for op in self.ops
                    if (kind is None or op.kind == kind) and (scope is None or op.scope == scope)
                    and (device is None or op.device == device))
        return dataclasses.replace(self, ops=ops)

    def __str__(self):
        r = self.replicas
        lines = [f"Collective traffic of one step: {r} local replica(s); layout "
                 f"{self.workers} worker(s) x {self.devices_per_worker} device(s); "
                 "bytes each replica sends (per replica: local total / replicas)"]
        header = (f"  {'':<28}{'bytes':>16}{'inside worker':>16}{'across workers':>16}"
                  f"{'ops (all replicas)':>20}")

        def row(label, sub):
            return (f"  {label:<28}{_fmt(sub.bytes_per_replica):>16}"
                    f"{_fmt(sub.inside_bytes_per_replica):>16}"
                    f"{_fmt(sub.across_bytes_per_replica):>16}{len(sub.ops):>20}")

        lines += ["by kind", header]
        lines += [row(k, self.select(kind=k)) for k in self.by_kind]
        lines += ["by scope", header]
        lines += [row(s, self.select(scope=s)) for s in self.by_scope]
        lines.append(row("total", self))
        least = self.least_bytes_per_replica
        if self.by_branch:
            lines.append("inside cond branches (bytes per replica when the branch runs):")
            lines += [f"  {b}: {_fmt(v)}" for b, v in self.by_branch.items()]
            lines.append(f"a step taking the costliest branches: {_fmt(self.bytes_per_replica)}; "
                         f"the cheapest: {_fmt(least)}")
        resized = [op for op in self.ops if op.sized_by != "trace"]
        if resized:
            lines.append(f"{len(resized)} ops without a static size in fit's step took it from "
                         "the step traced on endless data (full batches)")
        if any(op.loop for op in self.ops):
            lines.append("ops inside while loops count once per iteration")
        if self.dynamic:
            lines.append(f"not counted, size or group not static ({len(self.dynamic)} ops): "
                         + ", ".join(sorted({f'{op.op_type} {op.shape} in {op.scope}'
                                             for op in self.dynamic})))
        per_device = set(round(v) for v in self.by_device.values())
        if len(per_device) > 1:
            lines.append("by device (bytes sent): " + ", ".join(
                f"{_short(d)} {_fmt(v)}" for d, v in self.by_device.items()))
        return "\n".join(lines)


def collective_traffic(fn_or_model, *args, batch_size=None, workers=None,
                       devices_per_worker=None, strategy=None, **kwargs) -> TrafficReport:
    """The bytes each replica sends in one traced training step.

    The step is traced, not run: for a Keras model, the function `fit`
    runs (`model.make_train_function()`), traced on a distributed iterator
    of full per-replica batches of the data given, so that every size is
    static (the model, its metrics and optimizer are built first, as `fit`
    builds them); for a `tf.function`, its concrete function for
    `args`; a concrete function or a graph is read as it is. Every collective
    op and device copy of the graph and of the functions it runs is charged
    its bytes (see the module docstring for the formulas and the
    inside/across split).

    Args:
        fn_or_model: a compiled `keras.Model`, a `tf.function`, a Python
            function (wrapped in `tf.function`), a concrete function, or a
            `tf.Graph`.
        *args, **kwargs: for a model, `x` and `y` as `fit` takes them, or a
            batched `tf.data.Dataset`; for a function, its arguments.
        batch_size: the global batch size, for a model given arrays or a
            dataset whose batch dimension is not static; a multiple of the
            replica count.
        workers, devices_per_worker: the layout to split inside/across by
            (default: the strategy's; a single-process trace of W x K
            replicas can be read as W workers of K devices).
        strategy: the strategy the step runs under (default: the model's),
            for the layout and the number of local replicas.

    Returns:
        A `TrafficReport`.

    Raises:
        ValueError: a model given data without a batch size, a batch that does
            not split evenly over the replicas, or a layout that does not fit
            the step's groups or devices.
        TypeError: `fn_or_model` is none of the above.

    Example:
        >>> @tf.function
        ... def step(x):
        ...     return strategy.run(lambda v: tf_zero.collectives.all_reduce_sum(v), (x,))
        >>> report = collective_traffic(step, tf.zeros([1024]))  # doctest: +SKIP
        >>> report.bytes_per_replica  # 2 x 4096 x 3/4 on 4 replicas  # doctest: +SKIP
        6144.0
    """
    if isinstance(fn_or_model, keras.Model):
        strategy = strategy or fn_or_model.distribute_strategy
        transfers = _keras_step_transfers(fn_or_model, args, kwargs, batch_size)
        return _report(transfers, workers, devices_per_worker, strategy)
    if isinstance(fn_or_model, tf.Graph):
        graph, captured = fn_or_model, ()
    elif hasattr(fn_or_model, "graph") and hasattr(fn_or_model, "captured_inputs"):
        graph, captured = fn_or_model.graph, fn_or_model.captured_inputs
    elif callable(fn_or_model):
        function = fn_or_model if hasattr(fn_or_model, "get_concrete_function") else (
            tf.function(fn_or_model))
        concrete = function.get_concrete_function(*args, **kwargs)
        graph, captured = concrete.graph, concrete.captured_inputs
    else:
        raise TypeError(
            "collective_traffic reads a keras.Model, a tf.function, a concrete function or "
            f"a tf.Graph, got {type(fn_or_model).__name__}.")
    transfers = traced_ops.find_transfers(graph, captured)
    return _report(transfers, workers, devices_per_worker, strategy)


def _keras_step_transfers(model, args, kwargs, batch_size):
    """The transfers of Keras' fit step on full batches of the data given.

    Every replica gets a batch of static size (the global batch over the
    replicas, the remainder dropped): with an unknown batch dimension, as
    `fit`'s own input gives it, shape inference loses the size of gradients
    that pass through a reshape (a Dense layer on 3-D inputs), and with it
    the size of the all-reduce that carries them. Under several workers
    tf.distribute still relaxes the batch dimension of a finite dataset (its
    iterator then agrees across workers on whether data is left, with a
    small all-reduce of its own); a collective left without a static size
    there takes it from the same step traced on the data repeated endlessly,
    which keeps every shape. On full batches the steps send the same bytes.
    """
    data = args[0] if args else kwargs.pop("x", None)
    y = args[1] if len(args) > 1 else kwargs.pop("y", None)
    if isinstance(data, tf.data.Dataset):
        leading = tf.nest.flatten(data.element_spec)[0].shape
        batch_size = batch_size or (leading[0] if leading.rank else None)
        if batch_size is None:
            raise ValueError("The dataset's batch size is not static: pass batch_size= (the "
                             "global batch size) or batch it with drop_remainder=True.")
        elements = data.unbatch()
    elif data is None:
        raise ValueError("collective_traffic(model, ...) needs data: x and y as fit takes "
                         "them, or a batched tf.data.Dataset.")
    else:
        if batch_size is None:
            raise ValueError("collective_traffic(model, x, y) needs batch_size= (the global "
                             "batch size fit would use).")
        elements = tf.data.Dataset.from_tensor_slices(data if y is None else (data, y))
    strategy = model.distribute_strategy
    per_replica, remainder = divmod(int(batch_size), strategy.num_replicas_in_sync)
    if remainder or not per_replica:
        raise ValueError(
            f"A global batch of {batch_size} does not split evenly over "
            f"{strategy.num_replicas_in_sync} replicas: pass a multiple of the replica count.")
    _private.symbolic_build(model, elements.batch(int(batch_size)).element_spec)
    def traced(data):
        distributed = strategy.distribute_datasets_from_function(
            lambda _: data.batch(per_replica, drop_remainder=True))
        step = _private.train_step_function(model)  # a new trace history each time
        concrete = step.get_concrete_function(iter(distributed))
        return traced_ops.find_transfers(concrete.graph, concrete.captured_inputs)

    transfers = traced(elements)
    if any(t.elements is None and t.kind != "unknown" for t in transfers):
        transfers = traced_ops.with_sizes_from(transfers, traced(elements.repeat()))
    return transfers


def _report(transfers, workers, devices_per_worker, strategy) -> TrafficReport:
    devices = {}
    for t in transfers:
        for d in (t.device, t.destination):
            if d:
                devices.setdefault(traced_ops.device_key(d), d)
    local = sorted(devices)
    replicas = (len(strategy.extended.worker_devices) if strategy is not None
                else max(len(local), 1))
    largest = max([t.group_size or 1 for t in transfers] + [replicas])
    workers, devices_per_worker = _layout(workers, devices_per_worker, strategy, replicas,
                                          largest)
    worker_of = _worker_map(local, devices_per_worker)
    members = collections.defaultdict(set)
    for t in transfers:
        if t.kind != "copy" and t.group_key is not None and t.device:
            key = traced_ops.device_key(t.device)
            members[(t.op_type.startswith("Nccl"), t.group_key, worker_of[key])].add(key)
    ops = []
    for t in transfers:
        ops.append(_charge(t, worker_of, members, workers, devices_per_worker))
    return TrafficReport(ops=tuple(ops), replicas=replicas, workers=workers,
                         devices_per_worker=devices_per_worker)


def _layout(workers, devices_per_worker, strategy, replicas, largest):
    """(W, K). Without a layout given: the strategy's, else one worker holding
    the local replicas and as many such workers as the largest group needs."""
    for name, value in (("workers", workers), ("devices_per_worker", devices_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if workers is None and devices_per_worker is None and strategy is not None:
        return _private.worker_count(strategy), len(strategy.extended.worker_devices)
    if devices_per_worker is None:
        if workers is None or largest > replicas:
            devices_per_worker = replicas  # the graph holds one worker's replicas
        elif replicas % workers:
            raise ValueError(
                f"{replicas} local replicas do not split into {workers} workers of equal "
                "size: pass devices_per_worker too.")
        else:
            devices_per_worker = replicas // workers
    if workers is None:
        workers = -(-max(largest, replicas) // devices_per_worker)
    if workers * devices_per_worker < largest:
        raise ValueError(
            f"A collective of the step spans {largest} replicas, more than workers x "
            f"devices_per_worker = {workers} x {devices_per_worker}: pass the layout the "
            "step runs on.")
    if replicas > devices_per_worker and replicas % devices_per_worker:
        raise ValueError(
            f"{replicas} local replicas do not make whole workers of {devices_per_worker} "
            "devices: pass a devices_per_worker that divides them.")
    return workers, devices_per_worker


def _worker_map(local, devices_per_worker):
    """{device key: worker}: by task when the graph spans several, else by
    position among the local devices (a W x K model of one process)."""
    tasks = sorted({k[:3] for k in local})
    if len(tasks) > 1:
        return {k: tasks.index(k[:3]) for k in local}
    return {k: i // devices_per_worker for i, k in enumerate(local)}


def _charge(t, worker_of, members, workers, devices_per_worker) -> CollectiveTraffic:
    nbytes = None
    if t.elements is not None and t.dtype:
        nbytes = float(t.elements * tf.as_dtype(t.dtype).size)
    inside = across = None
    if nbytes is not None and t.kind == "copy":
        same = worker_of[traced_ops.device_key(t.device)] == worker_of[
            traced_ops.device_key(t.destination)]
        inside, across = (nbytes, 0.0) if same else (0.0, nbytes)
    elif nbytes is not None and t.group_size and t.kind != "unknown":
        local = None
        if t.device and t.group_key is not None:
            key = traced_ops.device_key(t.device)
            local = len(members[(t.op_type.startswith("Nccl"), t.group_key, worker_of[key])])
        if local is None or t.op_type in _ONE_OP_PER_GROUP:
            # The graph cannot tell (no key, or one op stands for the group):
            # the group fills whole workers.
            local = min(t.group_size, devices_per_worker)
        # Members the other workers cannot hold are on this one (a graph that
        # shows one replica's ops of a group of one worker).
        local = max(local, t.group_size - (workers - 1) * devices_per_worker)
        inside, across = sent_bytes(t.kind, nbytes, t.group_size, local)
        if t.op_type in _ONE_OP_PER_GROUP:
            inside, across = inside * t.group_size, across * t.group_size
    total = None if inside is None else inside + across
    return CollectiveTraffic(
        name=t.name, op_type=t.op_type, kind=t.kind, scope=name_scope(t.name), device=t.device,
        dtype=t.dtype, shape=t.shape, elements=t.elements, group_size=t.group_size,
        group_key=t.group_key, function=t.function,
        branch=" > ".join(str(b) for b in t.branches), loop=" > ".join(t.loops),
        bytes_sent=total, inside_bytes=inside, across_bytes=across,
        destination=t.destination, sized_by=t.sized_by, branches=t.branches)


def _step_total(items, pick, depth=0) -> tuple[float, ...]:
    """Sum of `items` ((branches, byte figures)), taking at every cond the
    branch `pick` chooses by its first figure (a branch without ops: zeros)."""
    width = len(items[0][1]) if items else 3
    total, nested = [0.0] * width, collections.OrderedDict()
    for branches, values in items:
        if len(branches) == depth:
            total = [t + v for t, v in zip(total, values)]
        else:
            nested.setdefault(branches[depth].cond, []).append((branches, values))
    for members in nested.values():
        count = members[0][0][depth].count
        by_label = collections.OrderedDict()
        for item in members:
            by_label.setdefault(item[0][depth].label, []).append(item)
        options = [_step_total(m, pick, depth + 1) for m in by_label.values()]
        options += [(0.0,) * width] * (count - len(options))
        chosen = pick(options, key=lambda v: v[0])
        total = [t + v for t, v in zip(total, chosen)]
    return tuple(total)


def _without_replica(text):
    return re.sub(r"replica_\d+/", "", text)


def _short(device):
    return re.sub(r"^/job:localhost/replica:0/task:0/", "", device)


def _fmt(nbytes) -> str:
    return f"{float(np.round(nbytes)):,.0f}"
