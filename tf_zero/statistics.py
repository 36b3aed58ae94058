"""Statistics of the reduced gradient and Keras' clipping applied to it.

Each replica holds only its shards of the summed gradient, so any quantity
over the whole gradient (is it finite? its global norm? each variable's
norm?) is a sum of per-replica parts. `gradient_statistics` computes all the
parts the step needs and adds them up in one small all-reduce; every replica
then sees the same numbers and takes the same decisions. `clip` applies the
inner optimizer's `clipnorm` / `global_clipnorm` / `clipvalue` with Keras'
exact formulas, to the reduced gradient: as in single-device training on the
global batch, not per replica.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import collectives
from tf_zero.shards import Shards
from tf_zero.support import distinct


def gradient_statistics(shards: Shards, inner, shard_grads, rank: int,
                        check_finite: bool) -> dict:
    """Replica-wide gradient statistics from one small all-reduce.

    Returns:
        A dict with, as needed, "finite" (no inf/nan in any replica's shard),
        "sq_norms" (per-variable squared norms, for clipnorm) or
        "global_norm" (for global_clipnorm); empty when nothing is needed
        (and then nothing is communicated).
    """
    if _several(shards, inner):  # a MultiOptimizer: each variable its own rule
        per_variable = any(_clips_by_norm(o) for o in shards.optimizers)
        global_norm = False
    else:
        per_variable = bool(inner.clipnorm and inner.clipnorm > 0)
        global_norm = bool(inner.global_clipnorm and inner.global_clipnorm > 0)
    if not (check_finite or per_variable or global_norm):
        return {}
    entries = []
    if check_finite:
        bad = [tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in shard_grads]
        entries.append(tf.add_n(bad) if bad else tf.zeros([]))
    n_vars = len(shards.variables)
    if per_variable:
        sq = [tf.zeros([], tf.float32) for _ in range(n_vars)]
        for bucket, g in zip(shards.plan.buckets, shard_grads):
            for p in bucket.shard_pieces(rank):
                piece = tf.cast(g[p.offset:p.offset + p.size], tf.float32)
                sq[p.variable] = sq[p.variable] + tf.reduce_sum(tf.square(piece))
        entries.extend(sq)
    elif global_norm:
        sq = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in shard_grads]
        entries.append(tf.add_n(sq) if sq else tf.zeros([]))
    totals = collectives.all_reduce_sum(tf.stack(entries))
    stats, i = {}, 0
    if check_finite:
        stats["finite"] = tf.equal(totals[0], 0.0)
        i = 1
    if per_variable:
        stats["sq_norms"] = totals[i:i + n_vars]
    elif global_norm:
        stats["global_norm"] = tf.sqrt(totals[i])
    return stats


def unscale(shard_grads, divisor=None, loss_scaler=None) -> list:
    """Divides by the accumulation window and by the dynamic loss scale."""
    if divisor is not None:
        shard_grads = [g / tf.cast(divisor, g.dtype) for g in shard_grads]
    if loss_scaler is not None:
        scale = loss_scaler.dynamic_scale
        shard_grads = [g / tf.cast(scale, g.dtype) for g in shard_grads]
    return shard_grads


def clip(shards: Shards, inner, shard_grads, rank: int, stats: dict) -> list:
    """Keras' clipping semantics, applied to the reduced gradient shards."""
    if _several(shards, inner):
        return _clip_each(shards, shard_grads, rank, stats.get("sq_norms"))
    if "sq_norms" in stats:
        return _clip_per_variable(shards, inner.clipnorm, shard_grads, rank, stats["sq_norms"])
    if "global_norm" in stats:
        use_norm = stats["global_norm"]
        limit = tf.constant(inner.global_clipnorm, tf.float32)
        # Keras' clip_by_global_norm: NaN scale for a non-finite norm.
        scale_for_finite = limit * tf.minimum(1.0 / use_norm, 1.0 / limit)
        scale = scale_for_finite + (use_norm - use_norm)
        return [g * tf.cast(scale, g.dtype) for g in shard_grads]
    if inner.clipvalue and inner.clipvalue > 0:
        v = inner.clipvalue
        return [tf.clip_by_value(g, -v, v) for g in shard_grads]
    return shard_grads


def _clip_per_variable(shards, clipnorm, shard_grads, rank, sq):
    clipnorm = tf.constant(clipnorm, tf.float32)
    divisors = tf.maximum(_norms(sq), clipnorm)
    return _map_pieces(shards, shard_grads, rank, lambda i, piece: (
        piece * tf.cast(clipnorm, piece.dtype) / tf.cast(divisors[i], piece.dtype)))


def _norms(sq):
    # Keras' clip_by_norm's norm: no sqrt of 0 (its gradient would be NaN).
    return tf.where(sq > 0, tf.sqrt(tf.where(sq > 0, sq, tf.ones_like(sq))), sq)


def _several(shards, inner) -> bool:
    """Whether variables are updated by other optimizers than `inner`."""
    return any(o is not inner for o in shards.optimizers)


def _clips_by_norm(opt) -> bool:
    return bool((opt.clipnorm and opt.clipnorm > 0)
                or (opt.global_clipnorm and opt.global_clipnorm > 0))


def _clip_each(shards, shard_grads, rank, sq):
    """Each variable clipped by its own optimizer's rule, as each of a
    MultiOptimizer's optimizers clips the gradients it is given: clipnorm per
    variable, global_clipnorm over the variables of that optimizer, else
    clipvalue."""
    optimizers = shards.optimizers
    scales = {}
    for opt in distinct(optimizers):
        if _clips_by_norm(opt) and not (opt.clipnorm and opt.clipnorm > 0):
            mine = [i for i, o in enumerate(optimizers) if o is opt]
            norm = tf.sqrt(tf.reduce_sum(tf.gather(sq, mine)))
            limit = tf.constant(opt.global_clipnorm, tf.float32)
            scales[id(opt)] = limit * tf.minimum(1.0 / norm, 1.0 / limit) + (norm - norm)
    norms = _norms(sq) if sq is not None else None

    def rule(i, piece):
        opt = optimizers[i]
        if opt.clipnorm and opt.clipnorm > 0:
            clipnorm = tf.constant(opt.clipnorm, tf.float32)
            divisor = tf.maximum(norms[i], clipnorm)
            return piece * tf.cast(clipnorm, piece.dtype) / tf.cast(divisor, piece.dtype)
        if id(opt) in scales:
            return piece * tf.cast(scales[id(opt)], piece.dtype)
        if opt.clipvalue and opt.clipvalue > 0:
            return tf.clip_by_value(piece, -opt.clipvalue, opt.clipvalue)
        return piece

    return _map_pieces(shards, shard_grads, rank, rule)


def _map_pieces(shards, shard_grads, rank, rule):
    """`rule(variable index, piece)` applied to every piece of every shard."""
    out = []
    for bucket, g in zip(shards.plan.buckets, shard_grads):
        parts, covered = [], 0
        for p in bucket.shard_pieces(rank):
            parts.append(rule(p.variable, g[p.offset:p.offset + p.size]))
            covered += p.size
        if covered < bucket.shard_size:
            parts.append(g[covered:])
        out.append(tf.concat(parts, 0) if len(parts) > 1 else parts[0])
    return out
