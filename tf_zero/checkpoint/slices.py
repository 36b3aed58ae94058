"""Checkpoint slices: a flat run of a tensor as TensorFlow checkpoint slices.

A TensorFlow checkpoint can store one tensor as several slices, each a
hyper-rectangle of the full tensor (`SaveV2`'s `shape_and_slices`), and its
reader assembles any requested slice from whichever stored slices overlap it.
A replica's shard holds contiguous runs of flattened variables, and a run of
a multi-dimensional tensor is in general not one rectangle: `flat_slices`
splits it into rectangles, in flattened order. `local_slices` and
`write_slices` read and write a replica's runs as such slices, in place.
See docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading

import tensorflow as tf

from tf_zero import _private


@dataclasses.dataclass(frozen=True)
class Slice:
    """One rectangle of a tensor of shape `shape`, holding the flat elements
    `[flat_start, flat_start + size)` in row-major order.

    Attributes:
        shape: the full tensor's shape.
        begin: the rectangle's first index along each dimension.
        extent: its length along each dimension.
        flat_start: where its elements begin in the flattened tensor.
    """

    shape: tuple[int, ...]
    begin: tuple[int, ...]
    extent: tuple[int, ...]
    flat_start: int

    @property
    def size(self) -> int:
        return math.prod(self.extent)

    @property
    def is_full(self) -> bool:
        return self.extent == self.shape

    @property
    def spec(self) -> str:
        """The `shape_and_slices` string ("" for the full tensor)."""
        if self.is_full:
            return ""
        dims = " ".join(str(d) for d in self.shape)
        ranges = ":".join(
            "-" if (b == 0 and e == d) else f"{b},{e}"
            for b, e, d in zip(self.begin, self.extent, self.shape))
        return f"{dims} {ranges}"


def flat_slices(shape, start: int, stop: int) -> list[Slice]:
    """Rectangles covering flat elements `[start, stop)` of a tensor of `shape`,
    in flattened order, at most 2 per dimension beyond the first plus one.

    Raises:
        ValueError: the run is empty or outside the tensor.
    """
    shape = tuple(int(d) for d in shape)
    total = math.prod(shape)
    if not 0 <= start < stop <= total:
        raise ValueError(f"flat run [{start}, {stop}) is empty or outside a tensor "
                         f"of shape {shape} ({total} elements)")
    if not shape:
        return [Slice((), (), (), 0)]
    return [Slice(shape, begin, extent, flat)
            for begin, extent, flat in _rectangles(shape, start, stop)]


def _rectangles(shape, start, stop):
    """(begin, extent, flat_start) of the rectangles of `[start, stop)`."""
    if len(shape) == 1:
        return [((start,), (stop - start,), start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    out = []
    if first == last:
        for begin, extent, _ in _rectangles(shape[1:], start - first * inner,
                                            stop - first * inner):
            out.append(((first, *begin), (1, *extent), start))
            start += math.prod(extent)
        return out
    if start % inner:
        for begin, extent, _ in _rectangles(shape[1:], start % inner, inner):
            out.append(((first, *begin), (1, *extent), start))
            start += math.prod(extent)
        first += 1
    whole_end = stop // inner
    if whole_end > first:
        out.append(((first,) + (0,) * (len(shape) - 1),
                    (whole_end - first, *shape[1:]), first * inner))
    if stop % inner:
        flat = whole_end * inner
        for begin, extent, _ in _rectangles(shape[1:], 0, stop % inner):
            out.append(((whole_end, *begin), (1, *extent), flat))
            flat += math.prod(extent)
    return out


_state = threading.local()


def deferred() -> bool:
    """True while `tf_zero.checkpoint.Checkpoint` saves or restores the slices
    itself: TensorFlow's saver then records sliced entries without data."""
    return getattr(_state, "deferred", False)


@contextlib.contextmanager
def deferring():
    """Sliced state gives TensorFlow's saver no slices (`deferred()`)."""
    previous = deferred()
    _state.deferred = True
    try:
        yield
    finally:
        _state.deferred = previous


def spec_size(spec: str, shape) -> int:
    """Number of elements of the slice `spec` ("" is the whole tensor) of `shape`."""
    if not spec:
        return math.prod(int(d) for d in shape)
    ranges = spec.split(" ")[-1].split(":")
    return math.prod(int(d) if r == "-" else int(r.split(",")[1])
                     for r, d in zip(ranges, shape))


def parse_spec(spec: str, shape) -> tuple[int, int]:
    """(flat start, elements) of the rectangle `spec` of a tensor of `shape`,
    a slice `flat_slices` made: its elements are one flat run."""
    shape = tuple(int(d) for d in shape)
    if not spec:
        return 0, math.prod(shape)
    begin = [0 if r == "-" else int(r.split(",")[0]) for r in spec.split(" ")[-1].split(":")]
    start = 0
    for b, d in zip(begin, shape):
        start = start * d + b
    return start, spec_size(spec, shape)


def split_run(start: int, stop: int, max_elements: int | None):
    """`[start, stop)` in consecutive runs of at most `max_elements` (all of it if None)."""
    step = max(1, int(max_elements)) if max_elements else stop - start
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


# ---- a replica's runs, read and written as slices ----------------------------


def local_slices(runs, shape, max_elements=None) -> list:
    """(spec, read, dtype, device) of every checkpoint slice of `runs`
    ([(component, first element, elements, offset in the component)])."""
    out = []
    for comp, start, size, offset in runs:
        for a, b in split_run(start, start + size, max_elements):
            for s in flat_slices(shape, a, b):
                out.append((s.spec, functools.partial(read_slice, comp, offset + s.flat_start - start, s),
                            comp.dtype, comp.device))
    return out


def write_slices(runs, shape, restored: dict) -> None:
    """Writes restored slices ({spec: tensor}; "" for the whole tensor) into the
    parts of `runs` they cover, each straight into its place: no joined copy.
    A slice is written into every run that holds it (under hybrid sharding
    each shard group holds the same pieces)."""
    for spec, value in restored.items():
        if not spec:
            flat = tf.reshape(value, [-1])
            for comp, start, size, offset in runs:
                write_run(comp, offset, flat[start:start + size])
            continue
        first, count = parse_spec(spec, shape)
        holders = [(comp, start, offset) for comp, start, size, offset in runs
                   if start <= first and first + count <= start + size]
        if not holders:
            raise ValueError(f"checkpoint slice {spec!r} is not within this worker's pieces")
        for comp, start, offset in holders:
            write_run(comp, offset + first - start, value)


class _Assembly:
    """Components a restore writes in several parts, assembled on the host.

    Each is copied to a NumPy buffer at its first part, the parts written
    into it, and once every element the restore writes has arrived, the
    buffer replaces the component's value whole (`write_run` says why). A
    restore writes the pieces variable by variable, so the components being
    assembled at a time are those of a bucket or two: about a chunk.
    """

    def __init__(self, runs_lists):
        self.remaining = {}
        for runs in runs_lists:
            for comp, _, size, _ in runs:
                self.remaining[id(comp)] = self.remaining.get(id(comp), 0) + size
        self.buffers = {}  # id -> (component, NumPy buffer, [(offset, size)])

    def takes(self, component) -> bool:
        return id(component) in self.remaining

    def write(self, component, offset, value) -> None:
        key = id(component)
        if key not in self.buffers:
            self.buffers[key] = (component, component.numpy().reshape([-1]), [])
        _, buffer, written = self.buffers[key]
        size = int(value.shape[0])
        buffer[offset:offset + size] = tf.cast(value, component.dtype).numpy()
        written.append((offset, size))
        self.remaining[key] -= size
        if self.remaining[key] == 0:
            del self.buffers[key]
            _private.replace_buffer(component, lambda: _allocated_copy(buffer, component))

    def finish(self) -> None:
        """Writes what arrived of components the restore left incomplete, in place."""
        buffers, self.buffers = self.buffers, {}
        for component, buffer, written in buffers.values():
            for offset, size in written:
                _write_in_place(component, offset, tf.constant(buffer[offset:offset + size]))


def _allocated_copy(buffer, component) -> tf.Tensor:
    """NumPy `buffer` as a tensor of `component`'s shape on its device, in
    TensorFlow's allocator (which the released buffer went back to)."""
    aligned = _private.host_copy(buffer, buffer.size)  # DeepCopy needs the alignment
    with tf.device(component.device):
        return tf.raw_ops.DeepCopy(x=tf.reshape(aligned, component.shape))


@contextlib.contextmanager
def assembling(runs_lists):
    """While a restore writes `runs_lists` (each object's `local_runs()`):
    components written in parts are assembled and written whole."""
    previous = getattr(_state, "assembly", None)
    _state.assembly = assembly = _Assembly(runs_lists)
    try:
        yield
        assembly.finish()
    finally:
        _state.assembly = previous


def write_run(component, offset, value) -> None:
    """Writes `value`, flattened, into `component[offset:]`.

    A value that is the whole component replaces its buffer (released
    first, then a copy of the value adopted): a partial write
    (`ResourceStridedSliceAssign`) would switch the variable to
    TensorFlow's copy-on-read mode for good, in which every later read,
    each training step's, copies it. Inside `assembling` a part joins the
    component's assembly; elsewhere it is written in place.
    (`component[a:b].assign(...)` reads the variable first, and the read
    keeps its buffer shared: TensorFlow then copies the whole variable to
    write.)
    """
    value = tf.reshape(value, [-1])
    if offset == 0 and value.shape[0] == tf.TensorShape(component.shape).num_elements():
        def own_copy():
            with tf.device(component.device):
                whole = tf.reshape(value, component.shape)
                if whole.dtype != component.dtype:
                    return tf.cast(whole, component.dtype)
                return tf.raw_ops.DeepCopy(x=whole)  # not a view of a larger restored tensor
        _private.replace_buffer(component, own_copy)
        return
    assembly = getattr(_state, "assembly", None)
    if assembly is not None and assembly.takes(component):
        assembly.write(component, offset, value)
        return
    _write_in_place(component, offset, value)


def _write_in_place(component, offset, value) -> None:
    with tf.device(component.device):
        tf.raw_ops.ResourceStridedSliceAssign(
            ref=component.handle, begin=[offset], end=[offset + int(value.shape[0])],
            strides=[1], value=tf.cast(value, component.dtype))


def read_slice(component, offset, piece_slice):
    """One checkpoint slice, read from a replica's shard without a copy."""
    return slice_of(component.read_value(), component.device, offset, piece_slice)


def slice_of(value, device, offset, piece_slice):
    """`read_slice` of a value read earlier (a background save's snapshot)."""
    with tf.device(device):
        flat = tf.reshape(value, [-1])[offset:offset + piece_slice.size]
        return tf.reshape(flat, piece_slice.extent)
