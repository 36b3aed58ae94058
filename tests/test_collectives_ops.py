"""Each collective against numpy, for several dtypes and replica counts."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored_strategy, zero_strategy

from tf_zero import collectives

LENGTH = 12


def _inputs(n, dtype):
    rng = np.random.default_rng(n)
    return [rng.uniform(-4, 4, size=LENGTH).astype(np.float32) for _ in range(n)]


def _run(strategy, fn, per_replica_inputs, dtype):
    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        table = tf.constant(np.stack(per_replica_inputs))
        return fn(tf.cast(tf.gather(table, r), dtype))

    out = tf.function(lambda: strategy.run(replica_fn))()
    return [tf.cast(t, tf.float64).numpy() for t in strategy.experimental_local_results(out)]


def _tol(dtype):
    return {tf.float32: 1e-6, tf.float64: 1e-12, tf.float16: 2e-2, tf.bfloat16: 1e-1}[dtype]


DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_reduce_scatter_matches_numpy(n, dtype):
    inputs = _inputs(n, dtype)
    if LENGTH % n:
        pytest.skip("length not divisible")
    got = _run(zero_strategy(n), collectives.reduce_scatter, inputs, dtype)
    rounded = [tf.cast(tf.cast(x, dtype), tf.float32).numpy() for x in inputs]
    total = np.sum(np.asarray(rounded, np.float64), axis=0)
    shard = LENGTH // n
    for r in range(n):
        np.testing.assert_allclose(got[r], total[r * shard:(r + 1) * shard],
                                   rtol=_tol(dtype), atol=_tol(dtype))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_all_gather_matches_numpy_bitwise(n, dtype):
    inputs = _inputs(n, dtype)
    got = _run(zero_strategy(n), collectives.all_gather, inputs, dtype)
    want = np.concatenate([tf.cast(tf.cast(x, dtype), tf.float32).numpy() for x in inputs])
    for r in range(n):
        np.testing.assert_array_equal(got[r], want)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=lambda d: d.name)
def test_all_reduce_sum_matches_numpy(n, dtype):
    inputs = _inputs(n, dtype)
    got = _run(zero_strategy(n), collectives.all_reduce_sum, inputs, dtype)
    for r in range(n):
        np.testing.assert_allclose(got[r], np.sum(inputs, axis=0), rtol=1e-6)


def test_backend_choice_on_cpu():
    strategy = zero_strategy(4)
    seen = _run(strategy, lambda x: tf.constant(
        float({"all_to_all": 1, "nccl": 2, "replica_context": 3}[collectives.backend()])),
        _inputs(4, tf.float32), tf.float32)
    assert seen == [1.0] * 4


def test_plain_mirrored_strategy_uses_the_same_launchers():
    inputs = _inputs(2, tf.float32)
    got = _run(mirrored_strategy(2), collectives.reduce_scatter, inputs, tf.float32)
    total = np.sum(inputs, axis=0)
    np.testing.assert_allclose(np.concatenate(got), total, rtol=1e-6)


def test_replica_context_fallback_matches(monkeypatch):
    """Strategies without collective launchers use all_reduce + slice."""
    from tf_zero import _private
    monkeypatch.setattr(_private, "collective_launcher", lambda strategy: None)
    inputs = _inputs(2, tf.float32)
    strategy = mirrored_strategy(2)
    got = _run(strategy, collectives.reduce_scatter, inputs, tf.float32)
    np.testing.assert_allclose(np.concatenate(got), np.sum(inputs, axis=0), rtol=1e-6)
    gathered = _run(strategy, collectives.all_gather, inputs, tf.float32)
    np.testing.assert_array_equal(gathered[1], np.concatenate(inputs))


def test_bad_lengths_are_rejected():
    strategy = zero_strategy(4)
    with pytest.raises(ValueError, match="divisible by 4"):
        _run(strategy, collectives.reduce_scatter,
             [np.zeros(LENGTH + 1, np.float32)] * 4, tf.float32)
    with pytest.raises(ValueError, match="1-D"):
        _run(strategy, lambda x: collectives.all_gather(tf.reshape(x, [3, 4])),
             _inputs(4, tf.float32), tf.float32)


@pytest.mark.parametrize("n", [2, 4])
def test_reduce_scatter_of_unknown_static_length(n):
    """A tensor whose static length is lost (as a tied embedding's gradient's is)."""
    def unknown_length(x):
        x = tf.boolean_mask(x, tf.math.is_finite(x))
        assert x.shape[0] is None
        return collectives.reduce_scatter(x)

    inputs = _inputs(n, tf.float32)
    got = _run(zero_strategy(n), unknown_length, inputs, tf.float32)
    np.testing.assert_allclose(np.concatenate(got), np.sum(inputs, axis=0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_eager_collectives_equal_traced_ones(dtype):
    """Eagerly (strategy.run without tf.function) a raw collective would hang;
    each one goes through merge_call and a tf.function and gives the traced
    result bitwise."""
    strategy = zero_strategy(3)
    inputs = _inputs(3, dtype)

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        x = tf.cast(tf.gather(tf.constant(np.stack(inputs)), r), dtype)
        return (collectives.reduce_scatter(x), collectives.all_gather(x[:4]),
                collectives.all_reduce_sum(x))

    eager = strategy.run(replica_fn)
    traced = tf.function(lambda: strategy.run(replica_fn))()
    for got, want in zip(eager, traced):
        for g, w in zip(strategy.experimental_local_results(got),
                        strategy.experimental_local_results(want)):
            np.testing.assert_array_equal(tf.cast(g, tf.float32).numpy(),
                                          tf.cast(w, tf.float32).numpy())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hybrid_subgroups_reduce_inside_then_across_and_gather_inside(k):
    """N = 4 in shard groups of k: a reduce-scatter inside the group, then an
    all-reduce across groups over the same shard index, gives each replica
    slice `r % k` of the sum over all 4; the publish gathers the group's
    slices into the full sum. Each sub-group has its own collective key."""
    n = 4
    strategy = zero_strategy(n)
    within, across = collectives.shard_groups(strategy, k)
    assert (within.size, across.size) == (k, n // k)
    keys = {(g.kind, g.key(r)) for g in (within, across) for r in range(n)}
    assert len(keys) == n // k + k
    inputs = _inputs(n, tf.float32)

    def hybrid(x):
        shard = collectives.all_reduce_sum(collectives.reduce_scatter(x, group=within),
                                           group=across)
        return tf.concat([shard, collectives.all_gather(shard, group=within)], 0)

    got = _run(strategy, hybrid, inputs, tf.float32)
    total = np.sum(np.asarray(inputs, np.float64), axis=0)
    size = LENGTH // k
    for r in range(n):
        s = r % k
        np.testing.assert_allclose(got[r][:size], total[s * size:(s + 1) * size], rtol=1e-6)
        np.testing.assert_allclose(got[r][size:], total, rtol=1e-6)


def test_hybrid_group_size_must_divide_the_replicas():
    with pytest.raises(ValueError, match="must divide the 4 replicas"):
        collectives.shard_groups(zero_strategy(4), 3)
