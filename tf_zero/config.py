"""ZeRO configuration as frozen, validated data."""

from __future__ import annotations

import dataclasses

STAGES = (1, 2, 3)
REDUCE_DTYPES = (None, "float32", "float16", "bfloat16")
DEFAULT_BUCKET_SIZE_BYTES = 8 * 1024 * 1024
DEFAULT_PERSISTENCE_THRESHOLD = 100_000
DEFAULT_PREFETCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    """How a `ZeroStrategy` / `ZeroOptimizer` shards training state.

    Attributes:
        stage: 1 shards the optimizer slots; 2 also keeps gradients sharded
            between steps (they matter once gradients are accumulated over
            micro-batches). Within one step both reduce-scatter the gradient
            and all-gather the updated weights.
        bucket_size_bytes: size of one flat gradient bucket. The gradients
            of smaller variables are flattened together into buckets of
            about this size, one reduce-scatter and one all-gather per
            bucket; a variable at least this large is a bucket of its own,
            reduced and published without a copy.
        reduce_dtype: dtype in which gradients travel during the
            reduce-scatter (`None`: the gradient's own dtype). The shard is
            summed and used in the variable's dtype.
        persistence_threshold: stage 3 only: trainable float weights with
            fewer elements than this stay replicated (biases, norms: gathering
            them would cost more in launches than their memory is worth).
            0 shards every trainable float weight. The default, 100,000
            elements, is DeepSpeed's `stage3_param_persistence_threshold`.
        prefetch_depth: stage 3 only: how many layers' weights may be
            gathered ahead of the layer being computed. The gather of layer
            `i` waits for the input of layer `i - prefetch_depth + 1`, so at
            most about `prefetch_depth` layers' full weights exist at once
            (1: no overlap of gathering and compute).
        recompute: stage 3 only: a layer that owns sharded weights (and no
            non-trainable state) is recomputed in the backward pass, so its
            gathered weights are freed after the forward pass and gathered
            again when its gradient is computed. False keeps them alive from
            forward to backward (faster, but memory then grows with depth).
    """

    stage: int = 2
    bucket_size_bytes: int = DEFAULT_BUCKET_SIZE_BYTES
    reduce_dtype: str | None = None
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH
    recompute: bool = True

    def __post_init__(self):
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            raise ValueError(
                f"stage must be one of {STAGES}, got {self.stage!r}. Use "
                "stage=1 to shard optimizer slots, stage=2 to also shard "
                "gradients, stage=3 to also shard the weights.")
        for name, low in (("persistence_threshold", 0), ("prefetch_depth", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int of at least {low}, got {value!r}.")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be True or False, got {self.recompute!r}.")
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
