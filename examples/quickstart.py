"""Quickstart: model.fit with ZeRO stage 2 (or --stage 1 or 3) on 4 replicas.

Runs on all local GPUs when there are any, else on 4 logical CPU devices.
Prints the loss, tf_zero's per-replica memory report, and the same model's
figures under a plain MirroredStrategy.

    python examples/quickstart.py [--replicas 4] [--stage 2] [--epochs 3]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC CPU allocator keeps large buffers between steps (its default
# one returns them and page-faults them back every step); set before TF starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import tensorflow as tf  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2048)
    return parser.parse_args()


def configure_devices(replicas):
    """Uses the GPUs if present; otherwise splits the CPU into logical devices."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return None  # ZeroStrategy takes every local GPU
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [f"/cpu:{i}" for i in range(replicas)]


def make_model(hidden):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(10),
    ])


def make_data(n=4096):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64)).astype("float32")
    w = rng.normal(size=(64, 10)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return x, y


def main():
    args = parse_args()
    devices = configure_devices(args.replicas)

    import keras

    import tf_zero

    x, y = make_data()
    strategy = tf_zero.ZeroStrategy(devices, stage=args.stage)
    print(f"ZeroStrategy: {strategy.num_replicas_in_sync} replicas, stage {strategy.stage}")
    with strategy.scope():
        model = make_model(args.hidden)
        model.compile(
            optimizer=tf_zero.ZeroOptimizer(keras.optimizers.AdamW(1e-3)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
    history = model.fit(x, y, batch_size=128, epochs=args.epochs, verbose=2)
    print(f"parameters: {model.count_params():,}")
    print("final loss:", round(history.history["loss"][-1], 4),
          "accuracy:", round(history.history["accuracy"][-1], 4))
    zero_report = tf_zero.memory_report(model.optimizer)
    print(zero_report)

    # The same model under plain MirroredStrategy: every replica holds all slots.
    # (ZeroStrategy numbers its collectives in a range of its own, so the two
    # strategies can live in one process.)
    mirrored = tf.distribute.MirroredStrategy(devices)
    with mirrored.scope():
        plain_model = make_model(args.hidden)
        plain_opt = keras.optimizers.AdamW(1e-3)
        plain_opt.build(plain_model.trainable_variables)
    plain_report = tf_zero.memory_report(plain_opt)
    print("MirroredStrategy, same model:")
    print(plain_report)
    ratio = zero_report.max_replica.slots / plain_report.max_replica.slots
    print(f"optimizer slots per replica, ZeRO / MirroredStrategy: {ratio:.3f}")
    state = zero_report.max_replica.total / plain_report.max_replica.total
    print(f"weights + shards + slots per replica, ZeRO / MirroredStrategy: {state:.3f}")


if __name__ == "__main__":
    main()
