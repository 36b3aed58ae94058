"""Links 7-8 of the step: the inner optimizer's update on this replica's part,
then publishing it into every replica's model weights.

Two variants, chosen once when the step is built (`make_update`):
`ElementUpdate` (the element split: each bucket's shard, refreshed from the
model's weights, which stay the source of truth, then updated by the inner
optimizer's own `update_step` with its slots of the same shape) and
`WholeUpdate` (each owner updates its whole variables, and each replica its
runs of split variables, in place). Both keep frozen pieces untouched, apply
decoupled weight decay as the inner optimizer would, keep `use_ema`
averages, and publish with one all-gather per bucket, last bucket first.
See docs/architecture.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private, collectives
from tf_zero.state.partition import distinct


def make_update(shards, inner):
    """The update link for `shards`' partition."""
    return WholeUpdate(shards, inner) if shards.whole else ElementUpdate(shards, inner)


class _Update:
    """What both variants share: moving averages and writing the published weights."""

    def __init__(self, shards, inner):
        self.shards = shards
        self.inner = inner

    def _publish_variables(self, gathered: dict, missing) -> None:
        """Writes each variable's gathered segments into this replica's copy of
        it (constraints applied to the full value)."""
        shards = self.shards
        stored = shards.stored_variables
        for i, var in enumerate(shards.variables):
            if i in missing or i in stored:
                continue
            parts = [gathered[b][s.offset:s.offset + s.size]
                     for b, s in shards.plan.variable_segments(i)]
            if not parts:
                continue
            value = tf.reshape(collectives.join(parts), var.shape)
            if var.constraint is not None:
                value = var.constraint(value)
            _private.local_component(var).assign(tf.cast(value, var.dtype))


class ElementUpdate(_Update):
    """The element split: every replica updates its shard of every bucket."""

    def refresh(self, rank: int) -> None:
        """Copies this replica's slice of the model's weights into its shards
        (a callback or `set_weights` may have changed them)."""
        shards = self.shards
        for bucket, storage in zip(shards.plan.buckets, shards.storage):
            if not shards.is_stored(bucket):
                _private.local_component(storage).assign(shards.read_weight_shard(bucket, rank))

    def update(self, shard_grads, missing, rank: int) -> None:
        """The inner optimizer's update of this replica's shards; one step counted.

        Weight decay first (masked to the variables the inner optimizer
        decays); the pieces of variables without a gradient are restored
        afterwards, weights and slots alike.
        """
        shards, inner = self.shards, self.inner
        lr = inner.learning_rate
        update_grads, update_vars, restore = [], [], []
        for bucket, storage, grad in zip(shards.plan.buckets, shards.storage, shard_grads):
            pieces = bucket.shard_pieces(rank)
            frozen = [p for p in pieces if p.variable in missing]
            if frozen and len(frozen) == len(pieces):
                continue
            if frozen:
                # Variables without a gradient share this shard: their weights
                # and slots must come out of the update untouched.
                keep = tf.constant(bucket.shard_mask(rank, lambda p: p.variable in missing))
                state = [storage, *shards.slots[bucket.index]]
                saved = [tf.identity(_private.local_component(v).read_value()) for v in state]
                restore.append((keep, state, saved))
            self._weight_decay(bucket, storage, rank, lr)
            update_grads.append(grad)
            update_vars.append(storage)
        if update_vars:
            _private.update_step(inner, update_grads, update_vars, lr)
        for keep, state, saved in restore:
            for v, old in zip(state, saved):
                comp = _private.local_component(v)
                comp.assign(tf.where(keep, old, comp.read_value()))
        _update_averages(self._averages())
        _private.local_component(inner.iterations).assign_add(1)

    def _weight_decay(self, bucket, storage, rank, lr) -> None:
        inner = self.inner
        if inner.weight_decay is None:
            return
        pieces = bucket.shard_pieces(rank)
        decayed = {p: _private.uses_weight_decay(inner, self.shards.variables[p.variable])
                   for p in pieces}
        if not any(decayed.values()):
            return
        dtype = bucket.dtype
        wd = tf.cast(inner.weight_decay, dtype)
        lr = tf.cast(lr, dtype)
        local = _private.local_component(storage)
        if all(decayed.values()):
            local.assign_sub(local.read_value() * wd * lr)
        else:
            mask = tf.cast(tf.constant(bucket.shard_mask(rank, decayed.__getitem__)), dtype)
            local.assign_sub(local.read_value() * wd * lr * mask)

    def _averages(self) -> list:
        if not self.inner.use_ema:
            return []
        return [(self.inner, storage, _average_slot(slots))
                for storage, slots in zip(self.shards.storage, self.shards.slots)]

    def publish(self, missing) -> None:
        """All-gathers the updated shards into the model weights; constraints.

        Last bucket first, as the reduce-scatters were: the first bucket's
        gradient was reduced last, so its update is the last to finish. A
        stage-3 weight's shard is its storage: only constrained. A working
        weight's master shard is constrained, then gathered cast to the
        16-bit dtype of its working copy.
        """
        shards = self.shards
        gathered = {}
        for bucket, storage in reversed(list(zip(shards.plan.buckets, shards.storage))):
            if shards.is_stored(bucket):
                self._constrain_stored(bucket, storage, missing)
                working = shards.working_storage(bucket)
                if working is not None and bucket.segments[0].variable not in missing:
                    working.publish()
                continue
            gathered[bucket.index] = collectives.all_gather(
                _private.local_component(storage).read_value(), group=shards.shard_group)
        self._publish_variables(gathered, missing)

    def _constrain_stored(self, bucket, storage, missing) -> None:
        """A constraint needs the whole weight: gather, constrain, keep the shard."""
        i = bucket.segments[0].variable
        var = self.shards.variables[i]
        if var.constraint is None or i in missing:
            return
        local = _private.local_component(storage)
        full = collectives.all_gather(local.read_value())
        value = var.constraint(tf.reshape(full[:bucket.size], var.shape))
        flat = collectives.pad(tf.reshape(tf.cast(value, bucket.dtype), [-1]),
                               bucket.padded_size)
        lo, hi = bucket.shard_range(collectives.rank())
        local.assign(flat[lo:hi])


class WholeUpdate(_Update):
    """The whole-variable partition: each owner updates its variables whole,
    each replica its runs of split variables, by their own optimizers."""

    def refresh(self, rank: int) -> None:
        """Copies each of this replica's runs of split variables from its copy
        of the model's weights (whole variables are updated in that copy)."""
        for run in self.shards.local_owned().runs.values():
            local = _private.local_component(self.shards.variables[run.variable])
            run.weight.assign(
                tf.reshape(local.read_value(), [-1])[run.start:run.start + run.size])

    def update(self, shard_grads, missing, rank: int) -> None:
        """Each whole variable this replica owns, and each run of a split
        variable it holds, by its own optimizer, in place.

        Its learning rate and weight decay are those of the optimizer that
        updates it (the inner one, or a MultiOptimizer's pick); every optimizer
        counts the step, as each of a MultiOptimizer's optimizers does.
        """
        shards = self.shards
        owned = shards.local_owned()
        rates = {id(opt): opt.learning_rate for opt in distinct(shards.optimizers)}
        local = [(i, view, owned.optimizers[i]) for i, view in sorted(owned.views.items())]
        local += [(i, run.weight, run.optimizer) for i, run in sorted(owned.runs.items())]
        for i, weight, optimizer in local:
            parts = []  # this replica's part of the gradient, bucket by bucket
            for b, seg in shards.plan.variable_segments(i):
                lo = seg.offset - rank * shards.plan.buckets[b].shard_size
                if 0 <= lo < shards.plan.buckets[b].shard_size:
                    parts.append(shard_grads[b][lo:lo + seg.size])
            if i in missing or not parts:
                continue
            grad = tf.reshape(collectives.join(parts), weight.shape)
            opt = shards.optimizers[i]
            lr = rates[id(opt)]
            if opt.weight_decay is not None and _private.uses_weight_decay(
                    opt, shards.variables[i]):
                wd = tf.cast(opt.weight_decay, weight.dtype)
                weight.assign_sub(weight.value * wd * tf.cast(lr, weight.dtype))
            _private.update_step(optimizer, [tf.cast(grad, weight.dtype)], [weight], lr)
        _update_averages(self._averages(owned))
        for opt in distinct([self.inner, *shards.optimizers]):
            _private.local_component(opt.iterations).assign_add(1)

    def _averages(self, owned) -> list:
        shards, entries = self.shards, []
        for i, view in sorted(owned.views.items()):
            if shards.optimizers[i].use_ema:
                entries.append((shards.optimizers[i], view, _average_slot(owned.slot_lists[i])))
        for i, run in sorted(owned.runs.items()):
            if shards.optimizers[i].use_ema:
                entries.append((shards.optimizers[i], run.weight, _average_slot(run.slots)))
        return entries

    def publish(self, missing) -> None:
        """The owners updated their copies of the weights: all-gather those
        (inside the shard group under hybrid sharding), last bucket first."""
        shards = self.shards
        rank = shards.shard_rank(collectives.rank())
        runs = shards.local_owned().runs
        gathered = {b.index: collectives.all_gather(shards.read_weight_shard(b, rank, runs),
                                                    group=shards.shard_group)
                    for b in reversed(shards.plan.buckets)}
        self._publish_variables(gathered, missing)


def _average_slot(slots):
    return next(s for s in slots if s.name.endswith("_average"))


def _update_averages(entries) -> None:
    """Keras' moving average of the weights, with its formula, on the part this
    replica keeps; every `ema_overwrite_frequency` steps the weights take the
    averages (published by the all-gather that follows)."""
    for opt, weight, average in entries:
        w, a = _private.local_component(weight), _private.local_component(average)
        not_first = tf.not_equal(_private.local_component(opt.iterations).read_value(), 0)
        momentum = tf.cast(not_first, w.dtype) * opt.ema_momentum
        a.assign(momentum * a.read_value() + (1 - momentum) * w.read_value())
    for opt in distinct([e[0] for e in entries if e[0].ema_overwrite_frequency]):
        pairs = [(w, a) for o, w, a in entries if o is opt]
        step = _private.local_component(opt.iterations).read_value() + 1

        def overwrite(pairs=pairs):
            for w, a in pairs:
                _private.local_component(w).assign(_private.local_component(a).read_value())
            return tf.constant(True)

        tf.cond(tf.equal(step % opt.ema_overwrite_frequency, 0), overwrite,
                lambda: tf.constant(False))


def overwrite_with_averages(shards, items) -> None:
    """Every model variable takes its full moving average (end of `fit`, with
    `use_ema`): read whole from the checkpoint face, written to every replica.
    Cross-replica context."""
    for item in items:
        if getattr(item, "variable_index", None) is None or not item.name.endswith("_average"):
            continue
        var = shards.variables[item.variable_index]
        var.assign(tf.cast(item.value(), var.dtype))
