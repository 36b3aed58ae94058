"""The collective ops and device-to-device copies of a traced graph.

`find_transfers` walks a graph op by op and, at every op that runs a
function (a `tf.function` call, both branches of a `tf.cond` or
`tf.switch_case`, the body and condition of a `tf.while_loop`, and with them
`tf.recompute_grad` and custom gradients, whose bodies are such functions or
inlined), walks that function's body too, once per calling op: a collective
inside a function called twice counts twice. Each op found remembers the cond
branches and while loops around it, so that a reader can tell what runs at
every step from what runs only when a branch is taken (an accumulation
window's end) or once per loop iteration (Keras' `steps_per_execution`).

Two kinds of transfer are found:

* collective ops (`COLLECTIVE_KINDS`): their data tensor, dtype and group
  (size and key, read from constants, through function arguments when the
  constant lives in a caller);
* copies: a tensor made on one device and used by an op placed on another,
  which TensorFlow turns into a send and a receive. This is how
  `MirroredStrategy` reduces without collectives (`ReductionToOneDevice`,
  `HierarchicalCopyAllReduce`: sums on one device, then copies back) and how
  `ReplicaContext.all_gather` gathers under them. A tensor copied to a device
  counts once however many ops there use it. Edges into and out of collective
  ops, and edges where either op has no device, are not copies here.

Functions that only data pipelines run (the `f` of a `tf.data` map) are not
walked: they run per element, not per step.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf

from tf_zero import _private

# Op type -> what it does. A kind decides the bytes a replica sends
# (tf_zero.traffic.sent_bytes).
COLLECTIVE_KINDS = {
    "CollectiveReduce": "all_reduce",
    "CollectiveReduceV2": "all_reduce",
    "CollectiveReduceV3": "all_reduce",
    "NcclAllReduce": "all_reduce",
    "CollectiveGather": "all_gather",
    "CollectiveGatherV2": "all_gather",
    "CollectiveAllToAllV2": "all_to_all",
    "CollectiveAllToAllV3": "all_to_all",
    "CollectiveReduceScatterV2": "reduce_scatter",
    "CollectiveBcastSend": "broadcast",
    "CollectiveBcastSendV2": "broadcast",
    "CollectiveBcastRecv": "broadcast",
    "CollectiveBcastRecvV2": "broadcast",
    "NcclBroadcast": "broadcast",
    "NcclReduce": "reduce",
}
# Collective ops that move no tensor data (group set-up).
SETUP_OPS = ("CollectiveAssignGroupV2", "CollectiveInitializeCommunicator")
_V2_GROUP_INPUTS = {"CollectiveBcastRecvV2": (0, 1)}  # (group_size, group_key) positions
_CALLS = ("PartitionedCall", "StatefulPartitionedCall")
_CONDS = ("If", "StatelessIf")
_CASES = ("Case", "StatelessCase")
_LOOPS = ("While", "StatelessWhile")
_NO_SIZE = (tf.resource, tf.variant, tf.string)


@dataclasses.dataclass(frozen=True)
class Branch:
    """One branch of a cond (or case) around an op.

    Attributes:
        cond: the cond's op name, prefixed by the ops that called its
            function (unique within one trace).
        label: "then", "else", or "branch i" of a case.
        count: how many branches the cond has.
    """

    cond: str
    label: str
    count: int

    def __str__(self):
        return f"{self.cond.split('//')[-1]}:{self.label}"


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One collective op or device copy found in a traced graph."""

    name: str
    op_type: str
    kind: str  # a COLLECTIVE_KINDS value, "copy", or "unknown"
    device: str  # the sender's device for a copy
    dtype: str
    shape: tuple | None  # the tensor sent (for an all-gather: one replica's part)
    group_size: int | None
    group_key: object
    instance_key: int | None
    function: str  # the library function holding the op ("" at top level)
    branches: tuple[Branch, ...]
    loops: tuple[str, ...]
    destination: str = ""  # a copy's receiving device
    sized_by: str = "trace"  # or "full-batch trace": see with_sizes_from

    @property
    def elements(self) -> int | None:
        """Elements of the tensor sent; None where its shape is not static."""
        if self.shape is None or any(d is None for d in self.shape):
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n


def find_transfers(graph, captured=()) -> list[Transfer]:
    """Every collective op and device copy of `graph` and the functions it runs.

    Args:
        graph: a `tf.Graph` (the graph of a concrete function).
        captured: the values bound to the graph's trailing inputs (a concrete
            function's `captured_inputs`), to read constants through.

    Returns:
        The transfers in graph order, a called function's where it is called.
    """
    bindings = {}
    inputs = list(getattr(graph, "inputs", ()))
    for placeholder, value in zip(inputs[len(inputs) - len(captured):], captured):
        bindings[placeholder.name] = (value, {})
    found: list[Transfer] = []
    _walk(graph, bindings, _Context(graph), found)
    return found


@dataclasses.dataclass(frozen=True)
class _Context:
    root: object
    prefix: tuple[str, ...] = ()
    function: str = ""
    branches: tuple[Branch, ...] = ()
    loops: tuple[str, ...] = ()

    def key(self, op_name):
        return "//".join(self.prefix + (op_name,))

    def enter(self, op, function, branch=None, loop=None):
        return dataclasses.replace(
            self, prefix=self.prefix + (op.name,), function=function,
            branches=self.branches + ((branch,) if branch else ()),
            loops=self.loops + ((loop,) if loop else ()))


def _walk(graph, bindings, context, found, depth=0):
    """Appends the transfers of `graph` to `found`, then of each function
    an op runs, with its arguments bound to the op's inputs."""
    if depth > 64:
        raise RecursionError("functions nested more than 64 deep in the traced graph")
    copied = set()
    for op in graph.get_operations():
        if op.type in COLLECTIVE_KINDS:
            found.append(_collective(op, bindings, context))
        elif (op.type not in SETUP_OPS and ("Collective" in op.type or op.type.startswith("Nccl"))):
            found.append(_unknown(op, context))
        else:
            found.extend(_copies_into(op, context, copied))
        for function_name, inner_context, first_input in _called(op, context):
            body = _private.function_graph(graph, function_name, context.root)
            if body is None:
                raise ValueError(
                    f"The traced graph calls function {function_name} (from op {op.name}) "
                    "that no graph defines; trace the step in this process and pass its "
                    "concrete function.")
            inner_bindings = {}
            outer = list(op.inputs)[first_input:]
            if len(outer) == len(body.inputs):
                for placeholder, value in zip(body.inputs, outer):
                    inner_bindings[placeholder.name] = (value, bindings)
            _walk(body, inner_bindings, inner_context, found, depth + 1)


def _called(op, context):
    """(function name, context inside it, first input bound to its arguments)
    for each function `op` runs."""
    if op.type in _CALLS:
        name = op.get_attr("f").name
        return [(name, context.enter(op, name), 0)]
    if op.type in _CONDS:
        out = []
        for attr, label in (("then_branch", "then"), ("else_branch", "else")):
            name = op.get_attr(attr).name
            out.append((name, context.enter(op, name, Branch(context.key(op.name), label, 2)), 1))
        return out
    if op.type in _CASES:
        names = [f.name for f in op.get_attr("branches")]
        return [(name, context.enter(op, name, Branch(context.key(op.name), f"branch {i}",
                                                      len(names))), 1)
                for i, name in enumerate(names)]
    if op.type in _LOOPS:
        return [(op.get_attr(attr).name,
                 context.enter(op, op.get_attr(attr).name, loop=context.key(op.name)), 0)
                for attr in ("cond", "body")]
    if _private.defines_function(op.graph, op.type, context.root):
        # An op whose type is a library function's name calls that function.
        return [(op.type, context.enter(op, op.type), 0)]
    return []


def _static(tensor, bindings):
    """The constant value of `tensor`, followed through function arguments."""
    for _ in range(64):
        try:
            value = tf.get_static_value(tensor)
        except (TypeError, ValueError, tf.errors.OpError):
            value = None
        if value is not None:
            return value
        op = getattr(tensor, "op", None)  # an eager tensor (a captured value) has none
        if op is None or op.type != "Placeholder" or tensor.name not in bindings:
            return None
        tensor, bindings = bindings[tensor.name]
    return None


def _as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _shape(tensor):
    shape = tensor.shape
    return None if shape.rank is None else tuple(shape.as_list())


def _collective(op, bindings, context) -> Transfer:
    t = op.type
    data = op.outputs[0] if t.startswith("CollectiveBcastRecv") else op.inputs[0]
    group_size = group_key = instance_key = None
    if t in ("CollectiveReduce", "CollectiveGather", "CollectiveBcastSend", "CollectiveBcastRecv"):
        group_size, group_key = op.get_attr("group_size"), op.get_attr("group_key")
        instance_key = op.get_attr("instance_key")
    elif t.endswith("V2"):
        size_at, key_at = _V2_GROUP_INPUTS.get(t, (1, 2))
        group_size = _as_int(_static(op.inputs[size_at], bindings))
        group_key = _as_int(_static(op.inputs[key_at], bindings))
        instance_key = _as_int(_static(op.inputs[key_at + 1], bindings))
    elif t.endswith("V3"):
        assignment = op.inputs[2].shape
        if assignment.rank == 2 and assignment[1] is not None:
            group_size = int(assignment[1])
        communicator = op.inputs[1]
        while (getattr(communicator, "op", None) is not None
               and communicator.op.type == "Placeholder" and communicator.name in bindings):
            communicator, bindings = bindings[communicator.name]
        if (getattr(communicator, "op", None) is not None
                and communicator.op.type == "CollectiveInitializeCommunicator"):
            group_key = _as_int(_static(communicator.op.inputs[0], bindings))
            if group_size is None:
                group_size = _as_int(_static(communicator.op.inputs[2], bindings))
    elif t == "NcclAllReduce":
        group_size = op.get_attr("num_devices")
        group_key = tf.compat.as_str(op.get_attr("shared_name"))
    elif t == "NcclReduce":
        group_size = op.get_attr("num_devices")
    elif t == "NcclBroadcast":
        receivers = {c.device for out in op.outputs for c in out.consumers()
                     if c.device and c.device != op.device}
        group_size = 1 + len(receivers)
    return Transfer(
        name=op.name, op_type=t, kind=COLLECTIVE_KINDS[t], device=op.device,
        dtype=data.dtype.name, shape=_shape(data), group_size=group_size, group_key=group_key,
        instance_key=instance_key, function=context.function, branches=context.branches,
        loops=context.loops)


def _unknown(op, context) -> Transfer:
    data = op.inputs[0] if op.inputs else (op.outputs[0] if op.outputs else None)
    return Transfer(
        name=op.name, op_type=op.type, kind="unknown", device=op.device,
        dtype=data.dtype.name if data is not None else "", shape=None, group_size=None,
        group_key=None, instance_key=None, function=context.function,
        branches=context.branches, loops=context.loops)


def _is_collective(op):
    return op.type in COLLECTIVE_KINDS or op.type in SETUP_OPS


def _copies_into(op, context, copied) -> list[Transfer]:
    """The tensors `op` receives from ops placed on another device."""
    if not op.device or _is_collective(op):
        return []
    out = []
    destination = _canonical(op.device)
    for tensor in op.inputs:
        producer = tensor.op
        if (not producer.device or _is_collective(producer) or tensor.dtype in _NO_SIZE
                or _canonical(producer.device) == destination):
            continue
        key = (tensor.name, destination)
        if key in copied:
            continue
        copied.add(key)
        out.append(Transfer(
            name=op.name, op_type=op.type, kind="copy", device=producer.device,
            dtype=tensor.dtype.name, shape=_shape(tensor), group_size=2, group_key=None,
            instance_key=None, function=context.function, branches=context.branches,
            loops=context.loops, destination=op.device))
    return out


@functools.lru_cache(maxsize=4096)
def _canonical(device: str):
    """A device name's parts, with TensorFlow's defaults filled in."""
    spec = tf.DeviceSpec.from_string(device)
    return (spec.job or "localhost", spec.replica or 0, spec.task or 0,
            (spec.device_type or "CPU").upper(), spec.device_index or 0)


def device_key(device: str):
    """Sort key and identity of a device name (partial names completed)."""
    return _canonical(device) if device else ("", 0, 0, "", 0)


def with_sizes_from(transfers, sized) -> list[Transfer]:
    """`transfers`, each without a static size given the shape of the op of
    the same name, device and type in `sized` (the same step traced again
    where that shape is static), marked `sized_by="full-batch trace"`."""
    shapes = {}
    for t in sized:
        key = (t.name, t.device, t.op_type, t.function != "")
        shapes[key] = None if key in shapes else t.shape  # ambiguous: no size
    out = []
    for t in transfers:
        shape = shapes.get((t.name, t.device, t.op_type, t.function != ""))
        if t.elements is None and shape is not None and None not in shape:
            t = dataclasses.replace(t, shape=shape, sized_by="full-batch trace")
        out.append(t)
    return out
