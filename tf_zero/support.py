"""What ZeroOptimizer accepts: its arguments, and how it partitions the state.

An element-wise optimizer (SGD, Adam, AdamW, Adamax, Nadam, RMSprop,
Adagrad, Adadelta, Ftrl, Lion, ...) updates every element of a variable from
that element's gradient and slots alone, so any slice of a bucket can be
updated on its own: the element split of `tf_zero.plan.plan_shards`.
Optimizers whose update needs a whole tensor (Lamb's per-layer trust ratio,
Adafactor's factored second moments, Muon's orthogonalization) get the
whole-variable partition (`plan_owners`): each variable is updated whole by
the replica that owns it. So does a `keras.optimizers.MultiOptimizer`: every
variable is updated whole by the optimizer its map picks
(`variable_optimizers`). Errors are raised at construction, before anything is
built, and name what to use instead.
"""

from __future__ import annotations

import warnings

import keras

from tf_zero import _private
from tf_zero.config import ZeroConfig
from tf_zero.sharded_variable import is_sharded

# Optimizers whose update needs a whole tensor (a per-layer trust ratio,
# factored second moments, a matrix orthogonalization). Splitting a variable
# across replicas would silently change their math.
WHOLE_TENSOR_OPTIMIZERS = ("Lamb", "Adafactor", "Muon")
PARTITIONS = ("element", "whole")


def is_multi(inner) -> bool:
    """Whether `inner` is a `keras.optimizers.MultiOptimizer`."""
    return isinstance(inner, keras.optimizers.MultiOptimizer)


def all_optimizers(inner) -> list:
    """`inner`, and a MultiOptimizer's own optimizers after it."""
    return [inner, *(inner.optimizers if is_multi(inner) else ())]


def distinct(optimizers) -> list:
    """Each optimizer once, in order of first appearance (by identity)."""
    return list({id(o): o for o in optimizers}.values())


def _is_keras(optimizer, names) -> bool:
    """Whether `optimizer` is (a subclass of) one of Keras' optimizers `names`."""
    return any(k.__name__ in names and k.__module__.startswith("keras")
               for k in type(optimizer).__mro__)


def needs_whole_tensors(inner) -> bool:
    """Whether `inner` is (a subclass of) a Keras whole-tensor optimizer.

    A MultiOptimizer counts as one: it picks an optimizer per variable, so
    each variable is updated whole by its own optimizer.
    """
    return is_multi(inner) or _is_keras(inner, WHOLE_TENSOR_OPTIMIZERS)


def choose_partition(inner, requested=None) -> str:
    """"whole" for whole-tensor optimizers, else "element"; or as requested.

    Raises:
        ValueError: an unknown partition, or "element" for an optimizer that
            needs whole tensors (its math would change).
    """
    if requested is None:
        return "whole" if needs_whole_tensors(inner) else "element"
    if requested not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS} (or None: chosen "
                         f"from the optimizer), got {requested!r}")
    if requested == "element" and is_multi(inner):
        raise ValueError(
            "A MultiOptimizer gives each variable an optimizer of its own; "
            "ZeroOptimizer partitions it by whole variables: use partition='whole' "
            "(the default for it).")
    if requested == "element" and needs_whole_tensors(inner):
        raise ValueError(
            f"{type(inner).__name__} updates each variable as a whole tensor; "
            "splitting variables across replicas would change its math. Use "
            "partition='whole' (the default for it).")
    return requested


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


def check_whole_partition(inner, config, variables):
    """The whole-variable partition runs at stages 1 and 2, on any number of workers.

    Raises:
        ValueError: stage 3 or stage-3 weights (their storage is split
            element-wise), or two trainable variables with the same path.
    """
    if config.stage == 3 or any(is_sharded(v) for v in variables):
        raise ValueError(
            f"{type(inner).__name__} updates whole variables, which stage 3 "
            "splits across replicas. Train it at stage 2 (ZeroStrategy(stage=2), "
            "ZeroOptimizer(..., stage=2)): its slots are still partitioned, each "
            "variable's on one replica.")
    names = [v.path for v in variables]
    if len(set(names)) != len(names):
        raise ValueError(
            "The whole-variable partition names each variable's optimizer state "
            "by the variable's path, and two trainable variables share one: give "
            "the layers distinct names.")


def variable_optimizers(inner, variables) -> tuple:
    """The optimizer whose math updates each variable.

    `inner` itself, or for a MultiOptimizer the optimizer its map gives the
    variable (each one is checked as an inner optimizer is).
    """
    if not is_multi(inner):
        return (inner,) * len(variables)
    choices = _private.multi_optimizer_choices(inner, variables)
    for opt in distinct(choices):
        check_supported(opt)
    return tuple(choices)


def split_variables(inner, optimizers, variables) -> tuple:
    """Which variables the whole-variable partition may spread across replicas.

    Those their optimizer updates element by element: the ones Keras' Muon
    leaves to its AdamW (embeddings, vectors, norms), and, under a
    MultiOptimizer, those it gives to an element-wise optimizer. Lamb and
    Adafactor need every variable whole. (A partition forced to "whole" on an
    element-wise optimizer keeps every variable whole, as asked.)
    """
    flags = []
    for opt, var in zip(optimizers, variables):
        if is_multi(inner) and not needs_whole_tensors(opt):
            flags.append(True)
        elif _is_keras(opt, ("Muon",)):
            flags.append(_private.muon_uses_adamw(opt, var))
        else:
            flags.append(False)
    return tuple(flags)


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
