"""Stage 3: sharded weights train like unsharded ones, at 1/N of the memory."""

import contextlib
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (densified, max_weight_diff, mirrored_strategy, mlp, regression_data,
                      zero_strategy)

import tf_zero
from tf_zero import _private, collectives

BATCH = 24
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
}


def stage3(n, **kwargs):
    kwargs.setdefault("persistence_threshold", 0)
    return zero_strategy(n, stage=3, **kwargs)


def layered_model(seed=3, batch_norm=True):
    """Embedding, Conv1D, LayerNormalization, Dense, BatchNormalization."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([layer for layer in [
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(20, 8),
        keras.layers.Conv1D(8, 3, padding="same", activation="tanh"),
        keras.layers.LayerNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(12, activation="tanh"),
        # (Not right after a bias: BatchNormalization cancels that bias's
        # gradient, and Adam would amplify round-off noise into steps.)
        keras.layers.BatchNormalization() if batch_norm else None,
        keras.layers.Dense(3),
    ] if layer is not None])


def no_batch_norm():
    """The layered model without BatchNormalization, whose statistics depend
    on the per-replica batch: restoring at another replica count continues
    the same training only without it."""
    return layered_model(batch_norm=False)


def token_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 20, size=(n, 6)).astype("int32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def compiled(strategy, make_opt, zero=True, make_model=layered_model):
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = make_model()
        opt = make_opt()
        model.compile(optimizer=tf_zero.ZeroOptimizer(opt) if zero else densified(opt),
                      loss="mse")
    return model


def fit_dense(model, epochs=2, initial_epoch=0):
    """fit on conftest's regression data (for `mlp`)."""
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0)
    return model


def fit(model, epochs=2, initial_epoch=0):
    x, y = token_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0)
    return model


def assert_weights_close(actual, expected):
    """|a - b| <= 2e-6.

    The sums are the same but their order is not (reduce-scatter vs
    all-reduce): each step may differ by an ulp (6e-8 at 0.5), and SGD's
    momentum of 0.9 multiplies what it carries by up to 1 / (1 - 0.9) = 10,
    so after 8 steps weights agree to ~1e-6 (1.4e-6 seen at N=3), not better.
    Against stage 2, whose sums are ordered like stage 3's, the test of
    accumulation below holds 1e-6.
    """
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, atol=2e-6)


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
    assert len(model.optimizer.shards.owned) == sum(sharded.values())
    assert len(plan.buckets) > len(model.optimizer.shards.owned)
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


def test_persistent_state_is_one_nth():
    """Weights + Adam slots per replica: 1/N of the unsharded figure (within 1%)."""
    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                 keras.layers.Dense(256), keras.layers.Dense(8)])

    strategy = stage3(4)
    with strategy.scope():
        model = make()
        opt = tf_zero.ZeroOptimizer(keras.optimizers.Adam())
        opt.build(model.trainable_variables)
    report = tf_zero.memory_report(opt)
    full = report.unsharded
    assert full.weights == 4 * sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    for replica in report.replicas:
        assert replica.weight_shards == 0
        assert replica.weights == pytest.approx(full.weights / 4, rel=0.01)
        assert replica.slots == pytest.approx(full.slots / 4, rel=0.01)
        assert replica.total == pytest.approx(full.total / 4, rel=0.01)


def test_plain_optimizer_on_sharded_weights_is_refused():
    strategy = stage3(2)
    model = compiled(strategy, lambda: keras.optimizers.SGD(0.1), zero=False)
    x, y = token_data()
    with pytest.raises(ValueError, match="ZeroOptimizer"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


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


# ---- checkpoints and export ------------------------------------------------


def test_stage3_checkpoint_restores_at_stage2_and_in_a_plain_model(tmp_path):
    """Save at stage 3 / N=4, continue at stage 2 / N=2 and unsharded."""
    make = OPTIMIZERS["adam"]
    model = fit_dense(compiled(stage3(4), make, make_model=mlp), epochs=1)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    prefix = ckpt.save(str(tmp_path / "tf"))
    model.save_weights(str(tmp_path / "m.weights.h5"))
    uninterrupted = fit_dense(compiled(None, make, zero=False, make_model=mlp),
                              epochs=2).get_weights()

    for target, strategy, zero in (("stage2_n2", zero_strategy(2, stage=2), True),
                                   ("plain", None, False), ("stage3_n3", stage3(3), True)):
        for kind in ("tf", "h5"):
            restored = compiled(strategy, make, zero=zero, make_model=mlp)
            if kind == "tf":
                restored.optimizer.build(restored.trainable_variables)
                tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
                    prefix).assert_existing_objects_matched()
            else:
                restored.optimizer.build(restored.trainable_variables)
                restored.load_weights(str(tmp_path / "m.weights.h5"))
            assert max_weight_diff(restored.get_weights(), model.get_weights()) == 0
            fit_dense(restored, epochs=1, initial_epoch=1)
            diff = max_weight_diff(restored.get_weights(), uninterrupted)
            assert diff < 1e-6, (target, kind, diff)


def test_saved_slots_are_the_plain_optimizers(tmp_path):
    make = OPTIMIZERS["adam"]
    model = fit_dense(compiled(stage3(4), make, make_model=mlp), epochs=1)
    plain = fit_dense(compiled(None, make, zero=False, make_model=mlp), epochs=1)
    for ours, theirs in zip(model.optimizer.variables, plain.optimizer.variables):
        np.testing.assert_allclose(np.asarray(ours.numpy()), np.asarray(theirs.numpy()),
                                   atol=1e-6, err_msg=theirs.name)


def test_export_serves_the_trained_model(tmp_path):
    # Without BatchNormalization: under MirroredStrategy Keras keeps moving
    # statistics per replica, so predict() itself differs across replicas.
    model = fit(compiled(stage3(4), OPTIMIZERS["adam"], make_model=no_batch_norm), epochs=1)
    x, _ = token_data(seed=2)
    expected = model.predict(x, batch_size=BATCH, verbose=0)
    model.export(str(tmp_path / "export"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "export"))  # keep it: it owns the variables
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, atol=1e-5)
    fit(model, epochs=1, initial_epoch=1)  # exporting again sees the new weights
    expected = model.predict(x, batch_size=BATCH, verbose=0)
    model.export(str(tmp_path / "export2"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "export2"))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, atol=1e-5)
    tf.saved_model.save(model, str(tmp_path / "raw"))
    assert tf.saved_model.load(str(tmp_path / "raw")) is not None


# ---- memory that does not grow with depth ------------------------------------


def _step_peak(depth, recompute, width=256):
    """Peak allocator bytes above steady state during one training step."""
    strategy = zero_strategy(4, stage=3, persistence_threshold=0, recompute=recompute,
                             prefetch_depth=1)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))] + [
            keras.layers.Dense(width, activation="tanh", use_bias=False)
            for _ in range(depth)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.SGD(0.01)),
                      loss="mse")
    x = np.ones((8, width), "float32")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)  # trace and build
    peaks = []
    for _ in range(3):  # the allocator is shared with whatever else runs: take the least
        gc.collect()
        tf.config.experimental.reset_memory_stats("CPU:0")
        steady = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.fit(x, x, batch_size=8, epochs=1, verbose=0)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - steady)
    return min(peaks)


def test_training_leaves_the_allocator_holding_the_state_and_little_else():
    # Shards and slots get buffers of their own at build: were they first
    # copied inside the first step (copy-on-write), TensorFlow's BFC allocator
    # could give each a free block of up to twice its size among the step's
    # temporaries, kept for the rest of the run.
    strategy = zero_strategy(4, stage=3, persistence_threshold=0, prefetch_depth=1)
    gc.collect()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((512,))] + [
            keras.layers.Dense(512, use_bias=False) for _ in range(6)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(1e-3)), loss="mse")
    x = np.ones((32, 512), "float32")
    model.fit(x, x, batch_size=32, epochs=3, verbose=0)
    gc.collect()
    held = tf.config.experimental.get_memory_info("CPU:0")["current"] - before
    state = sum(r.total for r in tf_zero.memory_report(model.optimizer, model).replicas)
    print(f"allocator after training {held / 2**20:.2f} MiB, state {state / 2**20:.2f} MiB")
    assert state == 6 * 512 * 512 * 4 * 3  # weights + Adam's two slots, sharded
    assert held < 1.1 * state + (1 << 20)


def test_step_peak_does_not_grow_with_depth():
    layer_bytes = 256 * 256 * 4
    with_recompute = {d: _step_peak(d, True) for d in (8, 16)}
    without = {d: _step_peak(d, False) for d in (8, 16)}
    print(f"peak above steady state (MiB), recompute: "
          f"{ {d: round(v / 2**20, 2) for d, v in with_recompute.items()} }, "
          f"without: { {d: round(v / 2**20, 2) for d, v in without.items()} }")
    # 4 replicas x (a layer being used + the one gathered next) at most.
    assert with_recompute[16] - with_recompute[8] < 2 * 4 * layer_bytes
    # Without recompute every gathered weight lives until backward: the test
    # can tell the difference.
    assert without[16] - without[8] > 8 * 4 * layer_bytes * 0.5  # 8 more layers x 4 replicas


@pytest.mark.parametrize("prefetch_depth, distinct, recompute",
                         [(1, 4, True), (2, 3, True), (8, 1, True), (1, 4, False)])
def test_gathers_wait_for_the_prefetch_window(prefetch_depth, distinct, recompute):
    """The shard read of layer i waits for the input of layer i - depth + 1."""
    strategy = zero_strategy(2, stage=3, persistence_threshold=0, prefetch_depth=prefetch_depth,
                             recompute=recompute)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,))] + [
            keras.layers.Dense(4, use_bias=False) for _ in range(4)])

    @tf.function
    def forward(x):
        return strategy.run(lambda xr: model(xr, training=True), args=(x,))

    graph = forward.get_concrete_function(tf.TensorSpec([2, 4], tf.float32)).graph
    waits = {}
    for op in graph.get_operations():
        if op.type == "ReadVariableOp" and op.control_inputs:
            waits.setdefault(op.device, set()).update(c.name for c in op.control_inputs)
    assert len(waits) == 2  # both replicas
    for names in waits.values():
        # depth 1: each layer waits for its own input (4 distinct); depth 2:
        # layers 0 and 1 wait for the model input, then one each; depth >= 4:
        # everything may be gathered up front.
        assert len(names) == distinct, names


def test_keras_file_of_a_stage3_model_loads_anywhere(tmp_path):
    """model.save(.keras) at stage 3 -> load_model with no strategy and at stage 3 / N=2."""
    model = fit_dense(compiled(stage3(4), OPTIMIZERS["adam"], make_model=mlp), epochs=1)
    model.save(str(tmp_path / "m.keras"))
    plain = keras.models.load_model(str(tmp_path / "m.keras"))
    assert max_weight_diff(plain.get_weights(), model.get_weights()) == 0
    for ours, theirs in zip(model.optimizer.variables, plain.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(ours.numpy()), np.asarray(theirs.numpy()))
    with stage3(2).scope():
        again = keras.models.load_model(str(tmp_path / "m.keras"))
    assert all(tf_zero.is_sharded(v) for v in again.trainable_variables)
    assert max_weight_diff(again.get_weights(), model.get_weights()) == 0
    fit_dense(again, epochs=1, initial_epoch=1)
    fit_dense(plain, epochs=1, initial_epoch=1)
    assert max_weight_diff(again.get_weights(), plain.get_weights()) < 1e-6


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
    assert not tf_zero.stage3._recomputable(block)
    with stage3(2).scope():
        plain = keras.layers.Dense(3)
        plain.build((None, 8))
    assert tf_zero.stage3._recomputable(plain)


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
