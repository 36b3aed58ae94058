"""Stage 3's checkpoints, Keras files and exports hold full tensors that restore anywhere."""


import keras
import numpy as np
import tensorflow as tf
from conftest import (max_weight_diff, mlp, zero_strategy)
from stage3_models import (BATCH, OPTIMIZERS, stage3, no_batch_norm, token_data, compiled, fit_dense, fit)

import tf_zero


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
