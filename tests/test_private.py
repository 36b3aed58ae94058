"""The private TensorFlow entry points tf_zero relies on still behave."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored_strategy, zero_strategy

from tf_zero import _private


def test_version_is_checked():
    _private.check_tensorflow_version("2.21.3")
    with pytest.raises(RuntimeError, match="pip install"):
        _private.check_tensorflow_version("2.99.0")


def test_collective_key_bases_are_unique():
    bases = {_private.next_collective_key_base() for _ in range(5)}
    assert len(bases) == 5


def test_launchers_exist_for_every_local_replica():
    strategy = zero_strategy(4)
    launchers = strategy.extended._cross_device_ops._launchers
    assert len(launchers) == 4
    assert _private.local_replica_ranks(strategy) == [0, 1, 2, 3]

    @tf.function
    def probe():
        def fn():
            launcher = _private.collective_launcher(strategy)
            return tf.constant(launcher._group_size) * 100 + _private.global_replica_id()
        return strategy.run(fn)

    got = [int(t) for t in strategy.experimental_local_results(probe())]
    assert got == [400, 401, 402, 403]


def test_local_component_writes_one_replica_only():
    strategy = zero_strategy(2)
    with strategy.scope():
        v = keras.Variable(np.zeros(2, np.float32), trainable=False,
                           synchronization="on_read", aggregation="only_first_replica")

    @tf.function
    def write():
        def fn():
            rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                          tf.float32)
            _private.local_component(v).assign(tf.fill([2], rid + 1.0))
        strategy.run(fn)

    write()
    assert [c.numpy().tolist() for c in _private.components(v)] == [[1.0, 1.0], [2.0, 2.0]]
    assert _private.is_sync_on_read(v) and _private.is_distributed_variable(v)


def test_plain_keras_optimizers_keep_their_tf_update_path():
    """The _backend_update_step hook only changes optimizers tf_zero drives."""
    opt = keras.optimizers.SGD()
    assert not getattr(opt, "_tf_zero_local_update", False)
    _private.mark_local_update(opt)
    assert opt._tf_zero_local_update


def test_layer_adding_weight_finds_the_layer_and_autocast():
    seen = []

    def creator(next_creator, **kwargs):
        seen.append(_private.layer_adding_weight())
        return next_creator(**kwargs)

    layer = keras.layers.LayerNormalization()  # gamma and beta: autocast=False
    dense = keras.layers.Dense(2)
    with tf.variable_creator_scope(creator):
        layer.build((None, 3))
        dense.build((None, 3))
        keras.Variable(np.zeros(2, "float32"))  # no layer
    assert seen[:2] == [(layer, False)] * 2
    assert seen[2:4] == [(dense, True)] * 2
    assert seen[4] == (None, True)


def test_autocast_scope_and_save_context():
    assert _private.autocast_dtype() is None
    with _private.autocast_scope("float16"):
        assert _private.autocast_dtype() == "float16"
    assert _private.autocast_dtype() is None
    assert not _private.in_save_context()
    with tf.Graph().as_default(), _private.eager_mode():
        assert tf.executing_eagerly()


def test_keras_writers_are_routed_and_single_worker_saves_are_keras_own(tmp_path):
    """The three Keras writers go through tf_zero.saving; one worker writes in place."""
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.saving import saving_lib

    for writer in (saving_lib.save_weights_only, saving_lib.save_model,
                   legacy_h5_format.save_model_to_hdf5):
        assert hasattr(writer, "__wrapped__")
    assert _private.worker_count(zero_strategy(2)) == 1
    assert _private.worker_index(zero_strategy(2)) == 0 and _private.is_chief(zero_strategy(2))
    with zero_strategy(2).scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save_weights(str(tmp_path / "w.weights.h5"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.weights.h5"]


def test_fit_exit_hooks_run_when_fit_raises():
    released = []

    class Fail(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            _private.on_fit_exit(lambda: released.append(True))

        def on_train_batch_begin(self, batch, logs=None):
            raise RuntimeError("stop")

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(RuntimeError, match="stop"):
        model.fit(np.zeros((4, 3)), np.zeros((4, 2)), verbose=0, callbacks=[Fail()])
    assert released == [True]


def test_plain_variables_on_one_replica_and_keras_views():
    strategy = zero_strategy(2)
    with strategy.scope():
        mirrored = keras.Variable(np.ones((2, 3), np.float32), name="kernel")
        with tf.variable_creator_scope(_private.local_variable_creator("/cpu:1")):
            local = tf.Variable(tf.zeros([4]), name="slot")
    assert not _private.is_distributed_variable(local)
    assert local.device.endswith("CPU:1")
    view = _private.keras_view(_private.components(mirrored)[1], like=mirrored)
    assert view.path == mirrored.path and view.name == mirrored.name
    view.assign(np.full((2, 3), 5.0, np.float32))  # writes replica 1's copy only
    assert [float(c.numpy()[0, 0]) for c in _private.components(mirrored)] == [1.0, 5.0]
    assert _private.is_composite_tensor(tf.sparse.from_dense([[0.0, 1.0]]))
    assert not _private.is_composite_tensor(tf.zeros([2]))


def test_stand_ins_in_a_graph_allocate_nothing():
    like = keras.Variable(np.ones((3, 5), np.float32), name="kernel")
    with tf.Graph().as_default() as graph:
        stand_in = _private.stand_in(like)
        assert stand_in.path == like.path and stand_in.name == like.name
        assert tuple(stand_in.shape) == (3, 5) and stand_in.dtype == like.dtype
        assert not tf.executing_eagerly() and stand_in.value.graph is graph


def test_sliced_saveables_restore_every_slice(tmp_path):
    """TensorFlow's `_serialize_to_tensors` restore passes only the first slice
    back; the SaveableObject path that tf_zero uses restores all, in order, and
    `sliced_objects` finds such objects under the checkpoint's keys."""

    class Sliced(_private.Trackable):
        def __init__(self, specs, values):
            self.specs, self.values, self.restored = specs, values, None

        def checkpoint_slices(self):
            return [(s, (lambda v=v: tf.constant(v)), tf.float32, "/cpu:0")
                    for s, v in zip(self.specs, self.values)]

        def restore_slices(self, restored):
            self.restored = restored

        def _gather_saveables_for_checkpoint(self):
            return _private.sliced_saveables(self)

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    saved = Sliced(["4 6 0,1:3,3", "4 6 0,1:0,3", "4 6 1,3:-"], [x[:1, 3:], x[:1, :3], x[1:]])
    root = tf.train.Checkpoint(s=saved)
    assert _private.sliced_objects(root, lambda o: isinstance(o, Sliced)) == [
        ("s/.ATTRIBUTES/VARIABLE_VALUE", saved)]
    _private.serialize_only(root)  # reads, writes nothing
    prefix = root.write(str(tmp_path / "c"))
    restored = Sliced(["4 6 0,2:-", "4 6 2,2:-"], [x[:2], x[2:]])
    tf.train.Checkpoint(s=restored).read(prefix).assert_consumed()
    np.testing.assert_array_equal(restored.restored["4 6 0,2:-"], x[:2])
    np.testing.assert_array_equal(restored.restored["4 6 2,2:-"], x[2:])
    plain = tf.Variable(tf.zeros([4, 6]))
    tf.train.Checkpoint(s=plain).read(prefix).assert_consumed()
    np.testing.assert_array_equal(plain.numpy(), x)


def _allocated():
    gc.collect()
    return tf.config.experimental.get_memory_info("CPU:0")["current"]


def test_own_buffers_gives_each_copy_a_buffer_of_its_own():
    # TensorFlow 2.21 lets a mirrored variable's copies on logical CPUs share
    # their initial value's buffer until written; own_buffers gives each its
    # own now, values unchanged. (If TensorFlow stops sharing, the first
    # assertion says own_buffers is no longer needed.)
    n, copy = 1 << 20, 4 << 20  # 4 MiB per copy
    before = _allocated()
    with mirrored_strategy(4).scope():
        v = tf.Variable(tf.random.stateless_uniform([n], seed=[1, 2]))
    shared = _allocated() - before
    _private.own_buffers([v])
    owned = _allocated() - before
    assert shared < 2 * copy, shared
    assert 4 * copy <= owned < 5 * copy, owned
    expected = tf.random.stateless_uniform([n], seed=[1, 2]).numpy()
    for comp in _private.components(v):
        np.testing.assert_array_equal(comp.numpy(), expected)
