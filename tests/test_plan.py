import numpy as np
import pytest

from tf_zero.plan import plan_shards


def _rebuild(plan, values):
    """Scatter flat variables through the plan and back: must be lossless."""
    buckets = []
    for b in plan.buckets:
        flat = np.zeros(b.padded_size)
        for s in b.segments:
            flat[s.offset:s.offset + s.size] = values[s.variable].ravel()[s.start:s.start + s.size]
        buckets.append(flat)
    out = [np.zeros(v.size) for v in values]
    for r in range(plan.num_shards):
        for b, flat in zip(plan.buckets, buckets):
            lo, hi = b.shard_range(r)
            shard = flat[lo:hi]
            covered = np.zeros(b.shard_size, bool)
            for p in b.shard_pieces(r):
                out[p.variable][p.start:p.start + p.size] = shard[p.offset:p.offset + p.size]
                covered[p.offset:p.offset + p.size] = True
            assert not np.any(shard[~covered]), "padding must stay zero"
    return [o.reshape(v.shape) for o, v in zip(out, values)]


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
    for got, want in zip(_rebuild(plan, values), values):
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


# ---- the whole-variable partition ---------------------------------------------

from tf_zero.plan import plan_owners  # noqa: E402

TRANSFORMER = ([(64, 64)] * 4 + [(64, 256), (256, 64), (64,), (64,), (256,)]) * 6 + [(1000, 64)]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("bucket_bytes", [16, 4096, 1 << 20])
def test_owner_plan_keeps_variables_whole_and_lossless(num_shards, bucket_bytes):
    shapes = [(3, 5), (), (0, 4), (7,), (2, 2, 3), (1,), (9, 2)]
    rng = np.random.default_rng(0)
    values = [rng.normal(size=s) for s in shapes]
    plan = plan_owners(shapes, ["float32"] * len(shapes), num_shards, bucket_bytes)
    assert plan.partition == "whole"
    for got, want in zip(_rebuild(plan, values), values):
        np.testing.assert_array_equal(got, want)
    for i, shape in enumerate(shapes):
        owner = plan.owner(i)
        pieces = [p for b in plan.buckets for p in b.shard_pieces(owner) if p.variable == i]
        # Whole on its owner: its pieces, in bucket order, run from 0 to its end.
        starts = [0] + [int(x) for x in np.cumsum([p.size for p in pieces])][:-1]
        assert [p.start for p in pieces] == (starts if pieces else [])
        assert sum(p.size for p in pieces) == int(np.prod(shape))
        assert all(p.variable != i for r in range(num_shards) if r != owner
                   for b in plan.buckets for p in b.shard_pieces(r))
    for b in plan.buckets:
        loads = [sum(p.size for p in b.shard_pieces(r)) for r in range(num_shards)]
        assert b.shard_size == max(loads)  # the busiest replica fills its shard
        ends = [s.offset + s.size for s in b.segments]
        assert all(e <= s.offset for e, s in zip(ends, b.segments[1:]))  # no overlap


def test_owner_plan_is_deterministic_and_balanced_on_a_transformer():
    dtypes = ["float32"] * len(TRANSFORMER)
    plan = plan_owners(TRANSFORMER, dtypes, 4, 8 << 20)
    assert plan == plan_owners(TRANSFORMER, dtypes, 4, 8 << 20)
    # 24 equal attention matrices and 12 MLP matrices spread evenly; the
    # 64k-element embedding alone is what stands above the ideal.
    assert plan.imbalance < 1.25, plan.imbalance
    no_embedding = plan_owners(TRANSFORMER[:-1], dtypes[:-1], 4, 8 << 20)
    assert no_embedding.imbalance < 1.02, no_embedding.imbalance
    # Padding is paid once, not per bucket: small buckets move no more.
    for bucket_bytes in (8 << 20, 1 << 14):
        p = plan_owners(TRANSFORMER, dtypes, 4, bucket_bytes)
        moved = sum(b.padded_size for b in p.buckets)
        assert moved == pytest.approx(p.imbalance * p.total_elements, rel=1e-9)
        assert p.buckets[0].shard_size <= max(bucket_bytes // 4 // 4, 1)
    # Elements split across replicas are balanced by construction.
    assert plan_shards(TRANSFORMER, dtypes, 4, 8 << 20).imbalance < 1.0001


def test_owner_plan_examples_and_errors():
    plan = plan_owners([(4, 4), (4, 4), (3,)], ["float32"] * 3, 2, 1 << 20)
    assert [plan.owner(i) for i in range(3)] == [0, 1, 0]
    assert plan.buckets[0].shard_size == 19 and plan.replica_bytes(1) == 64
    # Largest first onto the least-loaded replica: 5, 4, 3 -> r0, r1, r1.
    plan = plan_owners([(3,), (5,), (4,)], ["float32"] * 3, 2, 1 << 20)
    assert [plan.owner(i) for i in range(3)] == [1, 0, 1]
    with pytest.raises(ValueError, match="element split"):
        plan_shards([(2,)], ["float32"], 2, 64).owner(0)
    with pytest.raises(ValueError, match="num_shards"):
        plan_owners([(2,)], ["float32"], 0, 64)
    with pytest.raises(ValueError, match="dtypes"):
        plan_owners([(2,)], [], 2, 64)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("bucket_bytes", [16, 100, 4096])
def test_split_variables_are_poured_in_runs_and_level_the_loads(num_shards, bucket_bytes):
    shapes = [(7, 3), (50,), (2, 2), (33,), (1,), (0,), (9, 9), (40, 2)]
    split = [False, True, False, True, True, True, False, True]
    plan = plan_owners(shapes, ["float32"] * len(shapes), num_shards, bucket_bytes, split=split)
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        seen = np.zeros(size, int)
        for b, seg in plan.variable_segments(i):
            seen[seg.start:seg.start + seg.size] += 1
        assert (seen == 1).all()  # every element exactly once
        runs = [plan.run(i, r) for r in range(num_shards)]
        assert sum(n for _, n in runs) == size
        if not split[i]:
            assert sum(1 for _, n in runs if n) == (1 if size else 0)
            continue
        # A replica's part of a split variable is one contiguous run.
        for r, (start, n) in enumerate(runs):
            covered = sorted((s.start, s.size) for b, s in plan.variable_segments(i)
                             if s.offset // plan.buckets[b].shard_size == r)
            assert sum(c for _, c in covered) == n
            assert all(a + c == b for (a, c), (b, _) in zip(covered, covered[1:]))
            if covered:
                assert covered[0][0] == start
    # Poured into the least-loaded replicas: those that received split elements
    # end level (within one element), and no other replica is below them.
    loads = [plan.replica_bytes(r) // 4 for r in range(num_shards)]
    receivers = [r for r in range(num_shards)
                 if any(plan.run(i, r)[1] for i in range(len(shapes)) if split[i])]
    level = max(loads[r] for r in receivers)
    assert all(loads[r] >= level - 1 for r in range(num_shards))
    assert all(loads[r] <= level for r in receivers)
    with pytest.raises(ValueError, match="element split"):
        plan.owner(1)


def test_split_lifts_the_floor_of_a_large_embedding():
    # An embedding of 40% of the model: owned whole, its replica holds 1.6x the
    # ideal at N=4; spread in runs, the loads are level.
    shapes = [(400, 10)] + [(10, 10)] * 60
    whole = plan_owners(shapes, ["float32"] * len(shapes), 4, 1 << 20)
    spread = plan_owners(shapes, ["float32"] * len(shapes), 4, 1 << 20,
                         split=[True] + [False] * 60)
    assert whole.imbalance == pytest.approx(1.6)
    assert spread.imbalance == pytest.approx(1.0)
    with pytest.raises(ValueError, match="split"):
        plan_owners(shapes, ["float32"] * len(shapes), 4, 1 << 20, split=[True])
