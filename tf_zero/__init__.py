"""tf_zero: ZeRO-style sharded data parallelism for TensorFlow and Keras 3.

The public names are below. To read the machinery, start with `plan.py`
(where every element lives), then `state/shards.py` and `step/chain.py`
(a gradient's path, link by link); docs/architecture.md has the tree.
"""

from tf_zero import callbacks, traffic
from tf_zero._private import patches as _patches
from tf_zero.checkpoint import Checkpoint
from tf_zero.config import Partition, ZeroConfig
from tf_zero.estimate import MemoryEstimate, estimate_memory
from tf_zero.fault import saving
from tf_zero.memory import MemoryReport, ReplicaMemory, memory_report
from tf_zero.optimizer import GradientAccumulationOptimizer, ZeroOptimizer
from tf_zero.plan import ShardPlan, plan_owners, plan_shards
from tf_zero.weights import ShardedVariable, WorkingVariable, has_working_copy, is_sharded
from tf_zero.strategy import ZeroStrategy
from tf_zero.traffic import TrafficReport, collective_traffic

_patches.install(backup_engine=callbacks.BackupAndRestore, save_router=saving.route)

__version__ = "0.1.0"

__all__ = [
    "callbacks",
    "Checkpoint",
    "collective_traffic",
    "estimate_memory",
    "GradientAccumulationOptimizer",
    "has_working_copy",
    "is_sharded",
    "memory_report",
    "MemoryEstimate",
    "MemoryReport",
    "Partition",
    "plan_owners",
    "plan_shards",
    "ReplicaMemory",
    "saving",
    "ShardedVariable",
    "ShardPlan",
    "traffic",
    "TrafficReport",
    "WorkingVariable",
    "ZeroConfig",
    "ZeroOptimizer",
    "ZeroStrategy",
]
