"""The records of a shard plan: `Segment`, `Bucket`, `ShardPlan`.

A bucket is a flat run of one dtype split into equal contiguous shards,
shard `r` of every bucket belonging to replica `r`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tf_zero.config import Partition


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
    whole_shard_size: int = 0
    """Set by `plan_owners`: the shard size (the largest replica's load)."""

    @property
    def shard_size(self) -> int:
        if self.whole_shard_size:
            return self.whole_shard_size
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

    def shard_mask(self, rank: int, predicate) -> np.ndarray:
        """A boolean mask over shard `rank`: True on the pieces `predicate` selects."""
        mask = np.zeros([self.shard_size], dtype=bool)
        for p in self.shard_pieces(rank):
            if predicate(p):
                mask[p.offset:p.offset + p.size] = True
        return mask


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where every element of every variable lives, for `num_shards` shards."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    num_shards: int
    buckets: tuple[Bucket, ...]
    partition: Partition = Partition.ELEMENT
    """`Partition.ELEMENT` (`plan_shards`) or `Partition.WHOLE` (`plan_owners`)."""
    costs: tuple[int, ...] = ()
    """`plan_owners` with costs: each variable's optimizer-state bytes."""
    split: tuple[bool, ...] = ()
    """`plan_owners` with split: the variables spread across replicas."""

    def is_split(self, variable: int) -> bool:
        return bool(self.split) and self.split[variable]

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

    def owner(self, variable: int) -> int:
        """The replica that owns a whole variable (whole-variable plans).

        Raises:
            ValueError: the plan splits variables (`Partition.ELEMENT`).
        """
        if self.partition != Partition.WHOLE or self.is_split(variable):
            raise ValueError("owner() is for variables owned whole; an element split "
                             "has an owner per element (owner_of, run).")
        segments = self.variable_segments(variable)
        if not segments:
            return 0  # an empty variable: nothing to own
        b, seg = segments[0]
        return seg.offset // self.buckets[b].shard_size

    def run(self, variable: int, rank: int) -> tuple[int, int]:
        """(start, size): the elements of `variable` in replica `rank`'s shards.

        Whole-variable plans keep each variable's part on a replica
        contiguous; size 0 where the replica holds none of it.
        """
        parts = []
        for b, seg in self.variable_segments(variable):
            if seg.offset // self.buckets[b].shard_size == rank:
                parts.append(seg)
        if not parts:
            return 0, 0
        start = min(p.start for p in parts)
        return start, sum(p.size for p in parts)

    def replica_bytes(self, rank: int) -> int:
        """Bytes of variable elements (no padding) in shard `rank` of all buckets."""
        _check_rank(rank, self.num_shards)
        return sum(p.size * _itemsize(b.dtype) for b in self.buckets
                   for p in b.shard_pieces(rank))

    @property
    def imbalance(self) -> float:
        """Busiest replica's bytes / ideal (total / N); 1.0 is perfect balance."""
        total = sum(self.replica_bytes(r) for r in range(self.num_shards))
        if not total:
            return 1.0
        return max(self.replica_bytes(r) for r in range(self.num_shards)) * (
            self.num_shards / total)


    @property
    def state_imbalance(self) -> float:
        """Busiest replica's optimizer-state bytes / ideal (plans with `costs`;
        else the same as `imbalance`)."""
        if not self.costs or self.partition != Partition.WHOLE:
            return self.imbalance
        per = [0] * self.num_shards
        for i, cost in enumerate(self.costs):
            size = max(self.variable_size(i), 1)
            for rank in range(self.num_shards):
                per[rank] += cost * self.run(i, rank)[1] // size
        total = sum(per)
        return max(per) * self.num_shards / total if total else 1.0


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _check_rank(rank, num_shards):
    if not 0 <= rank < num_shards:
        raise IndexError(f"rank {rank} is outside [0, {num_shards})")


def _validated(shapes, dtypes, num_shards, bucket_size_bytes):
    if len(shapes) != len(dtypes):
        raise ValueError(f"got {len(shapes)} shapes but {len(dtypes)} dtypes")
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
    return shapes, dtypes
