"""Checkpoints written by tf_zero 0.1.0, and on other TensorFlow and Keras
versions, restore into the current package.

`tests/fixtures/` holds what `make_release_checkpoints.py` wrote (N=4):
`release-0.1.0/` with that release on TensorFlow 2.21 and Keras 3.15,
`tf2.19-keras3.10/` on TensorFlow 2.19.1 and Keras 3.10.0. Restored here at
another replica count (and stage), every weight and optimizer variable must
equal the values saved beside it, bit for bit, and a backup cut short
mid-epoch must resume into the uninterrupted run. The compat matrix
(`tests/compat/run_matrix.sh`) runs this file on every TensorFlow and Keras
it admits, so each direction between versions is checked.
"""

import json
import os
import shutil
import zipfile

import keras
import numpy as np
import pytest
from conftest import max_weight_diff, mlp, regression_data, zero_strategy

import tf_zero

WRITERS = ["release-0.1.0", "tf2.19-keras3.10"]
CASES = {"adam_stage2": (2, lambda: keras.optimizers.Adam(0.01), {}),
         "adam_stage3": (3, lambda: keras.optimizers.Adam(0.01), {"persistence_threshold": 0}),
         "lamb_stage2": (2, lambda: keras.optimizers.Lamb(0.01), {})}


def compiled(name, n):
    stage, make, kwargs = CASES[name]
    with zero_strategy(n, stage=stage, **kwargs).scope():
        model = mlp()
        model.compile(optimizer=tf_zero.ZeroOptimizer(make()), loss="mse")
    return model


def fixture(writer, *path):
    return os.path.join(os.path.dirname(__file__), "fixtures", writer, *path)


def expected(writer, name):
    with np.load(fixture(writer, name, "expected.npz")) as saved:
        return dict(saved)


def assert_restored(model, writer, name):
    values = expected(writer, name)
    for i, w in enumerate(model.get_weights()):
        np.testing.assert_array_equal(w, values[f"weight_{i}"])
    variables = model.optimizer.variables
    assert len(variables) == len([k for k in values if k.startswith("optimizer_")])
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(np.asarray(v.numpy()), values[f"optimizer_{i}"])


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_release_checkpoint_restores_at_another_replica_count(writer, name):
    model = compiled(name, 2)
    model.optimizer.build(model.trainable_variables)
    tf_zero.Checkpoint(model=model, optimizer=model.optimizer).read(
        fixture(writer, name, "ckpt")).assert_existing_objects_matched()
    assert_restored(model, writer, name)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_checkpoint_of_another_version_restores_at_another_stage(writer):
    """Adam's stage-2 checkpoint (slots in slices) restored at stage 3 (the
    weights themselves sharded) on 3 replicas, and the stage-3 one at stage 2."""
    for name, other in (("adam_stage2", "adam_stage3"), ("adam_stage3", "adam_stage2")):
        model = compiled(other, 3)
        model.optimizer.build(model.trainable_variables)
        tf_zero.Checkpoint(model=model, optimizer=model.optimizer).read(
            fixture(writer, name, "ckpt")).assert_existing_objects_matched()
        assert_restored(model, writer, name)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_release_weights_file_loads_at_another_replica_count(writer, name):
    model = compiled(name, 3)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(fixture(writer, name, "model.weights.h5"))
    assert_restored(model, writer, name)


def minor(version):
    return tuple(int(p) for p in version.split(".")[:2])


def written_by_newer_keras(path) -> bool:
    """Whether a `.keras` file was saved by a newer Keras minor than this one.

    Keras reads model files of its own and older releases only: its layer
    configs gain arguments (Dense's `quantization_config`) that an older Keras
    refuses, plain Keras and tf_zero alike.
    """
    with zipfile.ZipFile(path) as archive:
        writer = json.loads(archive.read("metadata.json"))["keras_version"]
    return minor(writer) > minor(keras.__version__)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_release_keras_file_loads_at_another_replica_count(writer, name):
    path = fixture(writer, name, "model.keras")
    if written_by_newer_keras(path):
        pytest.skip(f"Keras {keras.__version__} cannot read a .keras file of a newer Keras")
    stage, _, kwargs = CASES[name]
    with zero_strategy(2, stage=stage, **kwargs).scope():
        loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, tf_zero.ZeroOptimizer)
    assert_restored(loaded, writer, name)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_release_backup_resumes_into_the_uninterrupted_run(tmp_path, writer):
    backup_dir = tmp_path / "backup"
    shutil.copytree(fixture(writer, "backup"), backup_dir)
    model = compiled("adam_stage2", 4)
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=1, shuffle=False, verbose=0,
              callbacks=[tf_zero.callbacks.BackupAndRestore(str(backup_dir), save_freq=3)])
    reference = expected(writer, "backup")
    assert max_weight_diff(model.get_weights(),
                           [reference[f"weight_{i}"] for i in range(len(reference))]) < 1e-6
    assert not (backup_dir / "latest.json").exists()  # resumed, finished, removed
