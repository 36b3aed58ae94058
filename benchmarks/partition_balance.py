"""Balance of the whole-variable partition on published model shapes.

For optimizers that update whole tensors (Lamb, Adafactor, Muon) every
variable is owned by one replica (`tf_zero.plan.plan_owners`). This prints,
for the variable shapes of GPT-2 124M, BERT-base and Llama-3.2-1B (from their
published configurations; nothing is built or downloaded) at N = 2, 4, 8, 16:

* imbalance: the busiest replica's share of the optimizer state over the
  ideal 1/N (1.00 is perfect; the state is partitioned, never duplicated);
* traffic: elements moved by the reduce-scatter (and the all-gather) over the
  model's elements, i.e. the padding that imbalance inside a bucket costs;
* largest: the largest variable's share of the model, the floor under any
  whole-variable partition's imbalance (N x largest);
* adafactor / muon state: the busiest replica's optimizer-state bytes over the
  ideal, with the plan ZeroOptimizer makes for that optimizer: owners chosen
  for both loads (`plan_owners(costs=...)`, the state measured by
  `tf_zero.state.owners.state_bytes` of the slots an optimizer builds on
  stand-ins in a graph of their own), and the variables Muon updates with its
  element-wise AdamW (embeddings, vectors) spread in runs (`split=...`).

    python benchmarks/partition_balance.py [--bucket-mib 8]
"""

import argparse


def gpt2_124m():
    d, v, ctx, layers, ff = 768, 50257, 1024, 12, 3072
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 12, 64), (12, 64), (d, 12, 64), (12, 64), (d, 12, 64),
                   (12, 64), (12, 64, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def bert_base():
    d, v, layers, ff = 768, 30522, 12, 3072
    shapes = [(v, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(layers):
        shapes += [(d, 12, 64), (12, 64), (d, 12, 64), (12, 64), (d, 12, 64), (12, 64),
                   (12, 64, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def llama_3_2_1b():
    d, v, layers, ff, kv = 2048, 128256, 16, 8192, 512
    shapes = [(v, d)]  # tied with the output projection
    for _ in range(layers):
        shapes += [(d,), (d, d), (d, kv), (d, kv), (d, d), (d,), (d, ff), (d, ff), (ff, d)]
    return shapes + [(d,)]


MODELS = {"gpt2-124m": gpt2_124m, "bert-base": bert_base, "llama-3.2-1b": llama_3_2_1b}


def stand_ins(shapes):
    """Objects with a shape, dtype, name and path (the embeddings named as such:
    Muon leaves them to its AdamW)."""
    from types import SimpleNamespace

    out = []
    for i, shape in enumerate(shapes):
        name = "embeddings" if i < EMBEDDINGS else f"w{i}"
        out.append(SimpleNamespace(shape=shape, dtype="float32", name=name, trainable=True,
                                   path=f"model/layer_{i}/{name}"))
    return out


EMBEDDINGS = 1  # the token embedding comes first in every shape list above


def main():
    import keras
    import numpy as np

    from tf_zero.state.owners import plain_slot_specs, state_bytes
    from tf_zero.plan import plan_owners
    from tf_zero.state.partition import split_variables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mib", type=float, default=8.0)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16])
    args = parser.parse_args()
    bucket = int(args.bucket_mib * 2**20)
    optimizers = {"adafactor": keras.optimizers.Adafactor(), "muon": keras.optimizers.Muon()}
    print(f"{'model':<14}{'params':>14}{'largest':>9}{'N':>4}{'imbalance':>11}{'traffic':>9}"
          f"{'buckets':>9}" + "".join(f"{name + ' state':>16}" for name in optimizers))
    for name, shapes_of in MODELS.items():
        shapes = shapes_of()
        sizes = [int(np.prod(s)) for s in shapes]
        total = sum(sizes)
        variables = stand_ins(shapes)
        costs = {k: state_bytes(plain_slot_specs([opt] * len(shapes), variables))
                 for k, opt in optimizers.items()}
        splits = {k: split_variables(opt, [opt] * len(shapes), variables)
                  for k, opt in optimizers.items()}
        for n in args.replicas:
            plan = plan_owners(shapes, ["float32"] * len(shapes), n, bucket)
            moved = sum(b.padded_size for b in plan.buckets)
            states = [plan_owners(shapes, ["float32"] * len(shapes), n, bucket, costs=costs[k],
                                  split=splits[k]).state_imbalance for k in optimizers]
            print(f"{name:<14}{total:>14,}{max(sizes) / total:>9.3f}{n:>4}"
                  f"{plan.imbalance:>11.3f}{moved / total:>9.3f}{len(plan.buckets):>9}"
                  + "".join(f"{x:>16.3f}" for x in states), flush=True)


if __name__ == "__main__":
    main()
