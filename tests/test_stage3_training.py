"""Stage 3: sharded weights train like unsharded ones (fit, custom loops, mixed
precision, overflow, recompute), and what it cannot do is refused by name."""


import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (densified, max_weight_diff, mirrored_strategy, mlp, regression_data,
                      zero_strategy)
from stage3_models import (BATCH, OPTIMIZERS, stage3, layered_model, no_batch_norm, token_data, compiled, fit_dense, fit, assert_weights_close)

import tf_zero
from tf_zero import _private, collectives


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_fit_matches_unsharded(opt, n):
    """fit at stage 3 == the plain optimizer under MirroredStrategy."""
    model = fit(compiled(stage3(n), OPTIMIZERS[opt]))
    assert all(tf_zero.is_sharded(v) for v in model.trainable_variables)
    reference = fit(compiled(mirrored_strategy(n), OPTIMIZERS[opt], zero=False))
    # BatchNormalization statistics included: they stay mirrored variables.
    assert_weights_close(model.get_weights(), reference.get_weights())
    # Outputs of weights that agree to 1e-6, through BatchNormalization's
    # 1/sqrt(variance): agreement to a few 1e-6.
    x, y = token_data(seed=1)
    np.testing.assert_allclose(model.predict(x, batch_size=BATCH, verbose=0),
                               reference.predict(x, batch_size=BATCH, verbose=0), atol=1e-5)
    assert model.evaluate(x, y, batch_size=BATCH, verbose=0) == pytest.approx(
        reference.evaluate(x, y, batch_size=BATCH, verbose=0), abs=1e-5)


def test_custom_loop_matches_unsharded():
    """tape.gradient returns reduced shard gradients; apply_gradients takes them."""
    x, y = token_data()
    weights = []
    for strategy, zero in ((stage3(4), True), (mirrored_strategy(4), False)):
        with strategy.scope():
            model = layered_model()
            opt = keras.optimizers.Adam(0.01)
            opt = tf_zero.ZeroOptimizer(opt) if zero else densified(opt)
            opt.build(model.trainable_variables)

        @tf.function
        def step(xb, yb):
            def replica_step(xr, yr):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(tf.square(model(xr, training=True) - yr)) / BATCH
                grads = tape.gradient(loss, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables))
                return [tf.shape(g)[0] for g in grads]
            return strategy.run(replica_step, args=(xb, yb))

        ds = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH))
        for _ in range(2):
            for xb, yb in ds:
                sizes = step(xb, yb)
        if zero:
            shard_sizes = [int(strategy.experimental_local_results(s)[0]) for s in sizes]
            assert shard_sizes == [-(-int(np.prod(v.shape)) // 4)
                                   for v in model.trainable_variables]
        weights.append(model.get_weights())
    assert max_weight_diff(*weights) < 1e-6


def test_small_weights_stay_replicated_and_share_buckets():
    """Below persistence_threshold a weight is mirrored and bucketed (stage 2)."""
    strategy = stage3(3, persistence_threshold=30)
    model = fit(compiled(strategy, OPTIMIZERS["adam"]))
    sharded = {v.path: tf_zero.is_sharded(v) for v in model.trainable_variables}
    assert tf_zero.is_sharded(model.layers[0].embeddings)  # 160 elements
    assert not tf_zero.is_sharded(model.layers[1].bias)  # 8 elements
    plan = model.optimizer.plan
    assert len(model.optimizer.shards.stored) == sum(sharded.values())
    assert len(plan.buckets) > len(model.optimizer.shards.stored)
    reference = fit(compiled(mirrored_strategy(3), OPTIMIZERS["adam"], zero=False))
    assert_weights_close(model.get_weights(), reference.get_weights())


def test_keras_weight_apis_see_full_tensors():
    strategy = stage3(3)
    model = compiled(strategy, OPTIMIZERS["adam"])
    plain = layered_model()
    assert model.count_params() == plain.count_params()
    for v, p in zip(model.weights, plain.weights):
        assert tuple(v.shape) == tuple(p.shape)
    np.testing.assert_array_equal(model.get_weights()[0], plain.get_weights()[0])
    kernel = model.layers[-1].kernel
    shards = _private.components(kernel)
    assert [tuple(c.shape) for c in shards] == [(12,)] * 3  # 12 x 3 over 3 replicas
    new = [np.random.default_rng(i).normal(size=w.shape).astype(w.dtype)
           for i, w in enumerate(model.get_weights())]
    model.set_weights(new)
    assert max_weight_diff(model.get_weights(), new) == 0
    with pytest.raises(ValueError, match="shape"):
        kernel.assign(np.zeros((3, 3), "float32"))
    model.summary(print_fn=lambda *a, **k: None)


PLAIN_OPTIMIZERS = sorted(
    (c for c in vars(keras.optimizers).values() if isinstance(c, type)
     and issubclass(c, keras.optimizers.Optimizer)
     and c not in (keras.optimizers.Optimizer, keras.optimizers.LossScaleOptimizer,
                   getattr(keras.optimizers, "MultiOptimizer", None))),
    key=lambda c: c.__name__)


def test_plain_optimizer_evaluates_and_is_refused_for_training():
    """A plain Keras optimizer compiled only to evaluate (as tutorials reload a
    model) evaluates and predicts; training with any Keras optimizer on
    sharded weights is refused naming ZeroOptimizer, not TensorFlow's
    'colocate_vars_with' error from building its slots."""
    strategy = stage3(2)
    x, y = token_data()
    reference = compiled(strategy, OPTIMIZERS["adam"])
    model = compiled(strategy, lambda: keras.optimizers.Adam(), zero=False)
    model.set_weights(reference.get_weights())
    assert model.evaluate(x, y, batch_size=BATCH, verbose=0) == pytest.approx(
        reference.evaluate(x, y, batch_size=BATCH, verbose=0), abs=1e-6)
    np.testing.assert_allclose(model.predict(x, batch_size=BATCH, verbose=0),
                               reference.predict(x, batch_size=BATCH, verbose=0), atol=1e-6)
    assert not model.optimizer.built
    assert len(PLAIN_OPTIMIZERS) >= 13
    for make in [*PLAIN_OPTIMIZERS,
                 lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())]:
        with strategy.scope():
            optimizer = make()
            model.compile(optimizer=optimizer, loss="mse")
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        fix = rf"tf_zero.ZeroOptimizer\({type(inner).__name__}\("
        with pytest.raises(ValueError, match=fix):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        # A custom loop builds it itself: refused before any slot exists.
        with strategy.scope(), pytest.raises(ValueError, match=fix):
            optimizer.build(model.trainable_variables)
        assert all(v.shape.rank == 0 for v in optimizer.variables)
    np.testing.assert_array_equal(model.get_weights()[0], reference.get_weights()[0])


def test_stage3_optimizer_needs_sharded_weights():
    model = compiled(zero_strategy(2), lambda: tf_zero.ZeroOptimizer(
        keras.optimizers.Adam(), stage=3), zero=False)
    x, y = token_data()
    with pytest.raises(ValueError, match=r"ZeroStrategy\(stage=3\).scope\(\)"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


@pytest.mark.parametrize("field, value", [("persistence_threshold", -1),
                                          ("prefetch_depth", 0), ("recompute", "yes")])
def test_bad_stage3_config(field, value):
    with pytest.raises(ValueError, match=field):
        tf_zero.ZeroConfig(stage=3, **{field: value})


def test_accumulation_clipping_weight_decay_match_stage2():
    """Accumulation, global-norm clipping and weight decay work on owned shards."""
    def make():
        return tf_zero.GradientAccumulationOptimizer(
            keras.optimizers.AdamW(0.01, weight_decay=0.1, global_clipnorm=0.5), steps=2)

    sharded = fit(compiled(stage3(4), make))
    reference = fit(compiled(zero_strategy(4, stage=2), make))
    assert sharded.optimizer.iterations.numpy() == reference.optimizer.iterations.numpy() == 4
    assert max_weight_diff(sharded.get_weights(), reference.get_weights()) < 1e-6


def test_constraint_and_regularizer_see_the_full_weight():
    def make():
        keras.utils.set_random_seed(1)
        return keras.Sequential([
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 8, embeddings_regularizer=keras.regularizers.L2(0.01)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, kernel_constraint=keras.constraints.MaxNorm(0.3))])

    model = fit(compiled(stage3(3), OPTIMIZERS["adam"], make_model=make))
    reference = fit(compiled(mirrored_strategy(3), OPTIMIZERS["adam"], zero=False,
                             make_model=make))
    assert max_weight_diff(model.get_weights(), reference.get_weights()) < 1e-6


@pytest.mark.parametrize("policy, gather_dtype", [("mixed_float16", tf.float16),
                                                  ("mixed_bfloat16", tf.bfloat16)])
def test_mixed_precision_gathers_in_compute_dtype(policy, gather_dtype, monkeypatch):
    gathered, scattered = [], []
    real_gather, real_scatter = collectives.all_gather, collectives.reduce_scatter
    monkeypatch.setattr(collectives, "all_gather",
                        lambda x, *a, **k: gathered.append(x.dtype) or real_gather(x, *a, **k))
    monkeypatch.setattr(collectives, "reduce_scatter",
                        lambda x, *a, **k: scattered.append(x.dtype) or real_scatter(x, *a, **k))
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = fit(compiled(stage3(2), OPTIMIZERS["adam"], make_model=no_batch_norm))
        assert all(tf.as_dtype(v.dtype) == tf.float32 for v in model.trainable_variables)
        # Embedding, Conv1D, Dense kernels gather in the compute dtype;
        # LayerNorm's gamma and beta stay float32 (Keras: autocast=False).
        assert gathered.count(gather_dtype) >= 4 and tf.float32 in gathered
        assert set(scattered) == {tf.float32}
        gathered.clear()
        reference = fit(compiled(zero_strategy(2, stage=2), OPTIMIZERS["adam"],
                                 make_model=no_batch_norm))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Same float16 forward values (the cast happens before the gather), and
    # float32 sums in both: only reduction order differs.
    assert_weights_close(model.get_weights(), reference.get_weights())


def test_overflow_on_one_replica_skips_everywhere():
    """mixed_float16 loss scaling: a non-finite shard gradient anywhere skips the step."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = stage3(2)
        model = compiled(strategy, OPTIMIZERS["sgd"])
        before = model.get_weights()
        x, y = token_data(n=BATCH)
        y = y.astype("float32")
        y[BATCH // 2 + 1, 0] = np.inf  # only replica 1's half of the batch
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 14
        after = model.get_weights()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    trainable = {id(v) for v in model.trainable_variables}
    for v, a, b in zip(model.weights, before, after):
        if id(v) in trainable:
            np.testing.assert_array_equal(a, b)


def test_stage3_with_nothing_above_the_threshold_warns_and_trains():
    strategy = zero_strategy(2, stage=3)  # default threshold: 100,000 elements
    with pytest.warns(UserWarning, match="persistence_threshold"):
        model = fit_dense(compiled(strategy, OPTIMIZERS["adam"], make_model=mlp), epochs=1)
    reference = fit_dense(compiled(zero_strategy(2, stage=2), OPTIMIZERS["adam"],
                                   make_model=mlp), epochs=1)
    assert max_weight_diff(model.get_weights(), reference.get_weights()) == 0


class _Bilinear(keras.layers.Layer):
    """Owns a kernel and takes two float inputs (the second by keyword)."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 3), initializer="glorot_uniform")

    def call(self, x, other=None):
        return tf.matmul(x, self.kernel) * other


def _two_input_model():
    keras.utils.set_random_seed(5)
    x = keras.Input((8,))
    h = keras.layers.Dense(3)(x)  # its gradient flows only through `other`
    out = _Bilinear()(x, other=h)
    return keras.Model(x, out)


def test_recompute_passes_gradients_to_every_float_argument():
    model = fit_dense(compiled(stage3(2), OPTIMIZERS["adam"], make_model=_two_input_model),
                      epochs=1)
    assert all(tf_zero.is_sharded(v) for v in model.trainable_variables)
    reference = fit_dense(compiled(mirrored_strategy(2), OPTIMIZERS["adam"], zero=False,
                                   make_model=_two_input_model), epochs=1)
    assert_weights_close(model.get_weights(), reference.get_weights())


class _LossyDense(keras.layers.Dense):
    def call(self, x):
        out = super().call(x)
        self.add_loss(0.01 * tf.reduce_sum(tf.square(out)))
        return out


def test_a_loss_added_inside_a_recomputed_layer_is_refused():
    def make():
        keras.utils.set_random_seed(2)
        return keras.Sequential([keras.Input((8,)), _LossyDense(3)])

    x, y = regression_data()
    model = compiled(stage3(2), OPTIMIZERS["sgd"], make_model=make)
    with pytest.raises(ValueError, match="recompute=False"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    model = fit_dense(compiled(stage3(2, recompute=False), OPTIMIZERS["sgd"], make_model=make),
                      epochs=1)
    reference = fit_dense(compiled(mirrored_strategy(2), OPTIMIZERS["sgd"], zero=False,
                                   make_model=make), epochs=1)
    assert_weights_close(model.get_weights(), reference.get_weights())


def test_layers_with_random_sublayers_are_not_recomputed():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.dropout = keras.layers.Dropout(0.5, seed=1)

        def build(self, shape):
            self.kernel = self.add_weight(shape=(shape[-1], 3))

        def call(self, x, training=None):
            return self.dropout(tf.matmul(x, self.kernel), training=training)

    with stage3(2).scope():
        block = Block()
        block.build((None, 8))
    assert tf_zero.is_sharded(block.kernel)
    assert not tf_zero.weights.creator._recomputable(block)
    with stage3(2).scope():
        plain = keras.layers.Dense(3)
        plain.build((None, 8))
    assert tf_zero.weights.creator._recomputable(plain)


def test_float64_weights_reduce_in_float64(monkeypatch):
    """reduce_dtype=None: float32, or the weight's own wider dtype."""
    scattered = []
    real_scatter = collectives.reduce_scatter
    monkeypatch.setattr(collectives, "reduce_scatter",
                        lambda x, *a, **k: scattered.append(x.dtype) or real_scatter(x, *a, **k))
    keras.mixed_precision.set_global_policy("float64")
    try:
        model = fit_dense(compiled(stage3(2), OPTIMIZERS["sgd"], make_model=mlp), epochs=1)
        assert all(tf.as_dtype(v.dtype) == tf.float64 for v in model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert scattered and set(scattered) == {tf.float64}
