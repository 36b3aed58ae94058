"""What ZeroOptimizer accepts: its arguments and the optimizers it can shard.

An element-wise optimizer (SGD, Adam, AdamW, Adamax, Nadam, RMSprop,
Adagrad, Adadelta, Ftrl, Lion, ...) updates every element of a variable from
that element's gradient and slots alone, so any slice of a bucket can be
updated on its own: the element split of `tf_zero.plan`. Optimizers that need
a whole tensor are refused with an error naming what to use instead. Errors
are raised at construction, before anything is built.
"""

from __future__ import annotations

import warnings

import keras

from tf_zero.config import ZeroConfig
from tf_zero.sharded_variable import is_sharded

# Optimizers whose update needs a whole tensor (a per-layer trust ratio,
# factored second moments, a matrix orthogonalization). Splitting a variable
# across replicas would silently change their math.
WHOLE_TENSOR_OPTIMIZERS = ("Lamb", "Adafactor", "Muon")


def validate(inner, stage, bucket_size_bytes, reduce_dtype, accumulation_steps, kwargs):
    """Checks `ZeroOptimizer`'s arguments; `kwargs` are Keras' base arguments.

    Raises:
        TypeError: `inner` is not a Keras optimizer, or unknown arguments.
        ValueError: an unsupported inner optimizer or an invalid setting.
    """
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise TypeError(
            "ZeroOptimizer wraps a Keras optimizer instance, e.g. "
            "ZeroOptimizer(keras.optimizers.Adam(1e-3)); got "
            f"{type(inner).__name__}.")
    if isinstance(inner, keras.optimizers.LossScaleOptimizer) or hasattr(inner, "zero_config"):
        raise ValueError(
            f"ZeroOptimizer cannot wrap a {type(inner).__name__}. "
            "Wrap the plain optimizer: ZeroOptimizer(keras.optimizers.Adam()); "
            "under mixed_float16, model.compile adds loss scaling itself.")
    check_supported(inner)
    for key in ("weight_decay", "clipnorm", "global_clipnorm", "clipvalue",
                "use_ema", "gradient_accumulation_steps", "loss_scale_factor"):
        if kwargs.get(key) not in (None, False):
            raise ValueError(
                f"ZeroOptimizer does not take `{key}`; set it on the inner "
                f"optimizer, e.g. keras.optimizers.AdamW({key}=...).")
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"ZeroOptimizer got unexpected arguments {sorted(kwargs)}")
    if stage is not None:
        ZeroConfig(stage=stage)  # validates
    if bucket_size_bytes is not None:
        ZeroConfig(bucket_size_bytes=bucket_size_bytes)
    if reduce_dtype is not None:
        ZeroConfig(reduce_dtype=reduce_dtype)
    if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1):
        raise ValueError(
            f"accumulation_steps must be a positive int, got {accumulation_steps!r}")


def check_supported(inner):
    """Refuses optimizers whose math a split would change (or that ZeRO cannot host)."""
    for klass in type(inner).__mro__:
        if klass.__name__ in WHOLE_TENSOR_OPTIMIZERS and klass.__module__.startswith("keras"):
            raise ValueError(
                f"{klass.__name__} updates each variable as a whole tensor, so "
                "tf_zero cannot split it across replicas without changing its "
                "math, and does not shard it yet. Use an element-wise optimizer "
                "(SGD, Adam, AdamW, Adamax, Nadam, RMSprop, Adagrad, Adadelta, "
                f"Ftrl, Lion) or train {klass.__name__} unwrapped.")
    if inner.use_ema:
        raise ValueError(
            "ZeroOptimizer does not support use_ema=True on the inner optimizer "
            "(the moving average would need the full weights); drop use_ema or "
            "keep an EMA in a callback.")
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "Keras' gradient_accumulation_steps is not supported inside "
            "ZeroOptimizer (it also fails under MirroredStrategy, "
            "keras-team/keras#20582). Use tf_zero.GradientAccumulationOptimizer("
            "inner, steps=k) instead, and remove it from the inner optimizer.")


def check_stage3(config, strategy, variables):
    """Stage 3 needs sharded weights: warn or refuse when there are none."""
    if config.stage != 3 or any(is_sharded(v) for v in variables):
        return
    if getattr(strategy, "stage", None) == 3:
        warnings.warn(
            "ZeroStrategy(stage=3): no trainable weight of this model is "
            "sharded (none has persistence_threshold="
            f"{strategy.zero_config.persistence_threshold} elements or more), "
            "so the trainable weights are updated as at stage 2. Frozen "
            "weights created under the scope are sharded all the same "
            "(tf_zero.is_sharded tells which). Lower persistence_threshold "
            "to shard smaller weights.",
            stacklevel=4)
        return
    raise ValueError(
        "ZeroOptimizer at stage 3 found no sharded weights: stage 3 shards "
        "weights when they are created, so build the model under "
        "tf_zero.ZeroStrategy(stage=3).scope() (weights smaller than "
        "persistence_threshold stay replicated), or use stage=2.")
