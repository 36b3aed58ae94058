"""The whole-variable partition balances the optimizer state itself, measured."""

import keras
import numpy as np
import pytest
from conftest import zero_strategy

import tf_zero
from tf_zero.state.owners import plain_slot_specs, state_bytes
from tf_zero.plan import plan_owners


def test_state_bytes_are_the_plain_optimizers_without_building_it():
    variables = [keras.Variable(np.zeros(shape, "float32"), name=name) for shape, name in
                 (((6, 10), "kernel"), ((10,), "bias"), ((4, 3, 5), "dense3"), ((), "scale"))]
    for opt in (keras.optimizers.Adafactor(), keras.optimizers.Muon(), keras.optimizers.Lamb()):
        plain = type(opt).from_config(opt.get_config())
        plain.build(variables)
        got = state_bytes(plain_slot_specs([opt] * len(variables), variables))
        assert sum(got) == sum(4 * int(np.prod(v.shape)) for v in plain.variables[2:])
    # Adafactor: a full velocity plus one row and one column per matrix.
    adafactor = plain_slot_specs([keras.optimizers.Adafactor()], variables[:1])
    assert state_bytes(adafactor) == [4 * (60 + 6 + 10)]


def test_costs_balance_the_state_where_sizes_alone_do_not():
    # Muon keeps one moment per matrix, two for a vector or an embedding:
    # sizes (1, 1, 1, 1) but state (1, 1, 2, 2) per variable at 2 replicas.
    shapes = [(8, 8), (8, 8), (64,), (64,)]
    by_size = plan_owners(shapes, ["float32"] * 4, 2, 1 << 20)
    costs = [256, 256, 512, 512]
    both = plan_owners(shapes, ["float32"] * 4, 2, 1 << 20, costs=costs)
    assert both.imbalance == by_size.imbalance == 1.0
    assert both.state_imbalance == 1.0
    assert plan_owners(shapes, ["float32"] * 4, 2, 1 << 20, costs=[1, 1, 1, 10]).owner(3) != \
        plan_owners(shapes, ["float32"] * 4, 2, 1 << 20, costs=[1, 1, 1, 10]).owner(2)
    with pytest.raises(ValueError, match="costs"):
        plan_owners(shapes, ["float32"] * 4, 2, 1 << 20, costs=[1, 2])


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_transformer_state_within_ten_percent_of_ideal_at_four_replicas(name):
    """A keras_hub Llama (4 layers; its embedding 6% of the weights), N=4: the
    busiest replica's optimizer state, measured by memory_report, is within
    10% of a quarter of the unsharded optimizer's."""
    keras_hub = pytest.importorskip("keras_hub")
    make = {"adafactor": keras.optimizers.Adafactor, "muon": keras.optimizers.Muon}[name]
    with zero_strategy(4).scope():
        keras.utils.set_random_seed(1)
        model = keras_hub.models.LlamaBackbone(
            vocabulary_size=256, num_layers=4, num_query_heads=4, num_key_value_heads=2,
            hidden_dim=64, intermediate_dim=128)
        opt = tf_zero.ZeroOptimizer(make())
        opt.build(model.trainable_variables)
    report = tf_zero.memory_report(opt)
    ideal = report.unsharded.slots / 4
    assert sum(r.slots for r in report.replicas) == report.unsharded.slots
    measured = report.max_replica.slots / ideal
    assert measured == pytest.approx(opt.plan.state_imbalance, rel=1e-3)
    assert measured < 1.10, f"{name}: busiest replica holds {measured:.3f} x the ideal"
