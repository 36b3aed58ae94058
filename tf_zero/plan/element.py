"""The element split: every variable laid end to end into buckets, each
replica owning 1/N of every variable. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tf_zero.plan.layout import Bucket, Segment, ShardPlan, _itemsize, _validated


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
    concatenation of the gathered pieces on the way out (measured in
    docs/benchmarks.md).
    """
    size = int(np.prod(tuple(int(d) for d in shape), dtype=np.int64))
    return size * _itemsize(dtype) >= bucket_size_bytes
