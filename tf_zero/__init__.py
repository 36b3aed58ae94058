"""tf_zero: ZeRO-style sharded data parallelism for TensorFlow and Keras 3."""

from tf_zero.config import ZeroConfig
from tf_zero.optimizer import ZeroOptimizer
from tf_zero.plan import ShardPlan, plan_shards
from tf_zero.strategy import ZeroStrategy

__version__ = "0.1.0"

__all__ = [
    "ShardPlan",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStrategy",
    "plan_shards",
]
