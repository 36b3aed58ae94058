"""16-bit working weights over float32 master shards (stages 1-2 under a mixed
policy): the same numbers as float32 working weights, the user's view in
float32, checkpoints that move both ways, 16-bit publish, and the bytes."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, regression_data, zero_strategy

import tf_zero
from tf_zero import _private

BATCH = 24


def model_fn():
    """Dense layers (working copies), a LayerNormalization (read in float32), a
    layer whose kernel is regularized (kept float32; its bias is a working copy)
    and a float32 output layer (kept float32)."""
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(33, activation="tanh", name="first"),
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dense(17, activation="tanh", name="second"),
        keras.layers.Dense(9, kernel_regularizer=keras.regularizers.L2(1e-3), name="penalized"),
        keras.layers.Dense(3, dtype="float32", name="out")])


# Named layers: the set does not depend on how many models the process built before.
WORKING = {"first/kernel", "first/bias", "second/kernel", "second/bias", "penalized/bias"}


def strategy(n, stage, param_dtype):
    return zero_strategy(n, stage=stage, persistence_threshold=0, param_dtype=param_dtype)


def compiled(n, stage, param_dtype, make=lambda: keras.optimizers.Adam(0.01), steps=1):
    with strategy(n, stage, param_dtype).scope():
        model = model_fn()
        opt = tf_zero.ZeroOptimizer(make())
        if steps > 1:
            opt = tf_zero.GradientAccumulationOptimizer(opt, steps)
        model.compile(optimizer=opt, loss="mse")
    return model


def fit(model, epochs=2, initial_epoch=0):
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=initial_epoch + epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0)
    return model


def short_path(variable):
    return variable.path.split("/", 1)[1]


# Each policy at N = 1, 2, 3 and 4, each at stages 1 and 2 (pairwise).
CASES = [("mixed_bfloat16", 1, 1), ("mixed_bfloat16", 2, 2), ("mixed_bfloat16", 3, 1),
         ("mixed_bfloat16", 4, 2), ("mixed_float16", 1, 2), ("mixed_float16", 2, 1),
         ("mixed_float16", 3, 2), ("mixed_float16", 4, 1)]


@pytest.mark.parametrize("name, n, stage", CASES)
def test_working_copies_train_bit_for_bit_as_float32_working_weights(policy, name, n, stage):
    """The working copy holds what Keras' policy computes from the master, and
    its gradient is Keras' gradient of that cast: the trained weights are the
    float32 working weights' bit for bit (loss scaling included)."""
    policy(name)
    working, plain = compiled(n, stage, "compute"), compiled(n, stage, "float32")
    assert {short_path(v) for v in working.trainable_variables
            if tf_zero.has_working_copy(v)} == WORKING
    assert not any(tf_zero.has_working_copy(v) for v in plain.trainable_variables)
    for w, p in zip(fit(working).get_weights(), fit(plain).get_weights()):
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, p)
    assert_replicas_identical(working)
    copies = [_private.sharded_storage(v) for v in working.trainable_variables
              if tf_zero.has_working_copy(v)]
    dtype = keras.mixed_precision.global_policy().compute_dtype
    assert {c.working.dtype.name for c in copies} == {dtype}
    for copy in copies:  # every replica's copy is the master, cast
        master = copy.full_value().numpy()
        for component in _private.components(copy.working):
            np.testing.assert_array_equal(
                component.numpy(), tf.cast(master, dtype).numpy())


def test_accumulation_and_an_overflow_match_float32_working_weights(policy):
    policy("mixed_float16")
    models = [compiled(4, 1, p, steps=2) for p in ("compute", "float32")]
    x, y = regression_data()
    x[30:36] = 1e5  # inf in float16 on one replica of one micro-step
    for model in models:
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for w, p in zip(*(m.get_weights() for m in models)):
        np.testing.assert_array_equal(w, p)
    assert models[0].optimizer.iterations.numpy() == models[1].optimizer.iterations.numpy()


def test_the_users_view_is_float32(policy):
    policy("mixed_bfloat16")
    model = fit(compiled(2, 2, "compute"), epochs=1)
    weights = model.get_weights()
    assert all(w.dtype == np.float32 for w in weights)
    assert all(v.dtype == "float32" for v in model.weights)
    kernel = model.layers[0].kernel
    storage = _private.sharded_storage(kernel)
    np.testing.assert_array_equal(kernel.numpy(), storage.full_value().numpy())
    # The master holds more than the 16-bit copy: float32 values a cast loses.
    assert not np.array_equal(kernel.numpy(), tf.cast(tf.cast(kernel.numpy(), "bfloat16"),
                                                      "float32").numpy())
    new = [w + 1.0 for w in weights]
    model.set_weights(new)
    for w, v in zip(new, model.get_weights()):
        np.testing.assert_array_equal(w, v)
    np.testing.assert_array_equal(storage.working.numpy(),
                                  tf.cast(new[0], "bfloat16").numpy())


@pytest.mark.parametrize("stage", [1, 2])
def test_publish_gathers_sixteen_bit_values(policy, stage):
    """Read from the traced step: the all-gathers that publish working weights
    take 16-bit values (bfloat16 moves as float16 bits on CPU), half the bytes
    of float32 working weights; the buckets of float32 weights still move
    float32."""
    policy("mixed_bfloat16")
    published = {p: publish_gathers(compiled(4, stage, p)) for p in ("compute", "float32")}
    sixteen = sum(b for dtype, b in published["compute"] if dtype == "float16")
    thirty_two = sum(b for dtype, b in published["compute"] if dtype == "float32")
    assert sixteen > 0 and thirty_two > 0
    assert {d for d, _ in published["float32"]} == {"float32"}
    # The same elements (up to each working weight's own padding, under one
    # element per shard, on each of the 4 replicas' ops): the working
    # weights' now in 2 bytes each.
    elements = sixteen // 2 + thirty_two // 4
    assert abs(elements - sum(b for _, b in published["float32"]) // 4) <= len(WORKING) * 4
    assert sixteen + thirty_two < sum(b for _, b in published["float32"]) * 0.7


def publish_gathers(model):
    """(input dtype, input bytes) of each all-gather under `zero_publish` in one
    traced training step of `model` (one op per replica)."""
    strategy = model.distribute_strategy
    variables = model.trainable_variables
    model.optimizer.build(variables)

    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(tf.cast(model(x), "float32") - y))
            model.optimizer.apply(tape.gradient(loss, variables), variables)
        strategy.run(replica, args=(x, y))

    graph = step.get_concrete_function(tf.TensorSpec([6, 8]), tf.TensorSpec([6, 3])).graph
    return [(op.inputs[0].dtype.name,
             op.inputs[0].shape.num_elements() * op.inputs[0].dtype.size)
            for op in graph.get_operations()
            if op.type == "CollectiveGatherV2" and "zero_publish" in op.name]


def state_of(model):
    return [*model.get_weights(), *(np.asarray(v.numpy()) for v in model.optimizer.variables)]


def assert_same_state(model, saved):
    for a, b in zip(state_of(model), saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_move_both_ways_at_any_replica_count_and_into_plain_keras(policy, tmp_path):
    """Saved from working weights (N=4, stage 2): restored bit for bit into
    float32 working weights at N=2 stage 1, into working weights at N=3 from a
    Keras file and a `.keras` model, into plain Keras with no strategy; and a
    float32-working-weights checkpoint into working weights at N=3."""
    policy("mixed_bfloat16")
    source = fit(compiled(4, 2, "compute"), epochs=1)
    saved = state_of(source)
    tf_zero.Checkpoint(model=source, optimizer=source.optimizer).write(str(tmp_path / "ckpt"))
    source.save_weights(str(tmp_path / "m.weights.h5"))
    source.save(str(tmp_path / "m.keras"))

    def built(n, stage, param_dtype):
        model = compiled(n, stage, param_dtype)
        model.optimizer.build(model.trainable_variables)
        return model

    into_float32 = built(2, 1, "float32")
    tf_zero.Checkpoint(model=into_float32, optimizer=into_float32.optimizer).read(
        str(tmp_path / "ckpt")).assert_existing_objects_matched()
    assert_same_state(into_float32, saved)

    from_h5 = built(3, 2, "compute")
    from_h5.load_weights(str(tmp_path / "m.weights.h5"))
    assert_same_state(from_h5, saved)
    with strategy(3, 2, "compute").scope():
        loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert any(tf_zero.has_working_copy(v) for v in loaded.trainable_variables)
    assert_same_state(loaded, saved)
    np.testing.assert_array_equal(  # and the working copies follow the restored master
        _private.sharded_storage(loaded.layers[0].kernel).working.numpy(),
        tf.cast(saved[0], "bfloat16").numpy())

    plain = model_fn()
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain, optimizer=plain.optimizer).read(
        str(tmp_path / "ckpt")).assert_consumed()
    assert_same_state(plain, saved)

    float32_source = fit(compiled(2, 1, "float32"), epochs=1)
    tf_zero.Checkpoint(model=float32_source, optimizer=float32_source.optimizer).write(
        str(tmp_path / "float32"))
    into_working = built(3, 2, "compute")
    tf_zero.Checkpoint(model=into_working, optimizer=into_working.optimizer).read(
        str(tmp_path / "float32")).assert_existing_objects_matched()
    assert_same_state(into_working, state_of(float32_source))


def test_a_restored_run_continues_as_the_uninterrupted_one(policy, tmp_path):
    """Resumed from a checkpoint of its first epoch, a working-weights run ends
    bit for bit where the uninterrupted run ends (same N, stage)."""
    policy("mixed_bfloat16")
    first = fit(compiled(4, 2, "compute"), epochs=1)
    tf_zero.Checkpoint(model=first, optimizer=first.optimizer).write(str(tmp_path / "c"))
    resumed = compiled(4, 2, "compute")
    resumed.optimizer.build(resumed.trainable_variables)
    tf_zero.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(str(tmp_path / "c"))
    fit(resumed, epochs=1, initial_epoch=1)
    for a, b in zip(resumed.get_weights(), fit(compiled(4, 2, "compute")).get_weights()):
        np.testing.assert_array_equal(a, b)


def test_export_serves_the_float32_master(policy, tmp_path):
    policy("mixed_bfloat16")
    model = fit(compiled(2, 2, "compute"), epochs=1)
    model.export(str(tmp_path / "served"), verbose=False)
    x, _ = regression_data(8)
    loaded = tf.saved_model.load(str(tmp_path / "served"))  # keep it: it owns the variables
    served = loaded.serve(tf.constant(x)).numpy()
    # The export holds the float32 master, cast by the policy at each use: as
    # the working copies are.
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-6)
    plain = model_fn()  # the same policy, float32 variables: Keras' own model
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(served, plain(x).numpy(), atol=1e-6)


def test_whole_variable_optimizers_name_the_setting_to_use(policy):
    policy("mixed_bfloat16")
    model = compiled(2, 2, "compute", make=lambda: keras.optimizers.Lamb(0.01))
    with pytest.raises(ValueError, match="param_dtype='float32'"):
        model.optimizer.build(model.trainable_variables)
    model = compiled(2, 2, "float32", make=lambda: keras.optimizers.Lamb(0.01))
    fit(model, epochs=1)


def test_a_plain_optimizer_on_working_weights_names_zero_optimizer(policy):
    policy("mixed_bfloat16")
    with strategy(2, 2, "compute").scope():
        model = model_fn()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="ZeroOptimizer"):
        fit(model, epochs=1)


def test_bad_param_dtype_names_the_choices():
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        tf_zero.ZeroConfig(param_dtype="bfloat16")


@pytest.mark.parametrize("stage", [1, 2])
def test_measured_state_is_the_mixed_formula(policy, stage):
    """memory_report's per-replica bytes of a model whose weights all have
    working copies: 2 bytes of working copy + 4/N of master + 8/N of Adam's
    slots per parameter, as `estimate_memory(accounting="mixed")` extrapolates
    (the shards' padding apart)."""
    policy("mixed_bfloat16")
    with strategy(4, stage, "compute").scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(96),
                                  keras.layers.Dense(80), keras.layers.Dense(8)])
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    model.optimizer.build(model.trainable_variables)
    assert all(tf_zero.has_working_copy(v) for v in model.trainable_variables)
    params = model.count_params()
    replica = tf_zero.memory_report(model.optimizer).max_replica
    estimate = tf_zero.estimate_memory(params, 4, stage, "adam", accounting="mixed")
    assert replica.weights == estimate.weights == 2 * params
    padding = 4 * (4 + 8) * len(model.trainable_variables)  # < one element per variable
    assert 0 <= replica.weight_shards + replica.slots - estimate.optimizer_states <= padding
    keras_layout = tf_zero.estimate_memory(params, 4, stage, "adam", accounting="keras")
    # (2 + 12/4) / (4 + 12/4) of the float32 working weights' state.
    assert replica.total == pytest.approx(
        5 / 7 * (keras_layout.weights + keras_layout.optimizer_states), rel=1e-3)


@pytest.mark.parametrize("name, precision, stage, n", [
    ("gpt2", "mixed_bfloat16", 2, 4), ("llama", "mixed_bfloat16", 1, 3),
    ("gemma", "mixed_float16", 2, 2)])
def test_keras_hub_models_train_as_with_float32_working_weights(name, precision, stage, n):
    """keras_hub GPT-2, Llama and Gemma (benchmarks/zoo.py), 3 `fit` steps:
    16-bit working copies where their layers autocast, the trained weights
    and losses those of float32 working weights bit for bit."""
    from zoo import train

    from conftest import devices

    working = train(name, f"stage{stage}", devices(n), precision)
    plain = train(name, f"stage{stage}_float32", devices(n), precision)
    assert working.working_fraction > 0.5 and plain.working_fraction == 0
    assert working.losses == plain.losses
    for a, b in zip(working.weights, plain.weights):
        np.testing.assert_array_equal(a, b)
