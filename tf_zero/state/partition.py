"""Who updates which variable: the element split or whole variables, and the
optimizer whose math updates each one (a MultiOptimizer's pick).

An element-wise optimizer (SGD, Adam, AdamW, Adamax, Nadam, RMSprop,
Adagrad, Adadelta, Ftrl, Lion, ...) updates every element from that
element's gradient and slots alone, so any slice of a bucket can be updated
on its own (`Partition.ELEMENT`). Lamb, Adafactor and Muon need whole
tensors, and so does a MultiOptimizer (each variable by its own optimizer):
`Partition.WHOLE`. See docs/whole-variable.md.
"""

from __future__ import annotations

from tf_zero import _private
from tf_zero.config import Partition, as_partition

# Optimizers whose update needs a whole tensor (a per-layer trust ratio,
# factored second moments, a matrix orthogonalization). Splitting a variable
# across replicas would silently change their math.
WHOLE_TENSOR_OPTIMIZERS = ("Lamb", "Adafactor", "Muon")


def is_multi(inner) -> bool:
    """Whether `inner` is a `keras.optimizers.MultiOptimizer`."""
    return _private.is_multi_optimizer(inner)


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


def choose_partition(inner, requested=None) -> Partition:
    """`Partition.WHOLE` for whole-tensor optimizers, else `Partition.ELEMENT`;
    or as requested.

    Raises:
        ValueError: an unknown partition, or "element" for an optimizer that
            needs whole tensors (its math would change).
    """
    requested = as_partition(requested)
    if requested is None:
        return Partition.WHOLE if needs_whole_tensors(inner) else Partition.ELEMENT
    if requested == Partition.ELEMENT and is_multi(inner):
        raise ValueError(
            "A MultiOptimizer gives each variable an optimizer of its own; "
            "ZeroOptimizer partitions it by whole variables: use partition='whole' "
            "(the default for it).")
    if requested == Partition.ELEMENT and needs_whole_tensors(inner):
        raise ValueError(
            f"{type(inner).__name__} updates each variable as a whole tensor; "
            "splitting variables across replicas would change its math. Use "
            "partition='whole' (the default for it).")
    return requested


def variable_optimizers(inner, variables) -> tuple:
    """The optimizer whose math updates each variable.

    `inner` itself, or for a MultiOptimizer the optimizer its map gives the
    variable (`admission.check_whole_partition` checks each one as an inner
    optimizer is checked).
    """
    if not is_multi(inner):
        return (inner,) * len(variables)
    return tuple(_private.multi_optimizer_choices(inner, variables))


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
