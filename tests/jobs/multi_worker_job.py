"""Plain Keras model.fit under MultiWorkerMirroredStrategy (a test's worker).

Usage: python multi_worker_job.py plain OUT_DIR DEVICES_PER_WORKER
Documents keras-team/keras#20585; tf_zero's own multi-worker runs use
examples/multi_worker.py through tf_zero.launch (tests/test_multiworker_training.py).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

mode, out_dir, per_worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * per_worker)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_zero  # noqa: E402
from tf_zero import _private  # noqa: E402

options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
if mode == "zero":
    strategy = tf_zero.ZeroStrategy(devices_per_worker=per_worker,
                                    communication_options=options)
else:
    strategy = _private.new_multi_worker_strategy(communication_options=options)

rng = np.random.default_rng(0)
x = rng.normal(size=(96, 8)).astype("float32")
y = rng.normal(size=(96, 3)).astype("float32")
with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(3)])
    opt = keras.optimizers.Adam(0.01)
    if mode == "zero":
        opt = tf_zero.ZeroOptimizer(opt)
    model.compile(optimizer=opt, loss="mse")
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
options_ds = tf.data.Options()
options_ds.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
history = model.fit(dataset.with_options(options_ds), epochs=2, verbose=0)
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
np.savez(os.path.join(out_dir, f"worker{task}.npz"), *model.get_weights())
with open(os.path.join(out_dir, f"worker{task}.json"), "w") as f:
    json.dump({"loss": history.history["loss"],
               "replicas": strategy.num_replicas_in_sync}, f)
