"""tf_zero: ZeRO-style sharded data parallelism for TensorFlow and Keras 3."""

from tf_zero import callbacks, saving
from tf_zero.checkpoint import Checkpoint
from tf_zero.config import ZeroConfig
from tf_zero.estimate import MemoryEstimate, estimate_memory
from tf_zero.memory import MemoryReport, ReplicaMemory, memory_report
from tf_zero.optimizer import GradientAccumulationOptimizer, ZeroOptimizer
from tf_zero.plan import ShardPlan, plan_shards
from tf_zero.sharded_variable import ShardedVariable, is_sharded
from tf_zero.strategy import ZeroStrategy

__version__ = "0.1.0"

__all__ = [
    "callbacks",
    "Checkpoint",
    "estimate_memory",
    "GradientAccumulationOptimizer",
    "is_sharded",
    "memory_report",
    "MemoryEstimate",
    "MemoryReport",
    "plan_shards",
    "ReplicaMemory",
    "saving",
    "ShardedVariable",
    "ShardPlan",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStrategy",
]
