"""The shard plan: a pure function from variable shapes to flat buckets.

Every replica computes the same plan from the same inputs, with no TensorFlow
state involved. Variables are laid end to end, in the order given, into flat
buckets of one dtype and at most `bucket_size_bytes` each; a large variable
spills over into the next bucket. Each bucket is padded with zeros to a
multiple of the shard count and split into equal contiguous shards: shard `r`
of every bucket belongs to replica `r`. Padding never reaches a variable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of `size` elements of one variable placed inside a bucket.

    Attributes:
        variable: index of the variable in the plan's variable list.
        start: offset of the run inside the flattened variable.
        size: number of elements.
        offset: where the run begins, in bucket coordinates (or, for the
            pieces returned by `Bucket.shard_pieces`, in shard coordinates).
    """

    variable: int
    start: int
    size: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One flat bucket: segments of variables, then zero padding."""

    index: int
    dtype: str
    segments: tuple[Segment, ...]
    size: int
    num_shards: int

    @property
    def shard_size(self) -> int:
        return math.ceil(self.size / self.num_shards) if self.size else 0

    @property
    def padded_size(self) -> int:
        return self.shard_size * self.num_shards

    @property
    def padding(self) -> int:
        return self.padded_size - self.size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of shard `rank` in bucket coordinates."""
        _check_rank(rank, self.num_shards)
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def shard_pieces(self, rank: int) -> tuple[Segment, ...]:
        """The variable runs inside shard `rank`, offsets relative to the shard.

        Elements of the shard not covered by a piece are padding.
        """
        lo, hi = self.shard_range(rank)
        pieces = []
        for seg in self.segments:
            a, b = max(lo, seg.offset), min(hi, seg.offset + seg.size)
            if a < b:
                pieces.append(Segment(seg.variable, seg.start + a - seg.offset,
                                      b - a, a - lo))
        return tuple(pieces)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where every element of every variable lives, for `num_shards` shards."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    num_shards: int
    buckets: tuple[Bucket, ...]

    @property
    def num_variables(self) -> int:
        return len(self.shapes)

    def variable_size(self, variable: int) -> int:
        return int(np.prod(self.shapes[variable], dtype=np.int64))

    def variable_segments(self, variable: int) -> tuple[tuple[int, Segment], ...]:
        """(bucket index, segment) pairs that hold `variable`, in order."""
        return tuple((b.index, s) for b in self.buckets for s in b.segments
                     if s.variable == variable)

    def owner_of(self, variable: int, element: int) -> int:
        """The shard (replica rank) that owns one element of a variable."""
        if not 0 <= element < self.variable_size(variable):
            raise IndexError(
                f"element {element} is outside variable {variable} of shape "
                f"{self.shapes[variable]}")
        for b, seg in self.variable_segments(variable):
            if seg.start <= element < seg.start + seg.size:
                bucket = self.buckets[b]
                return (seg.offset + element - seg.start) // bucket.shard_size
        raise AssertionError("unreachable: every element has a segment")

    def shard_elements(self, rank: int) -> int:
        """Elements (padding included) that shard `rank` holds in all buckets."""
        _check_rank(rank, self.num_shards)
        return sum(b.shard_size for b in self.buckets)

    @property
    def total_elements(self) -> int:
        return sum(b.size for b in self.buckets)


def _check_rank(rank, num_shards):
    if not 0 <= rank < num_shards:
        raise IndexError(f"rank {rank} is outside [0, {num_shards})")


def plan_shards(shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
                num_shards: int, bucket_size_bytes: int,
                alone: Sequence[bool] | None = None) -> ShardPlan:
    """Lays variables into flat, padded buckets split into `num_shards` shards.

    Args:
        shapes: one shape per variable.
        dtypes: one dtype name per variable (a bucket holds a single dtype).
        num_shards: number of replicas sharing the state.
        bucket_size_bytes: upper bound on a bucket's unpadded byte size (a
            bucket always holds at least `num_shards` elements).
        alone: optional flag per variable: True gives the variable a bucket
            of its own, whatever its size (a stage-3 sharded weight, whose
            storage is exactly that bucket's shards).

    Returns:
        The `ShardPlan`; identical on every replica for identical inputs.

    Raises:
        ValueError: inconsistent lengths, a non-positive shard count or bucket
            size, or a negative dimension.

    Example:
        >>> plan = plan_shards([(3, 2), (5,)], ["float32"] * 2, 4, 1024)
        >>> [(b.size, b.shard_size, b.padding) for b in plan.buckets]
        [(11, 3, 1)]
    """
    if len(shapes) != len(dtypes):
        raise ValueError(f"got {len(shapes)} shapes but {len(dtypes)} dtypes")
    alone = tuple(bool(a) for a in alone) if alone is not None else (False,) * len(shapes)
    if len(alone) != len(shapes):
        raise ValueError(f"got {len(shapes)} shapes but {len(alone)} `alone` flags")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if bucket_size_bytes < 1:
        raise ValueError(
            f"bucket_size_bytes must be positive, got {bucket_size_bytes!r}")
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    for shape in shapes:
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
    dtypes = tuple(str(np.dtype(d).name) if d != "bfloat16" else "bfloat16"
                   for d in dtypes)

    buckets: list[Bucket] = []
    current: list[Segment] = []
    current_dtype = None
    filled = 0
    capacity = 0

    def close():
        nonlocal current, filled
        if current:
            buckets.append(Bucket(len(buckets), current_dtype, tuple(current),
                                  filled, num_shards))
        current, filled = [], 0

    for index, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        size = int(np.prod(shape, dtype=np.int64))
        if alone[index]:
            close()
            current_dtype = dtype
            current.append(Segment(index, 0, size, 0))
            filled = size
            close()
            current_dtype = None
            continue
        if dtype != current_dtype:
            close()
            current_dtype = dtype
            itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            capacity = max(bucket_size_bytes // itemsize, num_shards)
        start = 0
        while start < size:
            if filled == capacity:
                close()
            take = min(size - start, capacity - filled)
            current.append(Segment(index, start, take, filled))
            filled += take
            start += take
    close()
    return ShardPlan(shapes, dtypes, num_shards, tuple(buckets))
