"""Model-state memory per device, by formula: `python -m tf_zero.estimate`.

Three accountings:

* "keras" — what tf_zero holds with float32 weights (Keras keeps them in
  float32 even under a mixed policy, and so does tf_zero with
  `param_dtype="float32"`): float32 weights, float32 gradients, the
  optimizer's float32 slots, and at stages 1-2 the replica's float32 weight
  shard that the inner optimizer updates. Stage 2 counts the persistent
  gradient as its shard (the full local gradient is transient, as at stage 1).
  Stage 3 shards the weights too (the gathered weights of the layers in
  flight are transient and not counted).
* "mixed" — what tf_zero holds under a mixed policy with its 16-bit working
  weights (the default): stages 1-2 keep a 16-bit working copy (2 bytes) and
  the float32 master only as the replica's shard (4/N) beside the slots; the
  gradient is 16-bit at stage 1 and the float32 reduced shard at stage 2;
  stage 3 is "keras" stage 3 (its shards are float32, gathered in 16 bits).
  Stage 0 is Keras' mixed policy under MirroredStrategy: float32 weights and
  gradients.
* "paper" — the ZeRO paper's accounting (Rajbhandari et al. 2019, Fig. 1):
  2 bytes of fp16 weights, 2 of fp16 gradients, K bytes of fp32 optimizer
  state (K=12 for mixed-precision Adam).

`memory_report` measures what is actually allocated; this module predicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

SLOT_BYTES = {"adam": 8, "adamw": 8, "adamax": 8, "nadam": 8, "lion": 4, "sgd": 0,
              "sgd_momentum": 4, "rmsprop": 4, "adagrad": 4, "adadelta": 8, "ftrl": 8}
STAGES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model state on one device."""

    stage: int
    weights: float
    gradients: float
    optimizer_states: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states


def estimate_memory(num_params, num_replicas, stage, optimizer="adam",
                    accounting="keras", k=12, shard_group_size=None) -> MemoryEstimate:
    """Per-device bytes of weights, gradients and optimizer state.

    Args:
        num_params: parameter count (Ψ).
        num_replicas: data-parallel replicas (N).
        stage: 0 (MirroredStrategy), 1, 2 or 3.
        optimizer: a name in `SLOT_BYTES` ("keras" accounting).
        accounting: "keras" (tf_zero's layout, float32 weights), "mixed"
            (tf_zero's layout with 16-bit working weights) or "paper"
            (ZeRO Fig. 1).
        k: optimizer-state bytes per parameter in the "paper" accounting.
        shard_group_size: hybrid sharding: state sharded over groups of this
            many replicas (it must divide N); None: over all N.

    Raises:
        ValueError: unknown stage, optimizer or accounting, N < 1, or a
            group size that does not divide N.

    Example:
        >>> round(estimate_memory(7.5e9, 64, 1, accounting="paper").total / 1e9, 1)
        31.4
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if num_replicas < 1 or num_params < 0:
        raise ValueError("num_replicas must be >= 1 and num_params >= 0")
    n, p = num_replicas, float(num_params)
    if shard_group_size is not None:
        if shard_group_size < 1 or n % shard_group_size:
            raise ValueError(f"shard_group_size must divide num_replicas={n}, got "
                             f"{shard_group_size!r}")
        n = shard_group_size  # every divisor below is the group's size
    if accounting == "paper":
        w, g, s = 2 * p, 2 * p, k * p
        if stage >= 1:
            s /= n
        if stage >= 2:
            g /= n
        if stage >= 3:
            w /= n
        return MemoryEstimate(stage, w, g, s)
    if accounting not in ("keras", "mixed"):
        raise ValueError(f"accounting must be 'keras', 'mixed' or 'paper', got {accounting!r}")
    if optimizer not in SLOT_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(SLOT_BYTES)}")
    w, g, s = 4 * p, 4 * p, SLOT_BYTES[optimizer] * p
    if accounting == "mixed" and stage in (1, 2):
        # A 16-bit working copy; the float32 master only in the shard.
        w, s = 2 * p, (s + 4 * p) / n
        return MemoryEstimate(stage, w, 2 * p if stage == 1 else g / n, s)
    if stage in (1, 2):
        s = (s + 4 * p) / n  # slots plus the float32 weight shard they update
    if stage >= 2:
        g /= n
    if stage == 3:
        w, s = w / n, s / n
    return MemoryEstimate(stage, w, g, s)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tf_zero.estimate",
                                     description="Per-device model-state memory by ZeRO stage.")
    parser.add_argument("--params", type=float, required=True)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--optimizer", default="adam", choices=sorted(SLOT_BYTES))
    parser.add_argument("--accounting", default="keras", choices=["keras", "mixed", "paper"])
    parser.add_argument("--k", type=float, default=12)
    parser.add_argument("--shard-group-size", type=int, default=None)
    args = parser.parse_args(argv)
    group = ("" if args.shard_group_size is None else
             f", sharded over groups of {args.shard_group_size}")
    print(f"{args.params:,.0f} parameters, {args.replicas} replicas{group}, {args.optimizer}, "
          f"{args.accounting} accounting (GB per device)")
    print(f"{'stage':>5} {'weights':>10} {'grads':>10} {'optim':>10} {'total':>10}")
    for stage in STAGES:
        e = estimate_memory(args.params, args.replicas, stage, args.optimizer,
                            args.accounting, args.k, args.shard_group_size)
        print(f"{stage:>5} {e.weights / 1e9:>10.2f} {e.gradients / 1e9:>10.2f} "
              f"{e.optimizer_states / 1e9:>10.2f} {e.total / 1e9:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
