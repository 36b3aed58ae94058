"""ZeRO configuration as frozen, validated data: `ZeroConfig` and `Partition`.

The one settings object of tf_zero. A `ZeroStrategy` holds one; a
`ZeroOptimizer` overrides some of its fields (`ZeroConfig.override`). See
docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers

STAGES = (1, 2, 3)
REDUCE_DTYPES = (None, "float32", "float16", "bfloat16")
PARAM_DTYPES = ("compute", "float32")
DEFAULT_BUCKET_SIZE_BYTES = 8 * 1024 * 1024
DEFAULT_PERSISTENCE_THRESHOLD = 100_000
DEFAULT_PREFETCH_DEPTH = 2
QUANTIZATION_BITS = (8, 4)
DEFAULT_QUANTIZATION_BLOCK_SIZE = 2048


class Partition(str, enum.Enum):
    """How the optimizer state is split across replicas.

    A `str` enum: `Partition.WHOLE == "whole"`, and configs serialize it as
    the plain string.
    """

    ELEMENT = "element"
    """Every variable split element-wise (element-wise optimizers)."""
    WHOLE = "whole"
    """Every variable owned whole by one replica (Lamb, Adafactor, Muon, a
    MultiOptimizer: their update needs whole tensors)."""

    def __str__(self):
        return self.value


def positive_int(name: str, value, low: int = 1) -> int:
    """`value` as an `int` of at least `low` (NumPy integers accepted).

    Raises:
        ValueError: `value` is not an integer (or is a bool) or is below `low`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int of at least {low}, got {value!r}.")
    return int(value)


def as_partition(value) -> Partition | None:
    """`value` ("element", "whole", a `Partition` or None) as a `Partition`.

    Raises:
        ValueError: any other value.
    """
    if value is None or isinstance(value, Partition):
        return value
    try:
        return Partition(value)
    except ValueError:
        raise ValueError(
            f"partition must be one of {[p.value for p in Partition]} (or None: chosen "
            f"from the optimizer), got {value!r}.") from None


@dataclasses.dataclass(frozen=True)
class BlockQuantization:
    """How one tensor travels quantized.

    Attributes:
        bits: 8 (int8) or 4 (int4, two codes per byte).
        block_size: elements per scale; a multiple of 64.
    """

    bits: int = 8
    block_size: int = DEFAULT_QUANTIZATION_BLOCK_SIZE

    def __post_init__(self):
        if self.bits not in QUANTIZATION_BITS:
            raise ValueError(
                f"quantization bits must be one of {QUANTIZATION_BITS}, got {self.bits!r}.")
        if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                or self.block_size < 64 or self.block_size % 64):
            raise ValueError(
                f"quantization_block_size must be a positive multiple of 64, got "
                f"{self.block_size!r}; the default is {DEFAULT_QUANTIZATION_BLOCK_SIZE}.")

    @property
    def qmax(self) -> int:
        """The largest code: 127 for int8, 7 for int4."""
        return (1 << (self.bits - 1)) - 1

    def num_blocks(self, length: int) -> int:
        return max(1, math.ceil(length / self.block_size))

    def code_bytes(self, length: int) -> int:
        """Bytes of the codes of `length` elements (padded to whole blocks)."""
        return self.num_blocks(length) * self.block_size * self.bits // 8

    def wire_length(self, length: int) -> int:
        """float16 elements that carry `length` elements: codes, then scales."""
        return (self.code_bytes(length) + 4 * self.num_blocks(length)) // 2

    def wire_bytes(self, length: int) -> int:
        """Bytes sent for `length` elements."""
        return 2 * self.wire_length(length)


def as_quantization(name: str, value, block_size: int) -> BlockQuantization | None:
    """A `ZeroConfig` setting ("int8", "int4", None) as a `BlockQuantization`.

    Raises:
        ValueError: any other value (named by `name`).
    """
    if value is None:
        return None
    allowed = {"int8": 8} if name == "quantized_weights" else {"int8": 8, "int4": 4}
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {sorted(allowed)} or None (full precision), got "
            f"{value!r}.")
    return BlockQuantization(allowed[value], block_size)


WORKER = "worker"
"""`ZeroStrategy(shard_group_size=WORKER)`: a shard group per worker."""


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
        persistence_threshold: trainable float weights with fewer elements
            than this stay replicated in their own dtype (biases, norms:
            gathering them, or a bucket of their own, would cost more in
            launches than their memory is worth): at stage 3 unsharded, at
            stages 1-2 without a 16-bit working copy.
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
        partition: how optimizer state is split (`Partition`); None chooses
            from the optimizer: whole variables for Lamb, Adafactor, Muon and
            a MultiOptimizer, element-wise for the others.
        param_dtype: stages 1-2 under a mixed-precision policy: "compute"
            (the default) keeps each float32 weight its layer reads in the
            16-bit compute dtype as a 16-bit working copy on every replica,
            its float32 master only in the replica's shard, and publishes
            16-bit values; "float32" keeps float32 weights on every replica,
            cast at each use, as Keras does. Weights read in float32 (autocast
            off, a float32 layer policy, a regularizer) and weights below
            `persistence_threshold` elements stay float32 either way. Applies
            to weights created under `ZeroStrategy.scope()`.
        shard_group_size: hybrid sharding (either partition): state (and
            at stage 3 the weights) is sharded over groups of this many
            consecutive replicas and replicated across the groups; gradients
            are reduce-scattered inside the group, then each shard is
            all-reduced across the groups, and the publish and stage 3's
            gathers stay inside the group. None (default)
            shards over every replica. A setting of `ZeroStrategy` (it fixes
            the strategy's collective groups); it must divide the replica
            count. `ZeroStrategy(shard_group_size="worker")` names the
            devices of one worker (HSDP / hybrid sharding per host).
        quantized_weights: "int8" sends the gathers of float32 master shards
            (stage 3's forward and backward gathers, the publish of 16-bit
            working copies) block-quantized: symmetric int8 codes and one
            float32 scale per `quantization_block_size` elements, dequantized
            into the compute dtype on arrival (ZeRO++'s qwZ). The masters are
            never quantized. None (default): full precision.
        quantized_gradients: "int8" or "int4" sends the gradient
            reduce-scatter (an all-to-all of block-quantized slices, summed
            in float32 on arrival; ZeRO++'s qgZ); under hybrid sharding only
            the all-reduce across shard groups (the slow hop) is quantized.
            Element partition only. None (default): full precision.
        quantization_block_size: elements per scale of both (a multiple of
            64; default 2048).
    """

    stage: int = 2
    bucket_size_bytes: int = DEFAULT_BUCKET_SIZE_BYTES
    reduce_dtype: str | None = None
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH
    recompute: bool = True
    partition: Partition | None = None
    param_dtype: str = "compute"
    shard_group_size: int | None = None
    quantized_weights: str | None = None
    quantized_gradients: str | None = None
    quantization_block_size: int = DEFAULT_QUANTIZATION_BLOCK_SIZE

    def __post_init__(self):
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            raise ValueError(
                f"stage must be one of {STAGES}, got {self.stage!r}. Use "
                "stage=1 to shard optimizer slots, stage=2 to also shard "
                "gradients, stage=3 to also shard the weights.")
        self._set("stage", int(self.stage))
        self._set("persistence_threshold",
                  positive_int("persistence_threshold", self.persistence_threshold, low=0))
        self._set("prefetch_depth", positive_int("prefetch_depth", self.prefetch_depth))
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be True or False, got {self.recompute!r}.")
        try:
            self._set("bucket_size_bytes",
                      positive_int("bucket_size_bytes", self.bucket_size_bytes, low=1024))
        except ValueError as e:
            raise ValueError(f"{e} It is a size in bytes; the default is "
                             f"{DEFAULT_BUCKET_SIZE_BYTES}.") from None
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(
                f"reduce_dtype must be one of {REDUCE_DTYPES}, got "
                f"{self.reduce_dtype!r}.")
        self._set("partition", as_partition(self.partition))
        if self.param_dtype is None:
            self._set("param_dtype", "compute")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"param_dtype must be one of {PARAM_DTYPES} (or None: 'compute'), got "
                f"{self.param_dtype!r}. 'float32' keeps float32 weights on every replica.")

        if self.shard_group_size == WORKER:
            raise ValueError(
                'shard_group_size="worker" is resolved by ZeroStrategy (it knows the devices '
                "of a worker): pass it to ZeroStrategy(shard_group_size=...), or give "
                "ZeroConfig a number of replicas.")
        if self.shard_group_size is not None:
            self._set("shard_group_size",
                      positive_int("shard_group_size", self.shard_group_size))
        self.weight_quantization  # validates all three settings
        self.gradient_quantization

    @property
    def weight_quantization(self) -> BlockQuantization | None:
        """How gathers of master shards travel (None: full precision)."""
        return as_quantization("quantized_weights", self.quantized_weights,
                               self.quantization_block_size)

    @property
    def gradient_quantization(self) -> BlockQuantization | None:
        """How the gradient reduce-scatter travels (None: full precision)."""
        return as_quantization("quantized_gradients", self.quantized_gradients,
                               self.quantization_block_size)

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def override(self, **settings) -> "ZeroConfig":
        """A copy with every setting that is not None replaced (and validated).

        How a `ZeroOptimizer`'s own settings apply over its strategy's.

        Raises:
            ValueError: an invalid setting (named); TypeError: an unknown one.
        """
        given = {k: v for k, v in settings.items() if v is not None}
        return dataclasses.replace(self, **given)
