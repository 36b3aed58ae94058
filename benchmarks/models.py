"""Models users train, every stage and precision, against the unsharded optimizer.

For each model (keras_hub GPT-2, Llama, Gemma, BERT; keras.applications
MobileNetV2, ResNet50; small random-init configs, real offline data, see
`zoo.py`) and precision, trains the plain optimizer (AdamW for the language
models, SGD with momentum for the CNNs) under MirroredStrategy (the reference)
and under MirroredStrategy with `ReductionToOneDevice` (the same training
summed in another order: the float-noise floor), then stages 1-3, and prints
the largest weight difference to the reference beside the floor.

With `--optimizer lamb|adafactor|muon` the models train with that optimizer
instead (tf_zero's whole-variable partition, stages 1-2); the table then also
shows the plan's imbalance (busiest replica's state / ideal) and the busiest
replica's share of the unsharded optimizer state.

    python benchmarks/models.py                                   # the full table
    python benchmarks/models.py --models gpt2 --precisions float32 --stages 3
    python benchmarks/models.py --models gpt2 llama --precisions float32 --stages 2 \
        --optimizer muon
"""

import argparse
import time

from _common import configure_cpus


def main():
    import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=list(zoo.PRECISIONS),
                        choices=list(zoo.PRECISIONS))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", choices=["lamb", "adafactor", "muon"],
                        help="train with this whole-tensor optimizer instead")
    parser.add_argument("--graph-optimizer", action="store_true",
                        help="keep TensorFlow's grappler on (kernel choice then adds noise)")
    args = parser.parse_args()
    devices = configure_cpus(args.replicas)
    kw = dict(steps=args.steps, grappler=args.graph_optimizer, optimizer=args.optimizer)

    # max |dw|: to the reference; nearest: to whichever unsharded run is closer.
    print(f"{'model':<14}{'precision':<16}{'mode':<10}{'max |dw|':>11}{'nearest':>11}{'floor':>11}"
          f"{'last loss':>11}{'ref loss':>11}{'sharded':>9}{'time s':>8}", flush=True)
    for name in args.models:
        for precision in args.precisions:
            t = time.time()
            ref = zoo.train(name, "mirrored", devices, precision, **kw)
            ref_time = time.time() - t
            other = zoo.train(name, "mirrored_one_device", devices, precision, **kw)
            floor = zoo.max_diff(other.weights, ref.weights)
            print(f"{name:<14}{precision:<16}{'mirrored':<10}{'':>11}{'':>11}{floor:>11.2e}"
                  f"{ref.losses[-1]:>11.5f}{ref.losses[-1]:>11.5f}{'':>9}{ref_time:>8.1f}",
                  flush=True)
            for stage in args.stages:
                t = time.time()
                run = zoo.train(name, f"stage{stage}", devices, precision, **kw)
                diff = zoo.max_diff(run.weights, ref.weights)
                nearest = min(diff, zoo.max_diff(run.weights, other.weights))
                print(f"{name:<14}{precision:<16}{f'stage{stage}':<10}{diff:>11.2e}"
                      f"{nearest:>11.2e}{floor:>11.2e}"
                      f"{run.losses[-1]:>11.5f}{ref.losses[-1]:>11.5f}"
                      f"{run.sharded_fraction:>9.2f}{time.time() - t:>8.1f}"
                      + _state_share(run.optimizer), flush=True)


def _state_share(optimizer):
    """'  imbalance x.xx  state y.yyy' for a sharded optimizer's plan and memory."""
    import tf_zero

    report = tf_zero.memory_report(optimizer)
    share = report.max_replica.slots / max(report.unsharded.slots, 1)
    return f"  imbalance {optimizer.plan.imbalance:.2f}  busiest replica's slots {share:.3f}"


if __name__ == "__main__":
    main()
