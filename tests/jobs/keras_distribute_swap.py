"""Runs Keras' own distribution tests with the two-line swap.

    python tests/jobs/keras_distribute_swap.py [--stage 1|2|3] [--persistence-threshold P]
                                          [pytest args...]

Keras ships its tests of optimizers and models under a distribution strategy
inside the wheel (`keras/src/backend/tensorflow/optimizer_distribute_test.py`
and `distribute_test.py`). This runs them unchanged, in a process of their own
(they reset TensorFlow's context in `setUp`), as a user would after the swap:
`tf.distribute.MirroredStrategy(devices)` makes a `tf_zero.ZeroStrategy` and
every Keras SGD they create or compile (`SGD(...)`, `optimizer="sgd"`) is
wrapped in `tf_zero.ZeroOptimizer`. Not collected by the test suite (tests
that read Keras internals a wrapper does not expose fail by design; see
docs/semantics.md, "Keras' own distribution tests"); `tests/test_optimizer_custom_loop.py`
runs the ones that apply.
"""

import argparse
import os
import sys

STAGE_VARIABLE = "TF_ZERO_SWAP_STAGE"
THRESHOLD_VARIABLE = "TF_ZERO_SWAP_PERSISTENCE_THRESHOLD"
KERAS_TESTS = ("optimizer_distribute_test", "distribute_test")


def pytest_configure(config):
    """Applies the swap before pytest imports Keras' test modules."""
    import importlib

    import keras
    import tensorflow as tf

    import tf_zero

    stage = int(os.environ.get(STAGE_VARIABLE, "2"))
    threshold = int(os.environ.get(THRESHOLD_VARIABLE, "100000"))

    def zero_strategy(devices=None, cross_device_ops=None):
        return tf_zero.ZeroStrategy(devices, stage=stage, persistence_threshold=threshold)

    def zero_sgd(*args, **kwargs):
        return tf_zero.ZeroOptimizer(keras.optimizers.SGD(*args, **kwargs))

    tf.distribute.MirroredStrategy = zero_strategy
    for name in KERAS_TESTS:
        module = importlib.import_module(f"keras.src.backend.tensorflow.{name}")
        if hasattr(module, "SGD"):
            module.SGD = zero_sgd

    compile_ = keras.Model.compile

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        if optimizer == "sgd":
            optimizer = zero_sgd()
        return compile_(self, optimizer, *args, **kwargs)

    keras.Model.compile = compile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--persistence-threshold", type=int, default=100_000,
                        help="stage 3: 0 shards every weight of the tests' tiny models")
    args, pytest_args = parser.parse_known_args(argv)
    os.environ[STAGE_VARIABLE] = str(args.stage)
    os.environ[THRESHOLD_VARIABLE] = str(args.persistence_threshold)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    base = os.path.join(os.path.dirname(keras.__file__), "src", "backend", "tensorflow")
    paths = [os.path.join(base, f"{name}.py") for name in KERAS_TESTS]
    return pytest.main(paths + ["-p", "keras_distribute_swap", "-rA", "-q",
                                "-p", "no:cacheprovider", f"--rootdir={here}"] + pytest_args)


if __name__ == "__main__":
    sys.exit(main())
