"""The shard plans: pure functions from variable shapes to flat buckets.

Every replica computes the same plan from the same inputs, with no TensorFlow
state involved. In every plan a bucket is a flat run of one dtype split into
equal contiguous shards, shard `r` of every bucket belonging to replica `r`,
so one reduce-scatter gives each replica its shard's summed gradient and one
all-gather publishes every shard. Padding never reaches a variable. Two kinds:

* `plan_shards`, the element split: variables are laid end to end, in the
  order given, into buckets of at most `bucket_size_bytes`; a large variable
  spills over into the next bucket unless it is planned `alone` (as
  `build_shards` plans every variable that `fills_a_bucket`); each bucket is
  zero-padded to a multiple of the shard count. Every replica owns 1/N of every variable.
* `plan_owners`, the whole-variable partition: every variable is owned whole
  by one replica, chosen by a balanced deterministic rule (largest first onto
  the least-loaded replica); each replica's variables lie end to end in its
  shards of consecutive buckets, padded to the busiest replica's length. The
  padding is the price of imbalance: `ShardPlan.imbalance` reports it.
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


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where every element of every variable lives, for `num_shards` shards."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    num_shards: int
    buckets: tuple[Bucket, ...]
    partition: str = "element"
    """"element" (`plan_shards`) or "whole" (`plan_owners`)."""
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
            ValueError: the plan splits variables (`partition == "element"`).
        """
        if self.partition != "whole" or self.is_split(variable):
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
        if not self.costs or self.partition != "whole":
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
    shapes, dtypes = _validated(shapes, dtypes, num_shards, bucket_size_bytes)
    alone = tuple(bool(a) for a in alone) if alone is not None else (False,) * len(shapes)
    if len(alone) != len(shapes):
        raise ValueError(f"got {len(shapes)} shapes but {len(alone)} `alone` flags")

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
            itemsize = _itemsize(dtype)
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


def fills_a_bucket(shape: Sequence[int], dtype: str, bucket_size_bytes: int) -> bool:
    """Whether a variable is at least a bucket large.

    Such a variable is best planned `alone` (a bucket of its own, as
    `build_shards` does at stages 1-2): its local gradient is then the
    bucket as it is, and the all-gather's output is the new weight, which
    the weight's assignment adopts as its buffer (when the size is not a
    multiple of the shard count, the output also holds the padding, and the
    weight is a copy of its slice). Spread over several buckets, the same
    variable costs a copy into the buckets' layout on the way in and a
    concatenation of the gathered pieces on the way out (about 8 % of the
    27M MLP's stage-2 step, `docs/benchmarks.md`).
    """
    size = int(np.prod(tuple(int(d) for d in shape), dtype=np.int64))
    return size * _itemsize(dtype) >= bucket_size_bytes


def plan_owners(shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
                num_shards: int, bucket_size_bytes: int,
                costs: Sequence[int] | None = None,
                split: Sequence[bool] | None = None) -> ShardPlan:
    """Gives every variable whole to one replica, balanced, in flat buckets.

    Owners first: within each dtype, variables are taken largest first (ties:
    lower index first), each going to the replica with the fewest elements of
    that dtype so far, then the fewest bytes in all, then the lowest rank.
    Then the buckets: each replica's variables, in index order, form one
    stream; bucket `j` holds elements `[j * S, (j + 1) * S)` of every stream in
    its shards (`S` = `bucket_size_bytes / N`, the last bucket shorter), so a
    large variable may span buckets, always within its owner's shards. The
    padding is what the shorter streams lack: the price of imbalance, paid
    once (`ShardPlan.imbalance`), not once per bucket.

    With `costs` (each variable's optimizer-state bytes, which need not follow
    its size: Adafactor keeps a row and a column per matrix, Muon two moments
    for some variables and one for others), both loads are balanced at once:
    variables go largest first by their larger share (of the dtype's elements
    or of all the state), each to the replica whose larger share grows least.

    With `split`, the flagged variables (those their optimizer updates element
    by element, like the embeddings and vectors Muon leaves to its AdamW) are
    not owned whole: after the owned ones are placed, they are poured, in
    index order, into the least-loaded replicas' streams until the loads are
    level, so each replica holds one contiguous run of some of them. They
    lift the floor that a large variable puts under a whole partition.

    Args:
        shapes, dtypes, num_shards, bucket_size_bytes: as for `plan_shards`.
        costs: optional optimizer-state bytes per variable.
        split: optional flag per variable: True spreads it across replicas.

    Returns:
        A `ShardPlan` with `partition == "whole"`; `plan.owner(i)` is the
        replica that owns variable `i` (`plan.run(i, rank)`: the part of a
        split variable that replica `rank` holds).

    Raises:
        ValueError: as for `plan_shards`, or invalid `costs` or `split`.

    Example:
        >>> plan = plan_owners([(4, 4), (4, 4), (3,)], ["float32"] * 3, 2, 1 << 20)
        >>> [plan.owner(i) for i in range(3)], plan.buckets[0].shard_size
        ([0, 1, 0], 19)
    """
    shapes, dtypes = _validated(shapes, dtypes, num_shards, bucket_size_bytes)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    split = tuple(bool(f) for f in split) if split is not None else (False,) * len(shapes)
    if len(split) != len(shapes):
        raise ValueError(f"got {len(shapes)} shapes but {len(split)} `split` flags")
    total_bytes = [0] * num_shards
    if costs is not None:
        costs = [int(c) for c in costs]
        if len(costs) != len(shapes) or any(c < 0 for c in costs):
            raise ValueError(f"costs must be {len(shapes)} non-negative byte counts, "
                             f"got {costs!r}")
        state_total = max(sum(costs), 1)
        state = [0] * num_shards
    buckets: list[Bucket] = []
    for dtype in dict.fromkeys(dtypes):
        itemsize = _itemsize(dtype)
        load = [0] * num_shards
        # Each replica's stream: runs (variable, start, size), whole or split.
        runs: list[list[tuple[int, int, int]]] = [[] for _ in range(num_shards)]
        members = [i for i, d in enumerate(dtypes) if d == dtype and not split[i]]
        if costs is None:
            for i in sorted(members, key=lambda i: (-sizes[i], i)):
                rank = min(range(num_shards), key=lambda r: (load[r], total_bytes[r], r))
                runs[rank].append((i, 0, sizes[i]))
                load[rank] += sizes[i]
                total_bytes[rank] += sizes[i] * itemsize
        else:
            elements = max(sum(sizes[i] for i, d in enumerate(dtypes) if d == dtype), 1)
            share = [(sizes[i] / elements, costs[i] / state_total) for i in range(len(sizes))]

            def after(r, i):  # replica r's larger share with variable i added
                return max(load[r] / elements + share[i][0], state[r] / state_total + share[i][1])

            for i in sorted(members, key=lambda i: (-max(share[i]), i)):
                rank = min(range(num_shards), key=lambda r: (
                    after(r, i), max(load[r] / elements, state[r] / state_total), r))
                runs[rank].append((i, 0, sizes[i]))
                load[rank] += sizes[i]
                state[rank] += costs[i]
        poured = [i for i, d in enumerate(dtypes) if d == dtype and split[i] and sizes[i]]
        amounts = _level(load, sum(sizes[i] for i in poured))
        queue = [(i, 0) for i in poured]
        for rank in range(num_shards):
            want = amounts[rank]
            while want:
                i, start = queue[0]
                take = min(want, sizes[i] - start)
                runs[rank].append((i, start, take))
                if costs is not None:
                    state[rank] += costs[i] * take // max(sizes[i], 1)
                want -= take
                queue[0] = (i, start + take)
                if start + take == sizes[i]:
                    queue.pop(0)
            load[rank] += amounts[rank]
        stream_size = max(bucket_size_bytes // itemsize // num_shards, 1)
        longest = max(load)
        for lo in range(0, longest, stream_size):
            shard_size = min(stream_size, longest - lo)
            hi = lo + shard_size
            segments = []
            for rank in range(num_shards):
                position = 0
                for i, start, size in sorted(runs[rank]):
                    a, b = max(lo, position), min(hi, position + size)
                    if a < b:
                        segments.append(Segment(i, start + a - position, b - a,
                                                rank * shard_size + a - lo))
                    position += size
            buckets.append(Bucket(len(buckets), dtype, tuple(segments),
                                  sum(seg.size for seg in segments), num_shards,
                                  whole_shard_size=shard_size))
    return ShardPlan(shapes, dtypes, num_shards, tuple(buckets), partition="whole",
                     costs=tuple(costs or ()), split=split)


def _level(load: list[int], total: int) -> list[int]:
    """Amounts that raise the lowest loads first until `total` is poured
    (the loads then differ by at most one where anything was added)."""
    order = sorted(range(len(load)), key=lambda r: (load[r], r))
    low = [load[r] for r in order]
    k = 1
    while k < len(low) and sum(low[k] - x for x in low[:k]) < total:
        k += 1
    base, extra = divmod(total + sum(low[:k]), k)
    amounts = [0] * len(load)
    for j in range(k):
        amounts[order[j]] = base + (1 if j < extra else 0) - low[j]
    return amounts
