"""The weights tf_zero stores: stage 3's shards, gathered on read, and stages
1-2's 16-bit working copies over float32 master shards.

`storage.py` is what both share (the float32 master as 1/N shards),
`sharded.py` the stage-3 gather and its reduce-scatter gradient,
`working.py` the working copy, `creator.py` the variable creator of
`ZeroStrategy.scope()` and the layer-call wrapper, `prefetch.py` the order of
stage 3's gathers. See docs/stage3.md and docs/mixed-precision.md.
"""

from tf_zero.weights.creator import sharding_creator, uses_creator
from tf_zero.weights.sharded import ShardedVariable, is_sharded
from tf_zero.weights.working import WorkingVariable, has_working_copy

__all__ = ["ShardedVariable", "WorkingVariable", "has_working_copy", "is_sharded",
           "sharding_creator", "uses_creator"]
