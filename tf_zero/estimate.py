"""Model-state memory per device, by formula: `python -m tf_zero.estimate`.

Two accountings:

* "keras" — what tf_zero holds with Keras 3: float32 weights (Keras keeps
  them in float32 even under mixed precision), float32 gradients, the
  optimizer's float32 slots, and at stages 1-2 the replica's float32 weight
  shard that the inner optimizer updates. Stage 2 counts the persistent
  gradient as its shard (the full local gradient is transient, as at stage 1).
  Stage 3 shards the weights too (the gathered weights of the layers in
  flight are transient and not counted).
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
                    accounting="keras", k=12) -> MemoryEstimate:
    """Per-device bytes of weights, gradients and optimizer state.

    Args:
        num_params: parameter count (Ψ).
        num_replicas: data-parallel replicas (N).
        stage: 0 (MirroredStrategy), 1, 2 or 3.
        optimizer: a name in `SLOT_BYTES` ("keras" accounting).
        accounting: "keras" (tf_zero's layout) or "paper" (ZeRO Fig. 1).
        k: optimizer-state bytes per parameter in the "paper" accounting.

    Raises:
        ValueError: unknown stage, optimizer or accounting, or N < 1.

    Example:
        >>> round(estimate_memory(7.5e9, 64, 1, accounting="paper").total / 1e9, 1)
        31.4
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if num_replicas < 1 or num_params < 0:
        raise ValueError("num_replicas must be >= 1 and num_params >= 0")
    n, p = num_replicas, float(num_params)
    if accounting == "paper":
        w, g, s = 2 * p, 2 * p, k * p
        if stage >= 1:
            s /= n
        if stage >= 2:
            g /= n
        if stage >= 3:
            w /= n
        return MemoryEstimate(stage, w, g, s)
    if accounting != "keras":
        raise ValueError(f"accounting must be 'keras' or 'paper', got {accounting!r}")
    if optimizer not in SLOT_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(SLOT_BYTES)}")
    w, g, s = 4 * p, 4 * p, SLOT_BYTES[optimizer] * p
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
    parser.add_argument("--accounting", default="keras", choices=["keras", "paper"])
    parser.add_argument("--k", type=float, default=12)
    args = parser.parse_args(argv)
    print(f"{args.params:,.0f} parameters, {args.replicas} replicas, {args.optimizer}, "
          f"{args.accounting} accounting (GB per device)")
    print(f"{'stage':>5} {'weights':>10} {'grads':>10} {'optim':>10} {'total':>10}")
    for stage in STAGES:
        e = estimate_memory(args.params, args.replicas, stage, args.optimizer,
                            args.accounting, args.k)
        print(f"{stage:>5} {e.weights / 1e9:>10.2f} {e.gradients / 1e9:>10.2f} "
              f"{e.optimizer_states / 1e9:>10.2f} {e.total / 1e9:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
