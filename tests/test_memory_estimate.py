import pytest

from tf_zero import estimate
from tf_zero.estimate import estimate_memory


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_paper_figure_1(stage, gb):
    """ZeRO paper, Fig. 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K=12)."""
    got = estimate_memory(7.5e9, 64, stage, accounting="paper").total / 1e9
    assert round(got, 1) == gb


def test_keras_layout_matches_measured_slots():
    """Adam at N=4: slots + weight shard = (8 + 4) / 4 bytes per parameter."""
    e = estimate_memory(1000, 4, 1)
    assert e.weights == 4000 and e.gradients == 4000 and e.optimizer_states == 3000
    assert estimate_memory(1000, 4, 2).gradients == 1000
    assert estimate_memory(1000, 4, 0).total == 16000
    assert estimate_memory(1000, 4, 3).total == 4000


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=4), "stage"), (dict(optimizer="lamb"), "unknown optimizer"),
    (dict(accounting="x"), "accounting"), (dict(num_replicas=0), "num_replicas"),
])
def test_bad_input(kwargs, match):
    args = dict(num_params=10, num_replicas=2, stage=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(**args)


def test_cli(capsys):
    assert estimate.main(["--params", "7.5e9", "--replicas", "64", "--accounting", "paper"]) == 0
    out = capsys.readouterr().out
    assert "31.41" in out and "1.88" in out
