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


@pytest.mark.parametrize("zero", [False, True], ids=["mirrored", "stage3"])
def test_frozen_weights_are_counted_when_the_model_is_given(zero):
    strategy = (zero_strategy(4, stage=3, persistence_threshold=1000) if zero
                else mirrored_strategy(4))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                  keras.layers.Dense(129)])
        model.layers[0].trainable = False  # 64 x 256 kernel + 256 bias, frozen
        opt = keras.optimizers.Adam()
        opt = tf_zero.ZeroOptimizer(opt) if zero else opt
        opt.build(model.trainable_variables)
    frozen_bytes = 4 * (64 * 256 + 256)
    assert tf_zero.memory_report(opt).max_replica.frozen_weights == 0
    report = tf_zero.memory_report(opt, model=model)
    assert report.unsharded.frozen_weights == frozen_bytes
    # Sharded at stage 3: a quarter of the kernel, the small bias whole.
    want = 4 * (64 * 256 // 4 + 256) if zero else frozen_bytes
    assert all(r.frozen_weights == want for r in report.replicas), str(report)
    assert "frozen" in str(report)
