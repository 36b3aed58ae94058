"""The whole-variable partition's plan: every variable owned whole by one
replica (or poured in runs), balanced. See docs/whole-variable.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tf_zero.config import Partition
from tf_zero.plan.layout import Bucket, Segment, ShardPlan, _itemsize, _validated


def plan_owners(shapes: Sequence[Sequence[int]], dtypes: Sequence[str],
                num_shards: int, bucket_size_bytes: int,
                costs: Sequence[int] | None = None,
                split: Sequence[bool] | None = None) -> ShardPlan:
    """Gives every variable whole to one replica, balanced, in flat buckets.

    Per dtype, in three phases: the whole variables are placed on owners
    (`_assign_owners`), the split ones poured in runs into the least-loaded
    replicas (`_pour_split`), and every replica's stream cut into the same
    buckets' shards (`_cut_buckets`). The padding is what the shorter streams
    lack: the price of imbalance, paid once (`ShardPlan.imbalance`), not once
    per bucket. With `costs` (each variable's optimizer-state bytes, which
    need not follow its size: Adafactor keeps a row and a column per matrix)
    elements and state are balanced at once. With `split`, the flagged
    variables (updated element by element, like the vectors Muon leaves to
    its AdamW) lift the floor a large variable puts under a whole partition.

    Args:
        shapes, dtypes, num_shards, bucket_size_bytes: as for `plan_shards`.
        costs: optional optimizer-state bytes per variable.
        split: optional flag per variable: True spreads it across replicas.

    Returns:
        A `ShardPlan` with `partition == Partition.WHOLE`; `plan.owner(i)` is the
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
    if costs is not None:
        costs = [int(c) for c in costs]
        if len(costs) != len(shapes) or any(c < 0 for c in costs):
            raise ValueError(f"costs must be {len(shapes)} non-negative byte counts, "
                             f"got {costs!r}")
    loads = _Loads(num_shards, costs)
    buckets: list[Bucket] = []
    for dtype in dict.fromkeys(dtypes):
        # Each replica's stream: runs (variable, start, size), whole or split.
        streams = _assign_owners(sizes, dtypes, dtype, split, loads)
        _pour_split(sizes, dtypes, dtype, split, loads, streams)
        buckets += _cut_buckets(streams, loads.elements, dtype, len(buckets),
                                max(bucket_size_bytes // _itemsize(dtype) // num_shards, 1))
    return ShardPlan(shapes, dtypes, num_shards, tuple(buckets), partition=Partition.WHOLE,
                     costs=tuple(costs or ()), split=split)


class _Loads:
    """What each replica holds so far while `plan_owners` places variables:
    elements of the current dtype, bytes of all dtypes, and (with costs)
    optimizer-state bytes."""

    def __init__(self, num_shards, costs):
        self.num_shards = num_shards
        self.costs = costs
        self.state_total = max(sum(costs), 1) if costs is not None else 1
        self.total_bytes = [0] * num_shards
        self.state = [0] * num_shards
        self.elements = [0] * num_shards

    def own(self, rank, variable, size, itemsize):
        """Replica `rank` owns `variable` (`size` elements) whole."""
        self.elements[rank] += size
        self.total_bytes[rank] += size * itemsize
        if self.costs is not None:
            self.state[rank] += self.costs[variable]

    def pour(self, rank, variable, take, size):
        """Replica `rank` holds `take` of the `size` elements of a split variable."""
        self.elements[rank] += take
        if self.costs is not None:
            self.state[rank] += self.costs[variable] * take // max(size, 1)


def _assign_owners(sizes, dtypes, dtype, split, loads) -> list[list[tuple[int, int, int]]]:
    """Places the whole variables of `dtype`, largest first (ties: lower index
    first), each on the replica with the fewest elements of that dtype so far,
    then the fewest bytes in all, then the lowest rank; with costs, by their
    larger share (of the dtype's elements or of all the state), each on the
    replica whose larger share grows least. Returns each replica's stream of
    runs (variable, start, size)."""
    n = loads.num_shards
    loads.elements = [0] * n
    itemsize = _itemsize(dtype)
    streams: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    members = [i for i, d in enumerate(dtypes) if d == dtype and not split[i]]
    if loads.costs is None:
        for i in sorted(members, key=lambda i: (-sizes[i], i)):
            rank = min(range(n), key=lambda r: (loads.elements[r], loads.total_bytes[r], r))
            streams[rank].append((i, 0, sizes[i]))
            loads.own(rank, i, sizes[i], itemsize)
        return streams
    elements = max(sum(sizes[i] for i, d in enumerate(dtypes) if d == dtype), 1)
    total = loads.state_total
    share = {i: (sizes[i] / elements, loads.costs[i] / total) for i in members}

    def after(r, i):  # replica r's larger share with variable i added
        return max(loads.elements[r] / elements + share[i][0],
                   loads.state[r] / total + share[i][1])

    for i in sorted(members, key=lambda i: (-max(share[i]), i)):
        rank = min(range(n), key=lambda r: (
            after(r, i), max(loads.elements[r] / elements, loads.state[r] / total), r))
        streams[rank].append((i, 0, sizes[i]))
        loads.own(rank, i, sizes[i], itemsize)
    return streams


def _pour_split(sizes, dtypes, dtype, split, loads, streams) -> None:
    """Pours the split variables of `dtype`, in index order, into the
    least-loaded replicas' streams until the loads are level."""
    poured = [i for i, d in enumerate(dtypes) if d == dtype and split[i] and sizes[i]]
    amounts = _level(loads.elements, sum(sizes[i] for i in poured))
    queue = [(i, 0) for i in poured]
    for rank in range(loads.num_shards):
        want = amounts[rank]
        while want:
            i, start = queue[0]
            take = min(want, sizes[i] - start)
            streams[rank].append((i, start, take))
            loads.pour(rank, i, take, sizes[i])
            want -= take
            queue[0] = (i, start + take)
            if start + take == sizes[i]:
                queue.pop(0)


def _cut_buckets(streams, lengths, dtype, first_index, stream_size) -> list[Bucket]:
    """Bucket `j` holds elements `[j * S, (j + 1) * S)` of every replica's
    stream in its shards (`S` = `bucket_size_bytes / N`, the last bucket
    shorter), so a large variable may span buckets, always within its owner's
    shards; padded to the longest stream."""
    n = len(streams)
    buckets = []
    longest = max(lengths)
    for lo in range(0, longest, stream_size):
        shard_size = min(stream_size, longest - lo)
        hi = lo + shard_size
        segments = []
        for rank in range(n):
            position = 0
            for i, start, size in sorted(streams[rank]):
                a, b = max(lo, position), min(hi, position + size)
                if a < b:
                    segments.append(Segment(i, start + a - position, b - a,
                                            rank * shard_size + a - lo))
                position += size
        buckets.append(Bucket(first_index + len(buckets), dtype, tuple(segments),
                              sum(seg.size for seg in segments), n,
                              whole_shard_size=shard_size))
    return buckets


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
