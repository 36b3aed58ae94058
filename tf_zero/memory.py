"""`memory_report`: per-replica bytes of training state, read from the
variables' device components (never from a formula; `tf_zero.estimate`
predicts). See docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tf_zero import _private
from tf_zero.state.partition import all_optimizers


@dataclasses.dataclass(frozen=True)
class ReplicaMemory:
    """Bytes of persistent training state held on one device.

    Attributes:
        device: the device name.
        weights: trainable model weights (full copies on every replica
            at stages 1 and 2; at stage 3 the replica's shards of the
            sharded weights plus full copies of the small ones).
        weight_shards: the replica's slice of the weights that the inner
            optimizer updates (0 when not sharded).
        slots: optimizer slot variables (momenta, velocities, ...).
        gradient_buffers: gradients kept between steps (accumulators).
        frozen_weights: the model's non-trainable weights (a LoRA base model's
            frozen kernels, BatchNormalization statistics); counted only when
            `memory_report` is given the model. Frozen weights created under
            `ZeroStrategy(stage=3).scope()` count as the replica's shards.
    """

    device: str
    weights: int = 0
    weight_shards: int = 0
    slots: int = 0
    gradient_buffers: int = 0
    frozen_weights: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.weight_shards + self.slots + self.gradient_buffers
                + self.frozen_weights)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Measured per-replica bytes, with the unsharded optimizer's figure.

    Attributes:
        stage: ZeRO stage, or 0 for an optimizer that does not shard.
        replicas: one `ReplicaMemory` per local device.
        unsharded: what the plain inner optimizer would hold per replica.
    """

    stage: int
    replicas: tuple[ReplicaMemory, ...]
    unsharded: ReplicaMemory

    @property
    def max_replica(self) -> ReplicaMemory:
        return max(self.replicas, key=lambda r: r.total)

    def __str__(self):
        def mib(b):
            return f"{b / 2**20:10.3f}"

        header = (f"{'device':<40}{'weights':>10}{'w-shards':>10}{'slots':>10}"
                  f"{'grad-buf':>10}{'frozen':>10}{'total':>10}  (MiB)")
        lines = [f"tf_zero memory report (stage {self.stage})", header]
        for r in self.replicas + (self.unsharded,):
            device = r.device.replace("/job:localhost/replica:0/task:0", "")
            lines.append(f"{device:<40}{mib(r.weights)}{mib(r.weight_shards)}"
                         f"{mib(r.slots)}{mib(r.gradient_buffers)}"
                         f"{mib(r.frozen_weights)}{mib(r.total)}")
        return "\n".join(lines)


def _nbytes(component):
    return int(component.shape.num_elements()) * component.dtype.size


def _count(acc, field, variables) -> None:
    """Adds each device component's bytes of `variables` to `acc[device][field]`."""
    for variable in variables:
        for c in _private.components(variable):
            acc.setdefault(c.device, {}).setdefault(field, 0)
            acc[c.device][field] += _nbytes(c)


def _full_bytes(variables) -> int:
    return sum(int(v.shape.num_elements()) * tf.as_dtype(v.dtype).size for v in variables)


def _without_loss_scaling(optimizer):
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _sharded(acc, optimizer) -> tuple:
    """Counts a sharded ZeroOptimizer's state; (model variables, unsharded
    slot bytes, unsharded accumulator bytes)."""
    shards = optimizer.shards
    # (A stage-3 weight's shards are its "weights"; a working weight's master
    # shards are weight shards beside its 16-bit copy.)
    _count(acc, "weight_shards", [s for b, s in zip(shards.plan.buckets, shards.storage)
                                  if not shards.arrives_reduced(b)])
    _count(acc, "slots", [slot for slots in shards.slots for slot in slots])
    _count(acc, "gradient_buffers", optimizer.gradient_buffers)
    for owned in shards.owners.values():  # whole variables: slots on their owner
        _count(acc, "slots", [slot for slots in owned.slot_lists.values() for slot in slots])
        for run in owned.runs.values():  # split variables: a run on each replica
            _count(acc, "weight_shards", [run.weight])
            _count(acc, "slots", run.slots)
    unsharded_slots = sum(
        sum(bucket.size * tf.as_dtype(s.dtype).size for s in slots)
        for bucket, slots in zip(shards.plan.buckets, shards.slots))
    unsharded_slots += sum(  # every variable's, also those other workers own
        int(tf.TensorShape(spec.shape).num_elements()) * spec.dtype.size
        for specs in shards.slot_specs for spec in specs)
    return list(shards.variables), unsharded_slots, optimizer.unsharded_gradient_buffer_bytes()


def _plain(acc, optimizer) -> list:
    """Counts a plain (or unsharded) optimizer's state; its model variables."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    skip = {id(v) for opt in all_optimizers(inner) for v in (
        _private.iterations_variable(opt), _private.learning_rate_variable(opt))}
    _count(acc, "slots", [v for v in inner.variables if id(v) not in skip])
    _count(acc, "gradient_buffers", _private.accumulated_gradients(inner))
    return _private.trained_variables(inner)


def memory_report(optimizer, model=None) -> MemoryReport:
    """Measures the per-replica bytes of an optimizer's training state.

    Every figure is summed from the actual per-device components of the
    variables (a sharded slot of 1/N of a bucket counts 1/N), never derived
    from a formula. Works for `ZeroOptimizer` and for plain Keras optimizers
    (stage 0), so the two can be put side by side.

    Args:
        optimizer: a built `ZeroOptimizer` or Keras optimizer (a
            `LossScaleOptimizer` is looked through).
        model: optional; its non-trainable weights are then counted too
            (`frozen_weights`), e.g. the frozen base of a LoRA model.

    Returns:
        A `MemoryReport`.

    Raises:
        ValueError: the optimizer is not built yet.
    """
    if isinstance(optimizer, keras.Model):
        raise TypeError(
            "memory_report takes the optimizer first: memory_report(model.optimizer) (and "
            "memory_report(model.optimizer, model) to count frozen weights too).")
    optimizer = _without_loss_scaling(optimizer)
    if not optimizer.built:
        raise ValueError(
            "memory_report needs a built optimizer: call it after model.fit "
            "or optimizer.build(model.trainable_variables).")
    acc: dict = {}
    if getattr(optimizer, "is_sharded", False):
        stage = optimizer.stage
        model_vars, unsharded_slots, unsharded_grads = _sharded(acc, optimizer)
    else:
        stage = 0
        model_vars = _plain(acc, optimizer)
    _count(acc, "weights", model_vars)
    trained = {id(_private.tf_variable(v)) for v in model_vars}
    frozen = [v for v in (model.weights if model is not None else [])
              if id(_private.tf_variable(v)) not in trained]
    _count(acc, "frozen_weights", frozen)
    replicas = tuple(ReplicaMemory(device=d, **fields) for d, fields in sorted(acc.items()))
    first = replicas[0] if replicas else ReplicaMemory("none")
    if stage == 0:
        unsharded_slots, unsharded_grads = first.slots, first.gradient_buffers
    unsharded = ReplicaMemory(device="unsharded (per replica)", weights=_full_bytes(model_vars),
                              slots=unsharded_slots, gradient_buffers=unsharded_grads,
                              frozen_weights=_full_bytes(frozen))
    return MemoryReport(stage=stage, replicas=replicas, unsharded=unsharded)
