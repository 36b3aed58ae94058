"""tf_zero: ZeRO-style sharded data parallelism for TensorFlow and Keras 3."""

from tf_zero.accumulation import GradientAccumulationOptimizer
from tf_zero.config import ZeroConfig
from tf_zero.estimate import MemoryEstimate, estimate_memory
from tf_zero.memory import MemoryReport, ReplicaMemory, memory_report
from tf_zero.optimizer import ZeroOptimizer
from tf_zero.plan import ShardPlan, plan_shards
from tf_zero.strategy import ZeroStrategy

__version__ = "0.1.0"

__all__ = [
    "GradientAccumulationOptimizer",
    "MemoryEstimate",
    "MemoryReport",
    "ReplicaMemory",
    "ShardPlan",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStrategy",
    "estimate_memory",
    "memory_report",
    "plan_shards",
]
