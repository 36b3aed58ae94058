"""ZeroOptimizer against the unsharded inner optimizer under the same strategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (assert_replicas_identical, max_weight_diff, mirrored_strategy,
                      mlp, regression_data, zero_strategy)

import tf_zero
from tf_zero import _private

BATCH = 24  # divisible by 1, 2, 3 and 4 replicas


def fit(strategy, make_optimizer, *, zero, stage=None, epochs=2, model_fn=mlp,
        data=None, **zero_kwargs):
    x, y = data or regression_data()
    with strategy.scope():
        model = model_fn()
        opt = make_optimizer()
        if zero:
            opt = tf_zero.ZeroOptimizer(opt, stage=stage, **zero_kwargs)
        model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def parity(n, make_optimizer, stage=2, **kwargs):
    ref = fit(mirrored_strategy(n), make_optimizer, zero=False, **kwargs)
    got = fit(zero_strategy(n), make_optimizer, zero=True, stage=stage, **kwargs)
    assert_replicas_identical(got)
    assert got.optimizer.is_sharded
    assert int(got.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy())
    return max_weight_diff(ref.get_weights(), got.get_weights()), got


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("name, make", [
    ("sgd", lambda: keras.optimizers.SGD(0.05)),
    ("adam", lambda: keras.optimizers.Adam(0.01)),
])
def test_parity_sgd_adam(name, make, n, stage):
    diff, _ = parity(n, make, stage=stage)
    assert diff < 1e-6, f"{name} n={n} stage={stage}: {diff}"


# The sharded path sums gradients in another order than all-reduce, so the
# weights differ by float32 round-off: measured at most 6e-8 after two epochs
# for every optimizer below (Lion, which takes a sign, 0). 1e-6 leaves 16x
# headroom and is still far below one update at these learning rates.
OPTIMIZERS = [
    ("sgd_nesterov", lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), 1e-6),
    ("adam_amsgrad", lambda: keras.optimizers.Adam(0.01, amsgrad=True), 1e-6),
    ("adamw", lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1), 1e-6),
    ("adamax", lambda: keras.optimizers.Adamax(0.01), 1e-6),
    ("nadam", lambda: keras.optimizers.Nadam(0.01), 1e-6),
    ("rmsprop_centered", lambda: keras.optimizers.RMSprop(0.01, centered=True, momentum=0.5), 1e-6),
    ("adagrad", lambda: keras.optimizers.Adagrad(0.1), 1e-6),
    ("adadelta", lambda: keras.optimizers.Adadelta(1.0), 1e-6),
    ("ftrl", lambda: keras.optimizers.Ftrl(0.1, l1_regularization_strength=0.01,
                                           l2_regularization_strength=0.01), 1e-6),
    ("lion", lambda: keras.optimizers.Lion(1e-3), 1e-6),
    ("schedule_free_adamw", lambda: keras.optimizers.ScheduleFreeAdamW(0.01), 1e-6),
]


@pytest.mark.parametrize("name, make, tol", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_parity_every_elementwise_optimizer(name, make, tol):
    if name == "schedule_free_adamw" and not hasattr(keras.optimizers, "ScheduleFreeAdamW"):
        pytest.skip("keras.optimizers.ScheduleFreeAdamW is new in Keras 3.14")
    diff, _ = parity(3, make)
    assert diff < tol, f"{name}: {diff}"


@pytest.mark.parametrize("name, make", [
    ("global_clipnorm", lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.05)),
    ("clipnorm", lambda: keras.optimizers.Adam(0.01, clipnorm=0.02)),
    ("clipvalue", lambda: keras.optimizers.SGD(0.1, clipvalue=0.001)),
])
def test_clipping_uses_the_reduced_gradient(name, make):
    """Clipping after reduction equals single-device training on the batch."""
    ref = fit(zero_strategy(1), make, zero=False, model_fn=mlp)  # one replica
    got = fit(zero_strategy(4), make, zero=True)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    # Keras' own clipping under MirroredStrategy clips local gradients and
    # differs from single-device training (tensorflow#33929).
    keras_way = fit(mirrored_strategy(4), make, zero=False)
    assert max_weight_diff(ref.get_weights(), keras_way.get_weights()) > 1e-5


def test_weight_decay_respects_exclusions():
    def make():
        opt = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_names=["bias"])
        return opt
    diff, got = parity(4, make)
    assert diff < 1e-6


def test_learning_rate_schedule_and_iterations():
    def make():
        return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=2, decay_rate=0.5))
    diff, got = parity(4, make, epochs=2)
    assert diff < 1e-6
    assert int(got.optimizer.iterations.numpy()) == 8
    assert got.optimizer.learning_rate.numpy() == pytest.approx(0.05 * 0.5 ** 4)


def _frozen_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    frozen = keras.layers.Dense(6, name="frozen")
    frozen.trainable = False
    h = frozen(inputs)
    h = keras.layers.BatchNormalization()(h)
    out = keras.layers.Dense(3)(keras.layers.Dense(4, activation="relu")(h))
    unused = keras.layers.Dense(2, name="unused")  # built, gets no gradient
    model = keras.Model(inputs, out)
    unused.build((None, 8))
    model.unused = unused
    return model


def test_frozen_nonfloat_and_gradient_free_variables():
    ref = fit(mirrored_strategy(4), lambda: keras.optimizers.Adam(0.01), zero=False,
              model_fn=_frozen_model)
    got = fit(zero_strategy(4), lambda: keras.optimizers.Adam(0.01), zero=True,
              model_fn=_frozen_model)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    assert_replicas_identical(got)
    names = {v.path for v in got.optimizer.shards.variables}
    assert not any("frozen" in n or "moving" in n for n in names)


def test_variables_without_gradients_keep_weights_and_slots():
    """A variable whose gradient is None is not touched, even sharing a bucket."""
    strategy = zero_strategy(2)
    with strategy.scope():
        a = keras.Variable(np.ones(5, np.float32), name="a")
        b = keras.Variable(np.full(3, 2.0, np.float32), name="b")
        opt = tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.1))
        opt.build([a, b])

    @tf.function
    def step():
        def replica_fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(a * a)
            (ga,) = tape.gradient(loss, [a])
            opt.apply([ga, None], [a, b])
        strategy.run(replica_fn)

    step()
    step()
    np.testing.assert_array_equal(b.numpy(), np.full(3, 2.0))
    assert np.all(a.numpy() < 1.0)
    # b's elements of every slot stayed zero on every replica.
    for slot in opt.shards.slots[0]:
        for comp in _private.components(slot):
            values = comp.numpy()
            assert values.shape == (4,)


def _embedding_model():
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(50, 6),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3),
    ])


def _embedding_data():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50, size=(96, 4)).astype("int32")
    y = rng.normal(size=(96, 3)).astype("float32")
    return x, y


def test_sparse_embedding_gradients_sgd():
    data = _embedding_data()
    make = lambda: keras.optimizers.SGD(0.5)  # noqa: E731
    ref = fit(mirrored_strategy(4), make, zero=False, model_fn=_embedding_model, data=data)
    got = fit(zero_strategy(4), make, zero=True, model_fn=_embedding_model, data=data)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6


def _train_loop(strategy, make_optimizer, data, densify, model_fn=_embedding_model):
    """A custom loop: strategy.run + apply_gradients inside tf.function."""
    x, y = data
    with strategy.scope():
        model = model_fn()
        opt = make_optimizer()
        opt.build(model.trainable_variables)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))

    @tf.function
    def step(batch):
        def replica_fn(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(xb) - yb)) / BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            if densify:
                assert isinstance(grads[0], tf.IndexedSlices)
                grads = [tf.convert_to_tensor(g) for g in grads]
            opt.apply_gradients(zip(grads, model.trainable_variables))
        strategy.run(replica_fn, args=batch)

    for batch in dataset:
        step(batch)
    return model


def test_sparse_embedding_gradients_adam_use_the_summed_gradient():
    """Adam sees the true (duplicate-summed) embedding gradient.

    Keras' Adam squares an `IndexedSlices` gradient row by row before its
    duplicate indices are summed, so a token seen twice in a batch gets
    g1^2 + g2^2 instead of (g1 + g2)^2 in the second moment. tf_zero reduces
    the dense gradient, which is Adam's definition; the reference is Keras'
    Adam fed the same gradient densified.
    """
    data = _embedding_data()
    adam = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    ref = _train_loop(mirrored_strategy(4), adam, data, densify=True)
    got = _train_loop(zero_strategy(4), lambda: tf_zero.ZeroOptimizer(adam()), data,
                      densify=False)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    keras_sparse = _train_loop(mirrored_strategy(4), adam, data, densify=False)
    assert max_weight_diff(ref.get_weights(), keras_sparse.get_weights()) > 1e-4


def test_small_buckets_split_variables():
    # 256 floats a bucket: the 8x30 kernel (240) and the first 16 of its
    # bias fill the first; the bias's other 14 open the second.
    diff, got = parity(3, lambda: keras.optimizers.Adam(0.01), bucket_size_bytes=1024,
                       model_fn=lambda: mlp(hidden=30))
    assert diff < 1e-6
    plan = got.optimizer.plan
    assert [len(plan.variable_segments(i)) for i in range(plan.num_variables)] == [1, 2, 1, 1]


def _traced_step(strategy, model, opt):
    """The graph of one step of `opt` on `model` (inputs of 64), in replica context."""
    @tf.function
    def step(x):
        def replica(xr):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(xr) ** 2)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        strategy.run(replica, args=(x,))

    return step.get_concrete_function(tf.TensorSpec([2, 64], tf.float32)).graph


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_reduce_scatters_launch_last_bucket_first(accumulation_steps):
    """A replica runs its collectives in the order they are created, and the
    backward pass yields the last layers' gradients first: the last bucket's
    reduce-scatter (and all-gather) must be created first, or it waits for the
    first layer's."""
    strategy = zero_strategy(2, stage=2)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64),
                                  keras.layers.Dense(32), keras.layers.Dense(8)])
        opt = tf_zero.ZeroOptimizer(keras.optimizers.SGD(0.1), bucket_size_bytes=16384,
                                    accumulation_steps=accumulation_steps)
        opt.build(model.trainable_variables)
    graph = _traced_step(strategy, model, opt)
    # Stage 2 reduce-scatters every micro-step outside the window's branch.
    launched = [op.inputs[0].shape[1] for op in graph.get_operations()
                if op.type == "CollectiveAllToAllV2" and op.device.endswith("CPU:0")]
    # 4096 elements of the first kernel, then the rest (2408): 2048 and 1204 per replica.
    assert [b.shard_size for b in opt.plan.buckets] == [2048, 1204]
    assert launched == [1204, 2048]
    if accumulation_steps == 1:
        # The first bucket is reduced and updated last: it is gathered last too.
        gathered = [op.inputs[0].shape[0] for op in graph.get_operations()
                    if op.type == "CollectiveGatherV2" and op.device.endswith("CPU:0")]
        assert gathered == [1204, 2048]


def test_variables_a_bucket_large_are_published_without_a_concatenation():
    """A variable at least a bucket large is a bucket of its own: its local
    gradient is the bucket, and its all-gather's output the whole new weight,
    so neither the reduce nor the publish concatenates anything for it."""
    strategy = zero_strategy(2, stage=2)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64),
                                  keras.layers.Dense(32), keras.layers.Dense(8)])
        opt = tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01), bucket_size_bytes=8192)
        opt.build(model.trainable_variables)
    # 2048 floats a bucket: the 64x64 kernel (4096) and the 64x32 one (2048)
    # alone, the biases and the small kernel packed around them.
    assert [[s.size for s in b.segments] for b in opt.plan.buckets] == [
        [4096], [64], [2048], [32, 256, 8]]
    graph = _traced_step(strategy, model, opt)
    concats = [op.name for op in graph.get_operations() if op.type == "ConcatV2"
               and ("zero_publish" in op.name or "zero_reduce" in op.name)]
    # Only the last bucket, of three variables and no padding, is laid out.
    assert len([c for c in concats if "zero_reduce" in c]) == 2  # one per replica
    assert not [c for c in concats if "zero_publish" in c]


def test_custom_training_loop():
    data = regression_data()
    adam = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    ref = _train_loop(mirrored_strategy(4), adam, data, densify=False, model_fn=mlp)
    got = _train_loop(zero_strategy(4), lambda: tf_zero.ZeroOptimizer(adam()), data,
                      densify=False, model_fn=mlp)
    assert max_weight_diff(ref.get_weights(), got.get_weights()) < 1e-6
    assert_replicas_identical(got)


def test_no_strategy_equals_inner_exactly():
    x, y = regression_data()
    models = []
    for zero in (False, True):
        model = mlp()
        opt = keras.optimizers.Adam(0.01)
        model.compile(optimizer=tf_zero.ZeroOptimizer(opt) if zero else opt, loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not models[1].optimizer.is_sharded


def test_inner_optimizer_created_outside_scope():
    outside = keras.optimizers.Adam(0.01)
    strategy = zero_strategy(4)
    ref = fit(mirrored_strategy(4), lambda: keras.optimizers.Adam(0.01), zero=False)
    x, y = regression_data()
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=tf_zero.ZeroOptimizer(outside), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_weight_diff(ref.get_weights(), model.get_weights()) < 1e-6
    assert model.optimizer.inner_optimizer is not outside


def test_inner_optimizer_with_state_outside_scope_is_refused():
    outside = keras.optimizers.Adam(0.01)
    outside.build([keras.Variable(np.zeros(3, np.float32))])
    with zero_strategy(2).scope():
        model = mlp()
        opt = tf_zero.ZeroOptimizer(outside)
        with pytest.raises(ValueError, match="inside the scope"):
            opt.build(model.trainable_variables)


# (Lamb, Adafactor and Muon are partitioned by whole variables: tests/test_whole_partition.py;
# use_ema=True is sharded: tests/test_optimizer_ema.py.)
@pytest.mark.parametrize("make, match", [
    (lambda: keras.optimizers.Adam(gradient_accumulation_steps=2), "gradient_accumulation"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), "plain optimizer"),
    (lambda: "adam", "Keras optimizer instance"),
])
def test_unsupported_inner_optimizers_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tf_zero.ZeroOptimizer(make())


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=4), "stage=3 to also shard the weights"),
    (dict(stage=0), "stage must be"),
    (dict(bucket_size_bytes=10), "bucket_size_bytes"),
    (dict(clipnorm=1.0), "set it on the inner"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_zero.ZeroOptimizer(keras.optimizers.SGD(), **kwargs)


def test_numpy_integers_are_accepted_alike_everywhere():
    """One validator for every integer setting: NumPy integers are ints, bools are not."""
    config = tf_zero.ZeroConfig(stage=np.int64(3), bucket_size_bytes=np.int32(4096),
                                persistence_threshold=np.int64(0), prefetch_depth=np.int8(1))
    assert (config.stage, config.bucket_size_bytes, config.prefetch_depth) == (3, 4096, 1)
    assert type(config.bucket_size_bytes) is int
    opt = tf_zero.ZeroOptimizer(keras.optimizers.SGD(), stage=np.int64(2),
                                bucket_size_bytes=np.int64(2048), accumulation_steps=np.int64(4))
    assert opt.accumulation_steps == 4 and opt.get_config()["stage"] == 2
    assert tf_zero.GradientAccumulationOptimizer(keras.optimizers.SGD(), np.int64(3)).steps == 3
    assert config.override(stage=np.int64(1), reduce_dtype=None).stage == 1
    for bad in (dict(accumulation_steps=True), dict(accumulation_steps=0),
                dict(bucket_size_bytes=2048.0)):
        with pytest.raises(ValueError, match="must be an int of at least"):
            tf_zero.ZeroOptimizer(keras.optimizers.SGD(), **bad)
    with pytest.raises(ValueError, match="partition must be one of"):
        config.override(partition="rows")


def test_stage_defaults():
    with zero_strategy(2, stage=1).scope():
        model = mlp()
        opt = tf_zero.ZeroOptimizer(keras.optimizers.SGD())
        opt.build(model.trainable_variables)
    assert opt.stage == 1
    with mirrored_strategy(2).scope():
        model = mlp()
        opt = tf_zero.ZeroOptimizer(keras.optimizers.SGD())
        opt.build(model.trainable_variables)
    assert opt.stage == 1 and opt.is_sharded


def test_get_config_round_trip():
    opt = tf_zero.ZeroOptimizer(keras.optimizers.AdamW(0.003, weight_decay=0.2), stage=1,
                                bucket_size_bytes=4096)
    config = keras.saving.serialize_keras_object(opt)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, tf_zero.ZeroOptimizer)
    assert clone.stage == 1 and clone.get_config()["bucket_size_bytes"] == 4096
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)
    assert clone.inner_optimizer.weight_decay == pytest.approx(0.2)
    assert float(clone.learning_rate.numpy()) == pytest.approx(0.003)
