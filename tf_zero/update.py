"""The step's last links: the inner update of the shards, then publishing them.

`refresh_weight_shards` re-reads each replica's slice of the model's weights
into its shard (the model variables stay the source of truth: a callback or
`set_weights` may have changed them). `update_shards` runs the inner
optimizer's own `update_step` on the shards, with its slots of the same
shape: decoupled weight decay (masked to the variables the inner optimizer
decays) first, and the pieces of variables without a gradient restored
afterwards, weights and slots alike, so a frozen variable that shares a
bucket comes out untouched. `publish` all-gathers the updated shards into
every replica's model weights and applies constraints; a stage-3 weight's
shard is its storage, so it is only constrained.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import _private, collectives, runs
from tf_zero.shards import Shards, shard_mask
from tf_zero.support import distinct


def refresh_weight_shards(shards: Shards, rank: int) -> None:
    """Copies this replica's slice of the model's weights into its shards.

    (Whole variables are updated in the model's own copy: nothing to copy;
    a split variable's runs are copied into the replica's runs of it.)
    """
    if shards.whole:
        runs.refresh(shards.owners[rank].runs, shards.variables)
        return
    for bucket, storage in zip(shards.plan.buckets, shards.storage):
        if not shards.is_owned(bucket):
            _private.local_component(storage).assign(shards.read_weight_shard(bucket, rank))


def update_shards(shards: Shards, inner, shard_grads, missing, rank: int) -> None:
    """The inner optimizer's update of this replica's shards; one step counted."""
    if shards.whole:
        _update_owned(shards, inner, shard_grads, missing, rank)
        return
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
            keep = shard_mask(bucket, pieces, lambda p: p.variable in missing)
            state = [storage, *shards.slots[bucket.index]]
            saved = [tf.identity(_private.local_component(v).read_value()) for v in state]
            restore.append((keep, state, saved))
        _weight_decay(shards, inner, bucket, storage, pieces, lr)
        update_grads.append(grad)
        update_vars.append(storage)
    if update_vars:
        _private.update_step(inner, update_grads, update_vars, lr)
    for keep, state, saved in restore:
        for v, old in zip(state, saved):
            comp = _private.local_component(v)
            comp.assign(tf.where(keep, old, comp.read_value()))
    _update_averages(_averages(shards, inner, rank))
    _private.local_component(inner.iterations).assign_add(1)


def _update_owned(shards, inner, shard_grads, missing, rank):
    """Each whole variable this replica owns, and each run of a split variable
    it holds, by its own optimizer, in place.

    Its learning rate and weight decay are those of the optimizer that
    updates it (the inner one, or a MultiOptimizer's pick); every optimizer
    counts the step, as each of a MultiOptimizer's optimizers does.
    """
    owned = shards.owners[rank]
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
        grad = tf.reshape(tf.concat(parts, 0) if len(parts) > 1 else parts[0], weight.shape)
        opt = shards.optimizers[i]
        lr = rates[id(opt)]
        if opt.weight_decay is not None and _private.uses_weight_decay(
                opt, shards.variables[i]):
            wd = tf.cast(opt.weight_decay, weight.dtype)
            weight.assign_sub(weight.value * wd * tf.cast(lr, weight.dtype))
        _private.update_step(optimizer, [tf.cast(grad, weight.dtype)], [weight], lr)
    _update_averages(_averages(shards, inner, rank))
    for opt in distinct([inner, *shards.optimizers]):
        _private.local_component(opt.iterations).assign_add(1)


def _averages(shards, inner, rank) -> list:
    """(optimizer, weight, average): each moving average this replica keeps
    (`use_ema`), beside what it averages: a shard, an owned variable's copy,
    or a run."""
    if not shards.whole:
        if not inner.use_ema:
            return []
        return [(inner, storage, _average_slot(slots))
                for storage, slots in zip(shards.storage, shards.slots)]
    owned, entries = shards.owners[rank], []
    for i, view in sorted(owned.views.items()):
        if shards.optimizers[i].use_ema:
            entries.append((shards.optimizers[i], view, _average_slot(owned.slot_lists[i])))
    for i, run in sorted(owned.runs.items()):
        if shards.optimizers[i].use_ema:
            entries.append((shards.optimizers[i], run.weight, _average_slot(run.slots)))
    return entries


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


def _weight_decay(shards, inner, bucket, storage, pieces, lr):
    if inner.weight_decay is None:
        return
    decayed = [_private.uses_weight_decay(inner, shards.variables[p.variable]) for p in pieces]
    if not any(decayed):
        return
    dtype = bucket.dtype
    wd = tf.cast(inner.weight_decay, dtype)
    lr = tf.cast(lr, dtype)
    local = _private.local_component(storage)
    if all(decayed):
        local.assign_sub(local.read_value() * wd * lr)
    else:
        decay = dict(zip(pieces, decayed))
        mask = tf.cast(shard_mask(bucket, pieces, decay.__getitem__), dtype)
        local.assign_sub(local.read_value() * wd * lr * mask)


def publish(shards: Shards, missing) -> None:
    """All-gathers the updated shards into the model weights; constraints."""
    gathered = {}
    # Last bucket first, as the reduce-scatters were: the first bucket's
    # gradient was reduced last, so its update is the last to finish.
    for bucket, storage in reversed(list(zip(shards.plan.buckets, shards.storage))):
        if shards.is_owned(bucket):
            _constrain_owned(shards, bucket, storage, missing)
            continue
        gathered[bucket.index] = collectives.all_gather(
            _private.local_component(storage).read_value())
    for bucket in reversed(shards.plan.buckets) if shards.whole else ():
        # The owners updated their copies of the weights: publish those.
        gathered[bucket.index] = collectives.all_gather(
            shards.read_weight_shard(bucket, collectives.rank()))
    owned = shards.owned_variables
    for i, var in enumerate(shards.variables):
        if i in missing or i in owned:
            continue
        parts = [gathered[b][s.offset:s.offset + s.size]
                 for b, s in shards.plan.variable_segments(i)]
        if not parts:
            continue
        value = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
        value = tf.reshape(value, var.shape)
        if var.constraint is not None:
            value = var.constraint(value)
        _private.local_component(var).assign(tf.cast(value, var.dtype))


def _constrain_owned(shards, bucket, storage, missing):
    """A constraint needs the whole weight: gather, constrain, keep the shard."""
    i = bucket.segments[0].variable
    var = shards.variables[i]
    if var.constraint is None or i in missing:
        return
    local = _private.local_component(storage)
    full = collectives.all_gather(local.read_value())
    value = var.constraint(tf.reshape(full[:bucket.size], var.shape))
    flat = tf.reshape(tf.cast(value, bucket.dtype), [-1])
    if bucket.padding:
        flat = tf.concat([flat, tf.zeros([bucket.padding], bucket.dtype)], 0)
    lo, hi = bucket.shard_range(collectives.rank())
    local.assign(flat[lo:hi])
