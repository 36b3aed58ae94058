"""Bytes each replica sends per step: MirroredStrategy vs ZeRO stages 1-3, beside the ZeRO paper.

For each model and mode, the model is built and compiled under its strategy
and Keras' `fit` step is traced (not run); `tf_zero.traffic.collective_traffic`
then charges every collective op of the step the bytes a replica sends (ring /
direct accounting) and splits them between the replica's own worker and the
other workers. Beside each figure, the ZeRO paper's (Rajbhandari et al. 2019,
section 7), with Psi the trainable parameters' bytes in the gradient dtype and
N replicas:

- data parallelism (MirroredStrategy): one all-reduce of the gradients,
  2 Psi (N-1)/N;
- stages 1 and 2: a reduce-scatter of the gradients and an all-gather of the
  updated weights, 2 Psi (N-1)/N;
- stage 3: the weights all-gathered in the forward pass and again in the
  backward pass, the gradients reduce-scattered: 3 Psi (N-1)/N.

Under a mixed policy (`--policies mixed_bfloat16`, on by default beside
float32) Keras' gradients stay float32, so the gradient all-reduce and the
reduce-scatter keep their bytes; tf_zero's stages 1-2 keep 16-bit working
copies of the weights at least `persistence_threshold` large and publish them
in 2 bytes per parameter, and stage 3 gathers its sharded weights in 2 bytes
(bfloat16 moves as float16 bits on CPU).

Every measured figure is then taken apart into the formula and each term that
moves it (the bucket and shard padding, the replicated stage-3 weights below
`persistence_threshold`, weights gathered more often than twice, the
statistics all-reduce, the copies and reductions Keras and TensorFlow add),
with the residual printed, so nothing unexplained hides in a total.

Models: `mlp_tiny` (the tests' MLP 8-7-3: 87 parameters, padding visible),
`mlp` (`_common.make_model`: 64-512-512-512-10, the two 512x512 kernels above
the default persistence threshold), `gpt2` (the keras_hub GPT-2 workload of
`step_time.py`: 12 layers, hidden 256, vocabulary 512; `--gpt2-layers`).

    python benchmarks/comm_volume.py                               # every model, 4 replicas
    python benchmarks/comm_volume.py --models mlp --workers 2      # 4 replicas as 2 workers x 2
    python benchmarks/comm_volume.py --models mlp --policies mixed_bfloat16
    python benchmarks/comm_volume.py --models mlp --workers 2 --shard-group-size 2 \\
        --modes mirrored stage2 --policies float32               # hybrid sharding
    python benchmarks/comm_volume.py --models mlp gpt2 --workers 2 --quantized \\
        --policies float32 mixed_bfloat16                          # quantized stage 3
    python -m tf_zero.launch --workers 2 --devices-per-worker 2 benchmarks/comm_volume.py \\
        --models mlp_tiny mlp                                      # a real 2 x 2 job

Under the launcher the workers' `TF_CONFIG` makes every mode a multi-worker
strategy: `ZeroStrategy` at each stage, and for `mirrored` a `ZeroStrategy`
with the plain Keras optimizer, whose gradient all-reduce is
MultiWorkerMirroredStrategy's (Keras' own `fit` fails under a multi-worker
MultiWorkerMirroredStrategy, keras-team/keras#20585), and stage 3 a second
`ZeroStrategy`. A job that made that second strategy once hung in its first
variable broadcast, both workers waiting; `--modes stage3` in a job of its
own avoids it. Worker 0 prints.
"""

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODELS = ("mlp_tiny", "mlp", "gpt2")
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
FORMULA_PASSES = {"mirrored": 2, "stage1": 2, "stage2": 2, "stage3": 3}
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # tf_zero.ZeroConfig's default


def describe(ops, replicas):
    """What the small transfers outside the gradient path are (those seen)."""
    kind, dtype = ops[0].kind, ops[0].dtype
    if kind == "copy" and dtype == "int64" and all(op.shape == () for op in ops):
        return ("Keras' optimizer step counter: a MirroredVariable incremented on the "
                "first device and copied to the other replicas")
    if kind == "all_reduce" and dtype == "int64" and not ops[0].function:
        return ("tf.distribute's iterator agreeing across workers on whether data is left "
                "(one replica per worker)")
    if kind == "all_reduce" and dtype.startswith("float") and ops[0].scope == "(top level)":
        return "Keras' loss and metric results averaged over replicas (reduce_per_replica)"
    return ""


_multi_worker_strategies = {}


def multi_worker_strategy(stage, args):
    """One ZeroStrategy per stage-3-or-not for the job: each new multi-worker
    strategy re-configures the process's collectives, so few are made."""
    import tf_zero

    if stage not in _multi_worker_strategies:
        _multi_worker_strategies[stage] = tf_zero.ZeroStrategy(
            stage=stage, persistence_threshold=args.persistence_threshold,
            shard_group_size=args.shard_group_size if stage != 3 else None)
    return _multi_worker_strategies[stage]


def build(name, mode, devices, args, quantization=None):
    """(model, x, y, global batch) of model `name` compiled under `mode`
    (`quantization`: ZeroStrategy's quantized_* settings)."""
    import keras
    import numpy as np

    import tf_zero
    from tf_zero import _private

    if devices is None:  # a multi-worker job: TF_CONFIG names the cluster
        strategy = multi_worker_strategy(3 if mode == "stage3" else 2, args)
    elif mode == "mirrored":
        strategy = _private.new_mirrored_strategy(devices)
    else:
        strategy = tf_zero.ZeroStrategy(devices, stage=int(mode[-1]),
                                        persistence_threshold=args.persistence_threshold,
                                        shard_group_size=args.shard_group_size,
                                        **(quantization or {}))
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        keras.utils.set_random_seed(1)
        if name == "gpt2":
            import keras_hub

            import zoo

            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=zoo.LM_VOCAB, num_layers=args.gpt2_layers, num_heads=4,
                hidden_dim=256, intermediate_dim=1024, dropout=0.0, max_sequence_length=64)
            model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
            batch = 8 * replicas
            x, y = zoo.lm_data(batch)
            optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.01)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        else:
            if name == "mlp_tiny":
                model = keras.Sequential([keras.Input((8,)),
                                          keras.layers.Dense(7, activation="tanh"),
                                          keras.layers.Dense(3)])
                rng = np.random.default_rng(0)
                batch = 4 * replicas
                x = rng.normal(size=(batch, 8)).astype("float32")
                y = rng.normal(size=(batch, 3)).astype("float32")
            else:
                model = _common.make_model(args.hidden)
                batch = 16 * replicas
                x, y = _common.make_data(batch)
            optimizer, loss = keras.optimizers.Adam(1e-3), "mse"
        if mode != "mirrored":
            optimizer = tf_zero.ZeroOptimizer(optimizer, stage=int(mode[-1]))
        model.compile(optimizer=optimizer, loss=loss)
    return model, x, y, batch


def explain(model, mode, report, replicas):
    """[(term, bytes per replica)] that add up to the measured total, and the
    formula's figure. The last term is the residual (0 when all is explained)."""
    import keras
    import numpy as np

    import tf_zero

    n = replicas
    share = (n - 1) / n
    variables = model.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]
    psi = sum(s * np.dtype(v.dtype).itemsize for s, v in zip(sizes, variables))
    formula = FORMULA_PASSES[mode] * psi * share
    terms = [(f"formula {FORMULA_PASSES[mode]} Psi (N-1)/N", formula)]
    covered = set()  # (scope, kind) groups the terms above account for
    optimizer = model.optimizer
    # A mixed_float16 model's optimizer is Keras' LossScaleOptimizer around ours.
    inner = (optimizer.inner_optimizer
             if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else optimizer)
    if mode == "mirrored":
        # The optimizer's scope; under loss scaling inside the cond on the
        # gradients being finite.
        scope = tf_zero.traffic.name_scope(f"{inner.name}/op")
        scopes = {op.scope for op in report.ops
                  if op.scope == scope or op.scope.endswith("/" + scope)}
        grads = sum(report.select(kind="all_reduce", scope=s).bytes_per_replica for s in scopes)
        terms.append(("gradient all-reduce beyond the formula", grads - formula))
        covered |= {(s, "all_reduce") for s in scopes}
    else:
        plan = inner.plan
        sharded = {i for i, v in enumerate(variables) if tf_zero.is_sharded(v)}
        assert [tuple(v.shape) for v in variables] == [tuple(s) for s in plan.shapes]
        rest = [b for b in plan.buckets if b.segments[0].variable not in sharded]
        padding = sum(b.padding * np.dtype(b.dtype).itemsize for b in rest)
        terms.append((f"bucket padding ({padding:,} B) in both passes", 2 * padding * share))
        # Hybrid sharding: the reduce-scatter and the publish span K replicas
        # (Psi (K-1)/K each), the shards' all-reduce the N/K groups
        # (2 (Psi/K) (N/K-1)/(N/K)): 2 Psi (N-1)/N in all, as full sharding.
        covered |= {("zero_reduce", "all_to_all"), ("zero_reduce", "reduce_scatter"),
                    ("zero_reduce", "all_reduce"), ("zero_publish", "all_gather")}
        working = [b for b in rest if tf_zero.has_working_copy(variables[b.segments[0].variable])]
        if working:
            narrowed = sum(
                b.padded_size * (np.dtype(b.dtype).itemsize - _working_itemsize(
                    variables[b.segments[0].variable])) for b in working)
            terms.append((f"{len(working)} working copies published in 16 bits "
                          f"({narrowed:,} B fewer)", -narrowed * share))
        if mode == "stage3":
            psi_s = sum(sizes[i] * np.dtype(variables[i].dtype).itemsize for i in sharded)
            padded_s = sum(b.padded_size * np.dtype(b.dtype).itemsize for b in plan.buckets
                           if b.segments[0].variable in sharded)
            terms.append((f"replicated weights below persistence_threshold "
                          f"({psi - psi_s:,} B): 2 passes, not 3", -(psi - psi_s) * share))
            terms.append((f"shard padding ({padded_s - psi_s:,} B) in 3 passes",
                          3 * (padded_s - psi_s) * share))
            measured = report.select(scope="zero_gather")
            gathers = at_master_width(measured, variables).bytes_per_replica
            narrow = measured.bytes_per_replica - gathers
            if narrow:
                terms.append(("stage-3 gathers cast to the 16-bit compute dtype "
                              f"({_narrow_share(measured):.0%} of the gathered elements)",
                              narrow))
            scatters = report.select(scope="zero_gather_grad").bytes_per_replica
            terms.append(("stage-3 gathers beyond 2 per sharded weight",
                          gathers - 2 * padded_s * share))
            terms.append(("stage-3 gradient reduce-scatters beyond 1 per sharded weight",
                          scatters - padded_s * share))
            covered |= {("zero_gather", "all_gather"), ("zero_gather_grad", "all_to_all"),
                        ("zero_gather_grad", "reduce_scatter")}
    others = {}
    for op in report.ops:
        if (op.scope, op.kind) not in covered:
            others.setdefault((op.scope, op.kind, op.dtype, bool(op.function)), []).append(op)
    for (scope, kind, dtype, _), ops in others.items():
        sub = dataclasses.replace(report, ops=tuple(ops))
        shapes = sorted({str(list(o.shape or [])) for o in ops})
        label = f"{kind} in {scope}: {dtype}{', '.join(shapes[:3])}"
        label += " ..." if len(shapes) > 3 else ""
        what = describe(ops, replicas)
        terms.append((label + (f" = {what}" if what else ""), sub.bytes_per_replica))
    terms.append(("residual", report.bytes_per_replica - sum(t for _, t in terms)))
    return terms, formula, psi


def _working_itemsize(variable):
    """Bytes per element of a working copy (its 16-bit compute dtype)."""
    import tensorflow as tf

    from tf_zero import _private

    return tf.as_dtype(_private.sharded_storage(variable).working_dtype).size


def at_master_width(report, variables):
    """`report` with every op charged at the master weights' element size
    (float32): what it would send had nothing been cast to 16 bits first."""
    import numpy as np

    width = max(np.dtype(v.dtype).itemsize for v in variables)

    def widen(op):
        import tensorflow as tf

        factor = width / tf.as_dtype(op.dtype).size
        return dataclasses.replace(op, bytes_sent=op.bytes_sent * factor,
                                   inside_bytes=op.inside_bytes * factor,
                                   across_bytes=op.across_bytes * factor)

    return dataclasses.replace(report, ops=tuple(widen(op) if op.counted else op
                                                 for op in report.ops))


def _narrow_share(report):
    """Share of the elements of `report`'s counted ops sent in fewer than 4 bytes."""
    import tensorflow as tf

    counted = [op for op in report.ops if op.counted]
    total = sum(op.elements for op in counted)
    narrow = sum(op.elements for op in counted if tf.as_dtype(op.dtype).size < 4)
    return narrow / total if total else 0.0


def stage3_reads(model, report, replicas):
    """Lines naming the sharded weights gathered or reduced other than 2 and 1 times."""
    import math

    import numpy as np

    import tf_zero

    lines = []
    for v in model.trainable_variables:
        if not tf_zero.is_sharded(v):
            continue
        shard = math.ceil(int(np.prod(v.shape)) / replicas)
        same = [w for w in model.trainable_variables if tf_zero.is_sharded(w)
                and math.ceil(int(np.prod(w.shape)) / replicas) == shard]
        gathers = [op for op in report.select(scope="zero_gather").ops if op.elements == shard]
        scatters = [op for op in report.select(scope="zero_gather_grad").ops
                    if op.elements == shard * replicas]
        per = len(same) * report.replicas
        g, s = len(gathers) / per, len(scatters) / per
        if (g, s) != (2, 1) and v is same[0]:
            # The op that read the weight (its gather runs in that op's scope).
            readers = collections.Counter(
                re.sub(r"_\d+$", "", op.name.split("/zero_gather")[0].split("/")[-1])
                for op in gathers if op.device == gathers[0].device)
            label = v.path if len(same) == 1 else f"{len(same)} weights like {v.path}"
            lines.append(f"      {label}: gathered {g:g}x per step (read by "
                         + ", ".join(f"{n} {c}x" for n, c in sorted(readers.items()))
                         + f"), its gradient reduce-scattered {s:g}x")
    return lines


QUANTIZED = {
    "float32 collectives": {},
    "int8 weights": {"quantized_weights": "int8"},
    "int8 gradients": {"quantized_gradients": "int8"},
    "int4 gradients": {"quantized_gradients": "int4"},
    "int8 both": {"quantized_weights": "int8", "quantized_gradients": "int8"},
    "int8 w + int4 g": {"quantized_weights": "int8", "quantized_gradients": "int4"},
}


def quantized_table(name, policy, devices, args):
    """Stage 3's bytes per replica per step with each quantized-collective
    setting (ZeRO++'s qwZ and qgZ), against float32 collectives."""
    import keras

    import tf_zero

    rows, reference = [], None
    for label, settings in QUANTIZED.items():
        settings = dict(settings, quantization_block_size=args.quantization_block_size)
        keras.mixed_precision.set_global_policy(policy)
        try:
            model, x, y, batch = build(name, "stage3", devices, args, settings)
            report = tf_zero.traffic.collective_traffic(model, x, y, batch_size=batch,
                                                        workers=args.workers)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        gather = report.select(scope="zero_gather").bytes_per_replica
        grad = report.select(scope="zero_gather_grad").bytes_per_replica
        total = report.bytes_per_replica
        reference = reference or total
        rows.append((label, gather, grad, total, report.across_bytes_per_replica,
                     total / reference))
    print(f"\n{name}, {policy}, stage 3, quantized collectives (blocks of "
          f"{args.quantization_block_size}): bytes one replica sends per step")
    print(f"  {'setting':<22}{'gathers':>14}{'grad r-s':>14}{'total':>14}"
          f"{'across workers':>16}{'x float32':>11}")
    for label, gather, grad, total, across, ratio in rows:
        print(f"  {label:<22}{gather:14,.0f}{grad:14,.0f}{total:14,.0f}{across:16,.0f}"
              f"{ratio:11.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(FORMULA_PASSES),
                        choices=list(FORMULA_PASSES))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None,
                        help="read the replicas of one process as this many workers")
    parser.add_argument("--hidden", type=int, default=512, help="mlp width")
    parser.add_argument("--gpt2-layers", type=int, default=12)
    parser.add_argument("--persistence-threshold", type=int,
                        default=DEFAULT_PERSISTENCE_THRESHOLD)
    parser.add_argument("--shard-group-size", type=int, default=None,
                        help="hybrid sharding over groups of this many replicas (stages 1-2)")
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"],
                        choices=POLICIES, help="Keras dtype policies, a table each")
    parser.add_argument("--quantized", action="store_true",
                        help="stage 3 with each quantized-collective setting instead")
    parser.add_argument("--quantization-block-size", type=int, default=2048)
    parser.add_argument("--verbose", action="store_true", help="print each step's report")
    args = parser.parse_args()
    multi_worker = bool(os.environ.get("TF_CONFIG"))
    devices = None if multi_worker else _common.configure_cpus(args.replicas)
    import keras
    import numpy as np

    import tf_zero

    chief = not multi_worker or json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0
    if multi_worker and chief and "mirrored" in args.modes:
        print("mirrored: the plain Keras optimizer under a multi-worker ZeroStrategy "
              "(MultiWorkerMirroredStrategy's gradient all-reduce)")
    if args.quantized:
        for name, policy in ((name, policy) for name in args.models for policy in args.policies):
            quantized_table(name, policy, devices, args)
        return
    for name, policy in ((name, policy) for name in args.models for policy in args.policies):
        for mode in args.modes:
            start = time.perf_counter()
            keras.mixed_precision.set_global_policy(policy)
            try:
                model, x, y, batch = build(name, mode, devices, args)
                strategy = model.distribute_strategy
                report = tf_zero.traffic.collective_traffic(model, x, y, batch_size=batch,
                                                            workers=args.workers)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            if not chief:
                continue
            n = strategy.num_replicas_in_sync
            terms, formula, psi = explain(model, mode, report, n)
            if mode == args.modes[0]:
                params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
                print(f"\n{name}, {policy}: {params:,} parameters, Psi = {psi:,} B (float32 "
                      f"gradients), N = {n} replicas as {report.workers} worker(s) x "
                      f"{report.devices_per_worker} device(s); bytes one replica sends per step")
                print(f"  {'mode':<10}{'measured':>14}{'formula':>14}{'ratio':>8}"
                      f"{'inside worker':>16}{'across workers':>16}{'x mirrored':>12}")
                reference = None
            total = report.bytes_per_replica
            if mode == "mirrored":
                reference = None if report.dynamic else total
            ratio = f"{total / reference:12.3f}" if reference and not report.dynamic else (
                f"{'':>12}")
            print(f"  {mode:<10}{total:14,.0f}{formula:14,.0f}{total / formula:8.3f}"
                  f"{report.inside_bytes_per_replica:16,.0f}"
                  f"{report.across_bytes_per_replica:16,.0f}{ratio}"
                  f"   (traced in {time.perf_counter() - start:.0f} s)", flush=True)
            for term, value in terms[1:]:
                if abs(value) >= 0.5 or term == "residual":
                    print(f"      {value:+14,.0f}  {term}")
            if mode == "stage3":
                for line in stage3_reads(model, report, n):
                    print(line)
            resized = [op for op in report.ops if op.sized_by != "trace"]
            if resized:
                print(f"      {len(resized)} ops ({', '.join(sorted({op.name for op in resized}))})"
                      " have no static size in fit's step; sized from the step traced on "
                      "endless data")
            if report.dynamic:
                print(f"      NOT COUNTED, no static size: {len(report.dynamic)} ops; the "
                      "measured figure leaves them out")
            if args.verbose:
                print("\n".join("      " + line for line in str(report).splitlines()))


if __name__ == "__main__":
    main()
