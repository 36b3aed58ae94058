"""Per-replica memory of training state, read from the device components."""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tf_zero import _private, support
from tf_zero.optimizer import ZeroOptimizer


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


def _add(acc, device, field, nbytes):
    acc.setdefault(device, {}).setdefault(field, 0)
    acc[device][field] += nbytes


def _nbytes(component):
    return int(component.shape.num_elements()) * component.dtype.size


def _unwrap(optimizer):
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


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
    optimizer = _unwrap(optimizer)
    if not optimizer.built:
        raise ValueError(
            "memory_report needs a built optimizer: call it after model.fit "
            "or optimizer.build(model.trainable_variables).")
    acc: dict = {}
    if isinstance(optimizer, ZeroOptimizer) and optimizer.is_sharded:
        stage = optimizer.stage
        shards = optimizer.shards
        model_vars = list(shards.variables)
        inner = optimizer.inner_optimizer
        for bucket, shard in zip(shards.plan.buckets, shards.storage):
            if shards.is_owned(bucket):
                continue  # a stage-3 weight: counted under "weights" below
            for c in _private.components(shard):
                _add(acc, c.device, "weight_shards", _nbytes(c))
        for slots in shards.slots:
            for slot in slots:
                for c in _private.components(slot):
                    _add(acc, c.device, "slots", _nbytes(c))
        for buf in optimizer.gradient_buffers:
            for c in _private.components(buf):
                _add(acc, c.device, "gradient_buffers", _nbytes(c))
        unsharded_slots = sum(
            sum(bucket.size * tf.as_dtype(s.dtype).size for s in slots)
            for bucket, slots in zip(shards.plan.buckets, shards.slots))
        for owned in shards.owners.values():  # whole variables: slots on their owner
            for slots in owned.slot_lists.values():
                for slot in slots:
                    for c in _private.components(slot):
                        _add(acc, c.device, "slots", _nbytes(c))
            for run in owned.runs.values():  # split variables: a run on each replica
                weight = _private.tf_variable(run.weight)
                _add(acc, weight.device, "weight_shards", _nbytes(weight))
                for slot in run.slots:
                    slot = _private.tf_variable(slot)
                    _add(acc, slot.device, "slots", _nbytes(slot))
        unsharded_slots += sum(  # every variable's, also those other workers own
            int(tf.TensorShape(spec.shape).num_elements()) * spec.dtype.size
            for specs in shards.slot_specs for spec in specs)
        unsharded_grads = optimizer.unsharded_gradient_buffer_bytes()
    else:
        stage = 0
        inner = optimizer.inner_optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
        model_vars = _private.trained_variables(inner)
        skip = {id(v) for opt in support.all_optimizers(inner) for v in (
            _private.iterations_variable(opt), _private.learning_rate_variable(opt))}
        slot_vars = [v for v in inner.variables if id(v) not in skip]
        for slot in slot_vars:
            for c in _private.components(slot):
                _add(acc, c.device, "slots", _nbytes(c))
        unsharded_slots = None
        unsharded_grads = 0
        for buf in _private.accumulated_gradients(inner):
            for c in _private.components(buf):
                _add(acc, c.device, "gradient_buffers", _nbytes(c))
    for var in model_vars:
        for c in _private.components(var):
            _add(acc, c.device, "weights", _nbytes(c))
    trained = {id(_private.tf_variable(v)) for v in model_vars}
    frozen = [v for v in (model.weights if model is not None else [])
              if id(_private.tf_variable(v)) not in trained]
    for var in frozen:
        for c in _private.components(var):
            _add(acc, c.device, "frozen_weights", _nbytes(c))
    replicas = tuple(ReplicaMemory(device=d, **fields) for d, fields in sorted(acc.items()))
    first = replicas[0] if replicas else ReplicaMemory("none")
    if unsharded_slots is None:
        unsharded_slots = first.slots
        unsharded_grads = first.gradient_buffers
    full_weights = sum(int(v.shape.num_elements()) * tf.as_dtype(v.dtype).size
                       for v in model_vars)
    full_frozen = sum(int(v.shape.num_elements()) * tf.as_dtype(v.dtype).size
                      for v in frozen)
    unsharded = ReplicaMemory(device="unsharded (per replica)", weights=full_weights,
                              slots=unsharded_slots, gradient_buffers=unsharded_grads,
                              frozen_weights=full_frozen)
    return MemoryReport(stage=stage, replicas=replicas, unsharded=unsharded)

