"""The whole-variable plan: owners balanced, split variables poured in level runs."""

import numpy as np
import pytest

from conftest import rebuild_plan

from tf_zero.plan import plan_owners, plan_shards


TRANSFORMER = ([(64, 64)] * 4 + [(64, 256), (256, 64), (64,), (64,), (256,)]) * 6 + [(1000, 64)]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("bucket_bytes", [16, 4096, 1 << 20])
def test_owner_plan_keeps_variables_whole_and_lossless(num_shards, bucket_bytes):
    shapes = [(3, 5), (), (0, 4), (7,), (2, 2, 3), (1,), (9, 2)]
    rng = np.random.default_rng(0)
    values = [rng.normal(size=s) for s in shapes]
    plan = plan_owners(shapes, ["float32"] * len(shapes), num_shards, bucket_bytes)
    assert plan.partition == "whole"
    for got, want in zip(rebuild_plan(plan, values), values):
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
