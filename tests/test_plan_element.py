"""The element split's plan: lossless, padded, deterministic, one bucket per dtype run."""

import numpy as np
import pytest

from conftest import rebuild_plan

from tf_zero.plan import plan_shards


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("bucket_bytes", [16, 40, 4096])
def test_plan_is_lossless_and_padded(num_shards, bucket_bytes):
    shapes = [(3, 5), (), (0, 4), (7,), (2, 2, 3), (1,)]
    rng = np.random.default_rng(0)
    values = [rng.normal(size=s) for s in shapes]
    plan = plan_shards(shapes, ["float32"] * len(shapes), num_shards, bucket_bytes)
    for b in plan.buckets:
        assert b.padded_size % num_shards == 0
        assert 0 <= b.padding < num_shards
        assert b.size * 4 <= max(bucket_bytes, 4 * num_shards)
    assert plan.total_elements == sum(int(np.prod(s)) for s in shapes)
    for got, want in zip(rebuild_plan(plan, values), values):
        np.testing.assert_array_equal(got, want)


def test_plan_is_deterministic_and_splits_large_variables():
    shapes = [(10,), (25,), (3,)]
    a = plan_shards(shapes, ["float32"] * 3, 4, 40)
    b = plan_shards(shapes, ["float32"] * 3, 4, 40)
    assert a == b
    assert [bk.size for bk in a.buckets] == [10, 10, 10, 8]
    assert [len(a.variable_segments(i)) for i in range(3)] == [1, 3, 1]


def test_owner_of_matches_shard_ranges():
    plan = plan_shards([(5,), (6,)], ["float32"] * 2, 3, 4096)
    (bucket,) = plan.buckets
    assert bucket.shard_size == 4 and bucket.padding == 1
    assert [plan.owner_of(0, e) for e in range(5)] == [0, 0, 0, 0, 1]
    assert [plan.owner_of(1, e) for e in range(6)] == [1, 1, 1, 2, 2, 2]
    with pytest.raises(IndexError):
        plan.owner_of(1, 6)


def test_dtypes_never_share_a_bucket():
    plan = plan_shards([(4,), (4,), (4,)], ["float32", "bfloat16", "float32"], 2, 4096)
    assert [b.dtype for b in plan.buckets] == ["float32", "bfloat16", "float32"]


def test_bucket_bounds_and_shard_elements():
    plan = plan_shards([(1000,)], ["float32"], 4, 1024)
    assert all(b.size <= 256 for b in plan.buckets)
    assert plan.shard_elements(0) == sum(b.shard_size for b in plan.buckets)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=[(2,)], dtypes=[], num_shards=2, bucket_size_bytes=64), "dtypes"),
    (dict(shapes=[(2,)], dtypes=["float32"], num_shards=0, bucket_size_bytes=64), "num_shards"),
    (dict(shapes=[(2,)], dtypes=["float32"], num_shards=2, bucket_size_bytes=0), "bucket_size"),
    (dict(shapes=[(-1,)], dtypes=["float32"], num_shards=2, bucket_size_bytes=64), "negative"),
])
def test_plan_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_shards(**kwargs)


def test_empty_plan():
    plan = plan_shards([], [], 4, 64)
    assert plan.buckets == () and plan.total_elements == 0


def test_alone_variables_get_a_bucket_each():
    """A stage-3 weight's bucket is exactly its storage: one segment, ceil(P/N) per shard."""
    plan = plan_shards([(3, 2), (5,), (7,), (2,)], ["float32"] * 4, 4, 1024,
                       alone=[False, True, False, False])
    assert [[s.variable for s in b.segments] for b in plan.buckets] == [[0], [1], [2, 3]]
    assert plan.buckets[1].shard_size == 2 and plan.buckets[1].padding == 3
    big = plan_shards([(1000,)], ["float32"], 3, 1024, alone=[True])  # beyond bucket size
    assert len(big.buckets) == 1 and big.buckets[0].shard_size == 334
    with pytest.raises(ValueError, match="alone"):
        plan_shards([(2,)], ["float32"], 2, 1024, alone=[True, False])


def test_fills_a_bucket_counts_bytes_of_the_dtype():
    from tf_zero.plan import fills_a_bucket

    assert fills_a_bucket((64, 64), "float32", 16384)
    assert not fills_a_bucket((64, 63), "float32", 16384)
    assert not fills_a_bucket((64, 64), "bfloat16", 16384)
    assert fills_a_bucket((128, 64), "bfloat16", 16384)
    assert fills_a_bucket((), "float64", 8) and not fills_a_bucket((0, 4), "float32", 1)
