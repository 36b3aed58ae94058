"""What ZeroOptimizer accepts: its arguments, the inner optimizers it can
host, and what stage 3 and the whole-variable partition need.

Errors are raised before anything is built, and name what to use instead.
See docs/semantics.md ("What is refused").
"""

from __future__ import annotations

import warnings

import keras

from tf_zero import _private
from tf_zero.config import Partition, ZeroConfig, positive_int
from tf_zero.state.partition import choose_partition, distinct, is_multi


def validate(inner, settings: dict, accumulation_steps, kwargs) -> tuple:
    """Checks `ZeroOptimizer`'s arguments; returns them normalized: (settings,
    with NumPy integers as ints and the partition a `Partition`; the
    accumulation steps as an int).

    Args:
        inner: the inner optimizer.
        settings: the `ZeroConfig` fields given to the optimizer (None: the
            strategy's).
        accumulation_steps: micro-batches per update.
        kwargs: Keras' base optimizer arguments, which belong on the inner one.

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
    config = ZeroConfig().override(**settings)  # validates every given setting
    choose_partition(inner, settings.get("partition"))
    normalized = {key: getattr(config, key) if value is not None else None
                  for key, value in settings.items()}
    return normalized, positive_int("accumulation_steps", accumulation_steps)


def check_supported(inner):
    """Refuses what ZeroOptimizer cannot host: Keras' own accumulation.

    (A MultiOptimizer's own optimizers are checked one by one.)
    """
    if is_multi(inner):
        for opt in inner.optimizers:
            check_supported(opt)
        return
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "Keras' gradient_accumulation_steps is not supported inside "
            "ZeroOptimizer (it also fails under MirroredStrategy, "
            "keras-team/keras#20582). Use tf_zero.GradientAccumulationOptimizer("
            "inner, steps=k) instead, and remove it from the inner optimizer.")


def check_whole_partition(inner, config, variables, optimizers):
    """The whole-variable partition runs at stages 1 and 2, on any number of workers.

    Raises:
        ValueError: stage 3 or stage-3 weights (their storage is split
            element-wise), two trainable variables with the same path, or one
            of `optimizers` (per variable, the one that updates it: a
            MultiOptimizer's picks) that cannot be hosted.
    """
    if config.stage == 3 or any(_private.is_sharded(v) for v in variables):
        raise ValueError(
            f"{type(inner).__name__} updates whole variables, which stage 3 "
            "splits across replicas. Train it at stage 2 (ZeroStrategy(stage=2), "
            "ZeroOptimizer(..., stage=2)): its slots are still partitioned, each "
            "variable's on one replica.")
    if any(_private.sharded_storage(v) is not None for v in variables):
        raise ValueError(
            f"{type(inner).__name__} updates whole variables, and this model's weights "
            "were created as 16-bit working copies over float32 master shards (split "
            "element-wise): create the model under ZeroStrategy(param_dtype='float32') "
            "to train it with a whole-variable optimizer under a mixed policy.")
    names = [v.path for v in variables]
    if len(set(names)) != len(names):
        raise ValueError(
            "The whole-variable partition names each variable's optimizer state "
            "by the variable's path, and two trainable variables share one: give "
            "the layers distinct names.")
    for opt in distinct(optimizers):
        check_supported(opt)


def _why_unsharded(variables, threshold: int) -> str:
    """Why a stage-3 model's trainable weights are not shards, and the fix."""
    if any((v.shape.num_elements() or 0) >= threshold for v in variables):
        return (f"weights of persistence_threshold={threshold} elements or more were "
                "created where they could not be sharded: outside strategy.scope(), or "
                "inside the training step, where a model without a keras.Input builds its "
                "weights at its first call; create them under strategy.scope() before "
                "training (give the model a keras.Input, or call model.build(input_shape))")
    return (f"none has persistence_threshold={threshold} elements or more; lower "
            "persistence_threshold to shard smaller weights")


def check_stage3(config, strategy, variables, optimizers=()):
    """Stage 3 needs sharded weights: warn or refuse when there are none.

    Raises:
        ValueError: no sharded weights under an explicit stage 3, or an
            optimizer with `use_ema=True` (stage 3 keeps no full weights to
            average into).
    """
    if config.stage == 3 and any(getattr(o, "use_ema", False) for o in optimizers):
        raise ValueError(
            "use_ema=True is supported at stages 1 and 2 (the moving averages "
            "are sharded like slots), not at stage 3: train at stage 2, or "
            "drop use_ema.")
    if config.stage != 3 or any(_private.is_sharded(v) for v in variables):
        return
    if getattr(strategy, "stage", None) == 3:
        warnings.warn(
            "ZeroStrategy(stage=3): no trainable weight of this model is sharded ("
            + _why_unsharded(variables, strategy.zero_config.persistence_threshold)
            + "), so the trainable weights are updated as at stage 2. Frozen "
            "weights created under the scope are sharded all the same "
            "(tf_zero.is_sharded tells which).",
            stacklevel=4)
        return
    raise ValueError(
        "ZeroOptimizer at stage 3 found no sharded weights: stage 3 shards "
        "weights when they are created, so build the model under "
        "tf_zero.ZeroStrategy(stage=3).scope() (weights smaller than "
        "persistence_threshold stay replicated), or use stage=2.")


def check_created_before_the_step(variables) -> None:
    """Refuses weights that were created inside the traced step.

    A model without an `Input` creates its weights at its first call; in a
    custom loop that call is inside `strategy.run` under `tf.function`, and
    such weights get their values only when the function runs. The shards are
    cut from the weights' values when the optimizer is built (in that same
    first step), and under a collective strategy TensorFlow cannot run those
    initializers anyway ("You must feed a value for placeholder tensor", with
    MirroredStrategy on several CPUs too).

    Raises:
        ValueError: a weight holds no value yet; names it and the fix.
    """
    missing = _private.uninitialized(variables)
    if missing:
        raise ValueError(
            f"The model's weights ({', '.join(v.path for v in missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}) were created inside the traced "
            "training step, so they have no value when ZeroOptimizer builds its shards "
            "from them. Give the model an Input (keras.Input(shape) as its first layer) "
            "or build it before the loop (model.build(input_shape), or call it once on "
            "a batch under strategy.scope()).")


def check_quantization(config, partition, variables):
    """Where quantized collectives apply: gradients with the element
    partition; weights where float32 master shards are gathered (stage 3,
    16-bit working copies).

    Raises:
        ValueError: `quantized_gradients` with the whole-variable partition,
            or `quantized_weights` with no weight gathered from a master
            shard; named, with the fix.
    """
    if config.quantized_gradients is not None and partition == Partition.WHOLE:
        raise ValueError(
            "quantized_gradients quantizes the element partition's reduce-scatter; this "
            "optimizer owns whole variables (Lamb, Adafactor, Muon, a MultiOptimizer), "
            "whose gradients are reduced to their owner. Use quantized_gradients=None.")
    if config.quantized_weights is not None and not any(
            _private.sharded_storage(v) is not None for v in variables):
        if config.stage == 3:
            fix = _why_unsharded(variables, config.persistence_threshold)
        else:
            fix = ("use stage=3, or stages 1-2 under a mixed-precision policy with "
                   "param_dtype='compute' (16-bit working copies) for weights of at least "
                   f"persistence_threshold={config.persistence_threshold} elements. In "
                   "float32 at stages 1-2 each replica's weight is its own master, which a "
                   "quantized publish would corrupt")
        raise ValueError(
            "quantized_weights quantizes the gathers of float32 master shards, and no "
            f"weight here has one: {fix}; or use quantized_weights=None.")
