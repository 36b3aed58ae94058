"""The private TensorFlow entry points tf_zero relies on still behave."""

import gc
import threading
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored_strategy, zero_strategy

import tf_zero
from tf_zero import _private


def test_versions_are_checked_by_combination():
    for tf_minor, keras_minors in _private.CHECKED_COMBINATIONS.items():
        for keras_minor in keras_minors:
            _private.check_versions(f"{tf_minor}.3", f"{keras_minor}.2")
    assert _private.CHECKED_TF_VERSIONS == ("2.19", "2.20", "2.21")
    assert _private.CHECKED_KERAS_VERSIONS == ("3.10", "3.11", "3.15")
    with pytest.raises(RuntimeError, match=r"pip install 'tensorflow==2\.21\.\*' 'keras==3\.15\.\*'"):
        _private.check_versions("2.99.0", "3.15.1")
    with pytest.raises(RuntimeError, match=r"TensorFlow 2\.19\.1 with Keras 3\.13\.0 is installed"
                                           r".*pip install 'keras==3\.15\.\*'"):
        _private.check_versions("2.19.1", "3.13.0")
    with pytest.raises(RuntimeError, match=r"pip install 'keras==3\.15\.\*'"):
        _private.check_versions("2.20.0", "3.10.0")  # each alone tested, never together
    with pytest.raises(RuntimeError, match="synchronization"):
        _private.check_versions("2.19.1", "3.9.2")


def test_the_installed_combination_was_checked():
    tf_minor = ".".join(tf.__version__.split(".")[:2])
    keras_minor = ".".join(keras.__version__.split(".")[:2])
    assert keras_minor in _private.CHECKED_COMBINATIONS[tf_minor]


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


def test_is_multi_optimizer_on_every_keras():
    """False for a plain optimizer, also on a Keras without MultiOptimizer (before 3.15)."""
    assert not _private.is_multi_optimizer(keras.optimizers.Adam())
    if hasattr(keras.optimizers, "MultiOptimizer"):
        multi = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(), {}))
        assert _private.is_multi_optimizer(multi)


def test_epoch_items_of_every_keras_read_alike():
    """Keras 3.11 on yields (first, last, iterator); Keras 3.10 (first, iterator)."""
    it = iter(())
    assert _private.epoch_item((4, 5, it), 2) == (4, 5, it)
    assert _private.epoch_item((4, it), 2) == (4, 5, it)
    assert _private.epoch_item((4, it), 1) == (4, 4, it)


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


@pytest.mark.parametrize("make_strategy", [zero_strategy, mirrored_strategy],
                         ids=["zero", "mirrored"])
def test_dataset_iterators_are_released_off_the_training_thread(monkeypatch, make_strategy):
    """Keras makes a dataset iterator per epoch (and per evaluate and predict).

    Releasing one can block for up to a minute in TensorFlow (see
    `keras_training`): every one must be released, on a thread that is not
    the one calling fit and that the interpreter waits for at exit.
    """
    from tensorflow.python.distribute import input_lib

    made, released = [], []
    iterate = input_lib.DistributedDataset.__iter__

    def tracked(self):
        iterator = iterate(self)
        made.append(weakref.ref(iterator))
        weakref.finalize(iterator, lambda: released.append(threading.current_thread()))
        return iterator

    monkeypatch.setattr(input_lib.DistributedDataset, "__iter__", tracked)
    with make_strategy(2).scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((16, 3), np.float32), np.ones((16, 2), np.float32)
    history = model.fit(x, y, batch_size=4, epochs=3, validation_data=(x, y), verbose=0)
    assert len(history.history["val_loss"]) == 3
    model.evaluate(x, y, batch_size=4, verbose=0)
    model.predict(x, batch_size=4, verbose=0)
    for thread in threading.enumerate():
        if thread.name == "tf_zero_iterator_release":
            thread.join(timeout=120)
    assert len(made) >= 9  # 3 epochs, 3 validations, evaluate, predict, and more
    assert all(ref() is None for ref in made), "an iterator was never released"
    assert released and threading.main_thread() not in released
    assert not any(thread.daemon for thread in released)


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
    prefix = root.write(str(tmp_path / "c"))
    # A snapshot reads every value when it is taken and writes them later,
    # whatever the variables hold by then (an in-place update copies first).
    counter = tf.Variable([1.0, 2.0])
    write = _private.snapshot(tf.train.Checkpoint(s=saved, counter=counter))
    counter.assign([5.0, 6.0])
    counter.assign_add([1.0, 1.0])
    write(str(tmp_path / "snap"))
    later = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(counter=later).read(str(tmp_path / "snap")).expect_partial()
    np.testing.assert_array_equal(later.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(counter.numpy(), [6.0, 7.0])
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


def test_replace_buffer_frees_the_old_value_before_the_new_is_made():
    n, size = 1 << 20, 4 << 20
    with tf.device("/cpu:1"):
        v = tf.Variable(tf.random.stateless_uniform([n], seed=[1, 2]))
    held = _allocated()
    during = []

    def make_value():
        during.append(_allocated())
        return tf.fill([n], 3.0)

    _private.replace_buffer(v, make_value)
    assert during[0] <= held - size, (held, during)  # the old buffer was gone
    np.testing.assert_array_equal(v.numpy(), np.full([n], 3.0, np.float32))
    assert v.device.endswith("CPU:1")
    with pytest.raises(ValueError, match="replace_buffer"):
        _private.replace_buffer(v, lambda: tf.zeros([n + 1]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32"])
def test_host_copy_copies_a_view_once_aligned_and_padded(dtype):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    base = np.arange(1001).astype(np_dtype)
    view = base[3:700]  # a view at an offset no kernel would align
    t = _private.host_copy(view, 800)
    assert t.dtype == tf.as_dtype(dtype) and t.shape == [800]
    base[3:700] = 0  # the tensor owns its values, not a view of `base`
    expected = np.concatenate([np.arange(3, 700), np.zeros(103)]).astype(np_dtype)
    np.testing.assert_array_equal(t.numpy(), expected)
    with tf.device("/cpu:2"):
        v = tf.Variable(tf.zeros([800], dtype))
    _private.replace_buffer(v, lambda: _private.host_copy(view, 800))
    v.assign_add(tf.ones([800], dtype))  # kernels run on the adopted buffer
    np.testing.assert_array_equal(v.numpy(), (np.zeros(800) + 1).astype(np_dtype))


def test_every_keras_patch_is_one_row_of_the_table_and_installed_once():
    """`import tf_zero` replaced exactly these Keras attributes, each by its
    row's replacement (which keeps the original it calls), and installing
    again changes nothing."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from tf_zero._private import patches

    targets = [(p.owner, p.name) for p in patches.PATCHES]
    assert len(set(targets)) == len(targets)
    assert sorted(p.target.rsplit(".", 2)[-2] + "." + p.name for p in patches.PATCHES) == sorted([
        "TFOptimizer._backend_update_step", "TFOptimizer.build",
        "LossScaleOptimizer._tf_apply", "TensorFlowTrainer._maybe_symbolic_build",
        "Variable.assign",
        "TensorFlowTrainer.make_train_function", "TensorFlowTrainer.fit",
        "TFEpochIterator._enumerate_iterator", "TensorFlowTrainer.evaluate",
        "TensorFlowTrainer.predict", "multi_device_iterator_ops._create_device_dataset",
        "saving_lib.save_weights_only",
        "saving_lib.save_model", "legacy_h5_format.save_model_to_hdf5",
        *(f"BackupAndRestore.{hook}" for hook in (
            "on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
            "on_train_batch_end", "on_train_end")),
        "ModelCheckpoint.on_train_begin"])
    before = [getattr(p.owner, p.name) for p in patches.PATCHES]
    assert all(getattr(fn, "__wrapped__", None) is not None or fn.__module__.startswith("tf_zero")
               for fn in before)
    assert tf_trainer.TensorFlowTrainer.fit.__module__ == "tf_zero._private.keras_training"
    patches.install(backup_engine=tf_zero.callbacks.BackupAndRestore,
                    save_router=tf_zero.saving.route)
    assert [getattr(p.owner, p.name) for p in patches.PATCHES] == before


def test_train_step_function_is_the_tf_function_fit_runs():
    strategy = mirrored_strategy(2)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32), batch_size=4,
              verbose=0)
    fits = model.train_function
    step = _private.train_step_function(model)
    # A function of fit's making, with no trace history; fit's own is kept.
    assert hasattr(step, "get_concrete_function") and model.train_function is fits
    assert step.experimental_get_tracing_count() == 0
    assert _private.train_step_function(model) is not step
    with strategy.scope():
        eager = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        eager.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    with pytest.raises(ValueError, match="without run_eagerly"):
        _private.train_step_function(eager)


def test_function_graph_reads_traced_and_imported_bodies():
    @tf.function
    def f(x):
        return tf.cond(x > 0, lambda: x * 2.0, lambda: x)

    traced = f.get_concrete_function(tf.TensorSpec([], tf.float32)).graph
    imported = tf.Graph()
    with imported.as_default():
        tf.graph_util.import_graph_def(traced.as_graph_def(), name="")
    for graph in (traced, imported):
        (cond,) = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
        name = cond.get_attr("then_branch").name
        assert _private.defines_function(graph, name)
        body = _private.function_graph(graph, name)
        assert "Mul" in [op.type for op in body.get_operations()]
    assert _private.function_graph(traced, "no_such_function") is None
