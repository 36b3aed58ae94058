"""ZeRO configuration as frozen, validated data."""

from __future__ import annotations

import dataclasses

STAGES = (1, 2)
REDUCE_DTYPES = (None, "float32", "float16", "bfloat16")
DEFAULT_BUCKET_SIZE_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    """How a `ZeroStrategy` / `ZeroOptimizer` shards training state.

    Attributes:
        stage: 1 shards the optimizer slots; 2 also keeps gradients sharded
            between steps (they matter once gradients are accumulated over
            micro-batches). Within one step both reduce-scatter the gradient
            and all-gather the updated weights.
        bucket_size_bytes: size of one flat gradient bucket. Gradients are
            flattened into buckets of about this size, one reduce-scatter per
            bucket; only one bucket's flat copy is built at a time.
        reduce_dtype: dtype in which gradients travel during the
            reduce-scatter (`None`: the gradient's own dtype). The shard is
            summed and used in the variable's dtype.
    """

    stage: int = 2
    bucket_size_bytes: int = DEFAULT_BUCKET_SIZE_BYTES
    reduce_dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            if self.stage == 3:
                raise ValueError(
                    "ZeRO stage 3 (sharded weights) is not available yet; use "
                    "stage=1 or stage=2.")
            raise ValueError(
                f"stage must be one of {STAGES}, got {self.stage!r}. Use "
                "stage=1 to shard optimizer slots or stage=2 to also shard "
                "gradients.")
        if (not isinstance(self.bucket_size_bytes, int)
                or isinstance(self.bucket_size_bytes, bool)
                or self.bucket_size_bytes < 1024):
            raise ValueError(
                "bucket_size_bytes must be an int of at least 1024 (bytes), "
                f"got {self.bucket_size_bytes!r}; the default is "
                f"{DEFAULT_BUCKET_SIZE_BYTES}.")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(
                f"reduce_dtype must be one of {REDUCE_DTYPES}, got "
                f"{self.reduce_dtype!r}.")
