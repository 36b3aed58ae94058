import keras
import pytest
from conftest import mirrored_strategy, zero_strategy

import tf_zero


def _built(strategy, make_opt, zero, stage=2):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                  keras.layers.Dense(129)])
        opt = make_opt()
        if zero:
            opt = tf_zero.ZeroOptimizer(opt, stage=stage)
        opt.build(model.trainable_variables)
    return model, opt


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("n", [2, 4])
def test_slot_bytes_are_one_nth(n, stage):
    model, opt = _built(zero_strategy(n), lambda: keras.optimizers.Adam(), True, stage)
    report = tf_zero.memory_report(opt)
    params = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
    unsharded_slots = 2 * 4 * params
    assert report.unsharded.slots == unsharded_slots
    assert len(report.replicas) == n
    padding = sum(b.padding for b in opt.plan.buckets) * 2 * 4
    for replica in report.replicas:
        assert replica.slots <= unsharded_slots / n * 1.01 + padding
        assert replica.slots >= unsharded_slots / n
        assert replica.weights == 4 * params
        assert replica.weight_shards == replica.slots // 2
        assert replica.gradient_buffers == 0
    assert report.stage == stage
    assert "slots" in str(report)


def test_plain_optimizer_report_matches_unsharded_figure():
    _, plain = _built(mirrored_strategy(4), lambda: keras.optimizers.Adam(), False)
    _, zero = _built(zero_strategy(4), lambda: keras.optimizers.Adam(), True)
    plain_report = tf_zero.memory_report(plain)
    zero_report = tf_zero.memory_report(zero)
    assert plain_report.stage == 0
    assert len(plain_report.replicas) == 4
    assert all(r.slots == zero_report.unsharded.slots for r in plain_report.replicas)
    assert zero_report.max_replica.slots < plain_report.max_replica.slots / 3.9


def test_unbuilt_optimizer_is_refused():
    with pytest.raises(ValueError, match="built"):
        tf_zero.memory_report(tf_zero.ZeroOptimizer(keras.optimizers.SGD()))
