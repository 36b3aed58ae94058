"""The shard plans: pure functions from variable shapes to flat buckets. Read
this package first: every other one follows the layout it computes.

Every replica computes the same plan from the same inputs, with no TensorFlow
in it. A bucket is a flat run of one dtype split into equal contiguous
shards, shard `r` of every bucket belonging to replica `r`: one
reduce-scatter gives each replica its shard's summed gradient, one
all-gather publishes every shard, and padding never reaches a variable.
`layout.py` holds the records; `plan_shards` (`element.py`) splits every
variable element-wise; `plan_owners` (`whole.py`) gives each variable whole
to one replica. See docs/architecture.md.
"""

from tf_zero.plan.element import fills_a_bucket, plan_shards
from tf_zero.plan.layout import Bucket, Segment, ShardPlan
from tf_zero.plan.whole import plan_owners

__all__ = ["Bucket", "Segment", "ShardPlan", "fills_a_bucket", "plan_owners", "plan_shards"]
