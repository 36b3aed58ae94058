"""Links 4-6 of the step: unscaling, the statistics of the reduced gradient,
and Keras' clipping applied to it.

Each replica holds only its shards of the summed gradient, so whatever needs
the whole gradient (is it finite? its global norm? each variable's norm?) is
a sum of per-replica parts, added up in one small all-reduce; every replica
then takes the same decisions. The clipping rule of the inner optimizer (or
of each of a MultiOptimizer's) is chosen once, when the step is built
(`ClipRule.of`), and applies Keras' exact formulas to the reduced gradient:
as in single-device training on the global batch. See docs/semantics.md.
"""

from __future__ import annotations

import tensorflow as tf

from tf_zero import collectives
from tf_zero.state.partition import distinct


def _positive(value) -> bool:
    return bool(value and value > 0)


class ClipRule:
    """Keras' clipping of the reduced gradient shards; this base clips nothing.

    Attributes:
        needs: the statistic the rule reads: "sq_norms" (per variable),
            "global_norm" or None.
    """

    needs = None

    @staticmethod
    def of(shards, inner) -> "ClipRule":
        """The rule of `inner`'s `clipnorm` / `global_clipnorm` / `clipvalue`
        (Keras allows one of them), or each variable's own optimizer's under a
        MultiOptimizer."""
        if any(o is not inner for o in shards.optimizers):
            return ClipEach(shards.optimizers)
        if _positive(inner.clipnorm):
            return ClipNorm(inner.clipnorm)
        if _positive(inner.global_clipnorm):
            return ClipGlobalNorm(inner.global_clipnorm)
        if _positive(inner.clipvalue):
            return ClipValue(inner.clipvalue)
        return ClipRule()

    def __call__(self, shards, shard_grads, rank: int, stats: dict) -> list:
        return shard_grads


class ClipNorm(ClipRule):
    """`clipnorm`: each variable scaled to at most that norm."""

    needs = "sq_norms"

    def __init__(self, clipnorm):
        self.clipnorm = clipnorm

    def __call__(self, shards, shard_grads, rank, stats):
        limit = tf.constant(self.clipnorm, tf.float32)
        divisors = tf.maximum(_norms(stats["sq_norms"]), limit)
        return _map_pieces(shards, shard_grads, rank, lambda i, piece: (
            piece * tf.cast(limit, piece.dtype) / tf.cast(divisors[i], piece.dtype)))


class ClipGlobalNorm(ClipRule):
    """`global_clipnorm`: the whole gradient scaled to at most that norm."""

    needs = "global_norm"

    def __init__(self, global_clipnorm):
        self.global_clipnorm = global_clipnorm

    def __call__(self, shards, shard_grads, rank, stats):
        scale = _global_scale(stats["global_norm"], self.global_clipnorm)
        return [g * tf.cast(scale, g.dtype) for g in shard_grads]


class ClipValue(ClipRule):
    """`clipvalue`: every element clipped to [-value, value]."""

    def __init__(self, clipvalue):
        self.clipvalue = clipvalue

    def __call__(self, shards, shard_grads, rank, stats):
        return [tf.clip_by_value(g, -self.clipvalue, self.clipvalue) for g in shard_grads]


class ClipEach(ClipRule):
    """Each variable clipped by its own optimizer's rule, as each of a
    MultiOptimizer's optimizers clips the gradients it is given: clipnorm per
    variable, global_clipnorm over the variables of that optimizer, else
    clipvalue."""

    def __init__(self, optimizers):
        self.optimizers = optimizers
        by_norm = any(_positive(o.clipnorm) or _positive(o.global_clipnorm) for o in optimizers)
        self.needs = "sq_norms" if by_norm else None

    def __call__(self, shards, shard_grads, rank, stats):
        optimizers = self.optimizers
        sq = stats.get("sq_norms")
        scales = {}
        for opt in distinct(optimizers):
            if _positive(opt.global_clipnorm):
                mine = [i for i, o in enumerate(optimizers) if o is opt]
                norm = tf.sqrt(tf.reduce_sum(tf.gather(sq, mine)))
                scales[id(opt)] = _global_scale(norm, opt.global_clipnorm)
        norms = _norms(sq) if sq is not None else None

        def rule(i, piece):
            opt = optimizers[i]
            if _positive(opt.clipnorm):
                clipnorm = tf.constant(opt.clipnorm, tf.float32)
                divisor = tf.maximum(norms[i], clipnorm)
                return piece * tf.cast(clipnorm, piece.dtype) / tf.cast(divisor, piece.dtype)
            if id(opt) in scales:
                return piece * tf.cast(scales[id(opt)], piece.dtype)
            if _positive(opt.clipvalue):
                return tf.clip_by_value(piece, -opt.clipvalue, opt.clipvalue)
            return piece

        return _map_pieces(shards, shard_grads, rank, rule)


def _global_scale(norm, limit):
    """Keras' `clip_by_global_norm` scale: NaN for a non-finite norm."""
    limit = tf.constant(limit, tf.float32)
    return limit * tf.minimum(1.0 / norm, 1.0 / limit) + (norm - norm)


def _norms(sq):
    # Keras' clip_by_norm's norm: no sqrt of 0 (its gradient would be NaN).
    return tf.where(sq > 0, tf.sqrt(tf.where(sq > 0, sq, tf.ones_like(sq))), sq)


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
        out.append(collectives.join(parts))
    return out


def unscale(shard_grads, divisor=None, loss_scaler=None) -> list:
    """Divides by the accumulation window and by the dynamic loss scale."""
    if divisor is not None:
        shard_grads = [g / tf.cast(divisor, g.dtype) for g in shard_grads]
    if loss_scaler is not None:
        scale = loss_scaler.dynamic_scale
        shard_grads = [g / tf.cast(scale, g.dtype) for g in shard_grads]
    return shard_grads


def gradient_statistics(shards, shard_grads, rank: int, check_finite: bool,
                        needs: str | None) -> dict:
    """Replica-wide gradient statistics from one small all-reduce.

    Args:
        shards: the sharded state.
        shard_grads: this replica's reduced gradient shards.
        rank: this replica's rank.
        check_finite: whether to count non-finite elements (loss scaling).
        needs: what the clipping rule reads (`ClipRule.needs`).

    Returns:
        A dict with, as needed, "finite" (no inf/nan in any replica's shard),
        "sq_norms" (per-variable squared norms) or "global_norm"; empty when
        nothing is needed (and then nothing is communicated).
    """
    if not (check_finite or needs):
        return {}
    entries = []
    if check_finite:
        bad = [tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in shard_grads]
        entries.append(tf.add_n(bad) if bad else tf.zeros([]))
    n_vars = len(shards.variables)
    if needs == "sq_norms":
        sq = [tf.zeros([], tf.float32) for _ in range(n_vars)]
        for bucket, g in zip(shards.plan.buckets, shard_grads):
            for p in bucket.shard_pieces(rank):
                piece = tf.cast(g[p.offset:p.offset + p.size], tf.float32)
                sq[p.variable] = sq[p.variable] + tf.reduce_sum(tf.square(piece))
        entries.extend(sq)
    elif needs == "global_norm":
        sq = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in shard_grads]
        entries.append(tf.add_n(sq) if sq else tf.zeros([]))
    # Under hybrid sharding every shard group holds the same reduced shards:
    # the group's sum is the global one (the same on every replica).
    totals = collectives.all_reduce_sum(tf.stack(entries), group=shards.shard_group)
    stats, i = {}, 0
    if check_finite:
        stats["finite"] = tf.equal(totals[0], 0.0)
        i = 1
    if needs == "sq_norms":
        stats["sq_norms"] = totals[i:i + n_vars]
    elif needs == "global_norm":
        stats["global_norm"] = tf.sqrt(totals[i])
    return stats
