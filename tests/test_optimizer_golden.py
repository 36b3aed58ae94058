"""Keras' own golden values for every Keras optimizer, through ZeroOptimizer on 4 replicas.

Keras pins each optimizer's arithmetic in `keras/src/optimizers/<name>_test.py`,
`test_correctness_with_golden`: a length-10 variable of ones, one step with
gradient 0.01 everywhere, then steps with gradient 0.1, 0.2, ..., 1.0, the
variable checked against a table before each later step. The cases below copy
the constructor arguments, the variable's dtype (`np.ones([10])` makes a
float64 variable; some tests ask for float32), the gradients (float32 from
`keras.ops`, or float64 from NumPy) and the tables from Keras 3.15.1, and
replay them through `tf_zero.ZeroOptimizer` on 4 replicas that each hold a
quarter of the gradient, so the reduced gradient is Keras' gradient.

Golden tests exist for Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW,
Ftrl, Lamb, Lion, Nadam, RMSprop and SGD. Muon and ScheduleFreeAdamW have
none. Muon's `test_muon_single_step` pins one step on a 2-D variable, and
`apply_gradients` with its constructor arguments (learning rate 0.5, no weight
decay) takes exactly that step, so it is replayed here as well; its other
pinned values (`test_adamw_single_step`, `test_Newton_Schulz`) call
`update_step` or the Newton-Schulz iteration directly, with a learning rate
that differs from the constructor's, and have no `apply_gradients` equivalent.
ScheduleFreeAdamW's tests pin no values (they check only that the variable
moves, or moves less under warmup). Keras' distributed SGD golden test
(`keras/src/backend/tensorflow/optimizer_distribute_test.py`) is adapted in
`tests/test_optimizer_custom_loop.py`.
"""

from dataclasses import dataclass
from typing import Callable

import keras
from keras import optimizers
import numpy as np
import pytest
import tensorflow as tf
from conftest import plain_keras_muon_runs, zero_strategy

import tf_zero

REPLICAS = 4
WHOLE = ("adafactor", "lamb", "muon")  # partitioned whole by default; the rest element-wise


@dataclass(frozen=True)
class Golden:
    """One Keras golden test: after applying `gradients[i]`, `x` is `golden[i]`."""

    make: Callable[[], optimizers.Optimizer]
    initial: np.ndarray
    gradients: tuple
    golden: np.ndarray
    tolerance: float = 5e-4  # Keras' rtol and atol


def ten_steps(make, golden, *, float32=False, numpy_gradients=False):
    """Keras' common sequence: ones(10), one step of 0.01, then 0.1 ... 1.0.

    Keras applies one more step after its last check; it is never checked, so
    it is left out here.
    """
    initial = np.ones([10], dtype="float32") if float32 else np.ones([10])
    if numpy_gradients:
        grads, first_grads = np.arange(0.1, 1.1, 0.1), np.full((10,), 0.01)
    else:
        grads, first_grads = keras.ops.arange(0.1, 1.1, 0.1), keras.ops.full((10,), 0.01)
    gradients = (first_grads,) + (grads,) * (len(golden) - 1)
    return Golden(make, initial, gradients, np.asarray(golden))


CASES = {
    # keras/src/optimizers/adadelta_test.py
    "adadelta": ten_steps(
        lambda: optimizers.Adadelta(learning_rate=1.0, rho=0.8, epsilon=1e-6),
        np.tile([[0.9978], [0.9947], [0.9915], [0.9882], [0.9849]], (1, 10))),
    # keras/src/optimizers/adafactor_test.py
    "adafactor": ten_steps(
        lambda: optimizers.Adafactor(learning_rate=0.5, beta_2_decay=-0.65, epsilon_1=1e-15,
                            epsilon_2=1e-4, clip_threshold=0.9, relative_step=False),
        [[0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55],
         [0.3031, 0.3026, 0.3025, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024, 0.3024],
         [0.1671, 0.1665, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663, 0.1663],
         [0.0923, 0.0916, 0.0915, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914, 0.0914],
         [0.0554, 0.0548, 0.0546, 0.0546, 0.0546, 0.0546, 0.0546, 0.0545, 0.0545, 0.0545]],
        numpy_gradients=True),
    # keras/src/optimizers/adagrad_test.py
    "adagrad": ten_steps(
        lambda: optimizers.Adagrad(learning_rate=0.2, initial_accumulator_value=0.3, epsilon=1e-6),
        [[0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963, 0.9963],
         [0.9604, 0.9278, 0.9003, 0.8784, 0.8615, 0.8487, 0.8388, 0.8313, 0.8255, 0.8209],
         [0.9251, 0.8629, 0.8137, 0.7768, 0.7497, 0.7298, 0.7151, 0.704, 0.6956, 0.6891],
         [0.8903, 0.8012, 0.7342, 0.6862, 0.6521, 0.6277, 0.6099, 0.5967, 0.5867, 0.579],
         [0.856, 0.7422, 0.6604, 0.6037, 0.5644, 0.5367, 0.5168, 0.5021, 0.491, 0.4825]]),
    # keras/src/optimizers/adam_test.py
    "adam": ten_steps(
        lambda: optimizers.Adam(amsgrad=True),
        np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10)), float32=True),
    # keras/src/optimizers/adamax_test.py
    "adamax": ten_steps(
        lambda: optimizers.Adamax(learning_rate=0.2, beta_1=0.85, beta_2=0.95, epsilon=1e-6),
        [[0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8],
         [0.6827, 0.6873, 0.6888, 0.6896, 0.6901, 0.6904, 0.6906, 0.6908, 0.6909, 0.691],
         [0.5333, 0.5407, 0.5431, 0.5444, 0.5451, 0.5456, 0.546, 0.5462, 0.5464, 0.5466],
         [0.368, 0.3773, 0.3804, 0.382, 0.3829, 0.3835, 0.384, 0.3843, 0.3846, 0.3848],
         [0.1933, 0.204, 0.2076, 0.2094, 0.2105, 0.2112, 0.2117, 0.2121, 0.2124, 0.2126]],
        float32=True),
    # keras/src/optimizers/adamw_test.py
    "adamw": ten_steps(
        lambda: optimizers.AdamW(learning_rate=1.0, weight_decay=0.5, epsilon=2),
        [[0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998],
         [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
         [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
         [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
         [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159]],
        float32=True),
    # keras/src/optimizers/ftrl_test.py
    "ftrl": ten_steps(
        lambda: optimizers.Ftrl(learning_rate=0.05, learning_rate_power=-0.2,
                       initial_accumulator_value=0.4, l1_regularization_strength=0.05,
                       l2_regularization_strength=0.15,
                       l2_shrinkage_regularization_strength=0.01, beta=0.3),
        [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         [-0.0034, -0.0077, -0.0118, -0.0157, -0.0194, -0.023, -0.0263, -0.0294, -0.0325, -0.0354],
         [-0.0078, -0.0162, -0.0242, -0.0317, -0.0387, -0.0454, -0.0516, -0.0575, -0.0631, -0.0685],
         [-0.0121, -0.0246, -0.0363, -0.0472, -0.0573, -0.0668, -0.0757, -0.0842, -0.0922, -0.0999],
         [-0.0164, -0.0328, -0.0481, -0.0623, -0.0753, -0.0875, -0.099, -0.1098, -0.1201, -0.1299]],
        numpy_gradients=True),
    # keras/src/optimizers/lamb_test.py
    "lamb": ten_steps(
        lambda: optimizers.Lamb(),
        np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10)), float32=True),
    # keras/src/optimizers/lion_test.py
    "lion": ten_steps(
        lambda: optimizers.Lion(),
        np.tile([[0.999], [0.998], [0.997], [0.996], [0.995]], (1, 10))),
    # keras/src/optimizers/nadam_test.py
    "nadam": ten_steps(
        lambda: optimizers.Nadam(learning_rate=0.5, beta_1=0.5, beta_2=0.67, epsilon=1e-5),
        [[0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281, 0.4281],
         [-0.1738, -0.1731, -0.1726, -0.1723, -0.1721, -0.172, -0.1719, -0.1718, -0.1718, -0.1717],
         [-0.7115, -0.7103, -0.7096, -0.7092, -0.709, -0.7088, -0.7086, -0.7085, -0.7085, -0.7084],
         [-1.2335, -1.2322, -1.2313, -1.2309, -1.2306, -1.2304, -1.2302, -1.2301, -1.23, -1.2299],
         [-1.7492, -1.7478, -1.7469, -1.7464, -1.7461, -1.7459, -1.7457, -1.7456, -1.7455, -1.7454]],
        float32=True),
    # keras/src/optimizers/rmsprop_test.py
    "rmsprop": ten_steps(
        lambda: optimizers.RMSprop(centered=True),
        np.tile([[0.9967], [0.9933], [0.9908], [0.9885], [0.9864]], (1, 10))),
    # keras/src/optimizers/sgd_test.py
    "sgd": ten_steps(
        lambda: optimizers.SGD(nesterov=True),
        [[0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999, 0.9999],
         [0.9989, 0.9979, 0.9969, 0.9959, 0.9949, 0.9939, 0.9929, 0.9919, 0.9909, 0.9899],
         [0.9979, 0.9959, 0.9939, 0.9919, 0.9899, 0.9879, 0.9859, 0.9839, 0.9819, 0.9799],
         [0.9969, 0.9939, 0.9909, 0.9879, 0.9849, 0.9819, 0.9789, 0.9759, 0.9729, 0.9699],
         [0.9959, 0.9919, 0.9879, 0.9839, 0.9799, 0.9759, 0.9719, 0.9679, 0.9639, 0.9599]]),
    # keras/src/optimizers/muon_test.py, test_muon_single_step (not a golden
    # test: one step, Keras' tolerance 1e-2).
    "muon": Golden(
        lambda: optimizers.Muon(learning_rate=0.5, weight_decay=0),
        initial=np.array([[1.0, 2.0], [3.0, 4.0]], dtype="float32"),
        gradients=(keras.ops.array([[1.0, 6.0], [7.0, 2.0]]),),
        golden=np.array([[[0.988775, 1.887053], [2.873428, 3.97035]]]),
        tolerance=1e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_golden_values_on_four_replicas(name):
    if name == "muon" and not plain_keras_muon_runs():
        pytest.skip("this Keras' own Muon cannot step on the TensorFlow backend")
    case = CASES[name]
    strategy = zero_strategy(REPLICAS)
    with strategy.scope():
        optimizer = tf_zero.ZeroOptimizer(case.make())
        x = keras.Variable(case.initial)
    assert x.dtype == case.initial.dtype  # float64 where Keras' test makes it so
    plain, reference = case.make(), keras.Variable(case.initial)  # Keras' own run, one device

    @tf.function
    def step(grads):
        # Each replica holds 1/4 of Keras' gradient; the reduction sums them.
        strategy.run(lambda: optimizer.apply_gradients([(grads / float(REPLICAS), x)]))

    for grads, golden in zip(case.gradients, case.golden):
        step(grads)
        plain.apply_gradients([(grads, reference)])
        np.testing.assert_allclose(x.numpy(), golden, rtol=case.tolerance,
                                   atol=case.tolerance)
        # The tables have 4 digits: at Keras' tolerance, a 4x gradient (a sum
        # of unscaled copies) still passes them for Adadelta, Adamax, AdamW,
        # Nadam, RMSprop and SGD (measured). The plain optimizer is the sharp
        # check (measured: identical, or within 2e-16 in float64).
        np.testing.assert_allclose(x.numpy(), reference.numpy(), rtol=0, atol=1e-6)
    assert optimizer.is_sharded
    assert optimizer.partition == ("whole" if name in WHOLE else "element")
    assert optimizer.plan.partition == optimizer.partition
