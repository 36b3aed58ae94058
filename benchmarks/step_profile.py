"""Where a `fit` step's time goes: MirroredStrategy vs ZeRO stages 1-3, by op.

Each mode trains its workload for one warm-up epoch (tracing), then for
`--steps` steps under TensorFlow's profiler. The profile's per-op self times
(read from the profile's trace, summed over the threads that ran them) are
grouped by what the op does:

- matmul: the model's matrix products (forward and backward);
- other model compute: everything else the model's forward and backward pass
  runs (activations, norms, softmax, loss, embedding lookups and their
  gradients), outside the step's optimizer;
- optimizer math: the inner optimizer's update (`zero_update`; under
  MirroredStrategy, Keras' optimizer scope);
- collectives: reduce-scatter / all-to-all, all-gather, all-reduce. On logical
  CPU replicas a collective's time includes waiting for the slowest replica;
- the copies ZeRO adds, by link of the sharded step: `flatten` (gradients laid
  into buckets), `reduce` (the local sum after the all-to-all), `statistics`,
  `refresh` (re-read of the weight shard), `publish` (writes of the gathered
  weights), and stage 3's gathers and casts inside the layers;
- input pipeline (tf.data).

Figures are milliseconds of op time per step summed over the threads that ran
the ops (4 replicas on 2 cores run partly in parallel, so a column sums to
more than the wall time), beside the step's wall time under the profiler.

    python benchmarks/step_profile.py --model mlp27m [--modes mirrored stage2] [--top 15]
"""

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MATMUL = ("MatMul", "_FusedMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum",
          "Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "_FusedConv2D")
LINKS = ("flatten", "reduce", "statistics", "refresh", "update", "publish")
ROWS = ("matmul", "other model compute", "optimizer math", "collectives: reduce",
        "collectives: gather",
        *(f"zero {link}" for link in LINKS if link != "update"), "zero stage-3 gathers",
        "input pipeline")


def category(op_type, name, optimizer_scope):
    """The row of one profiled op."""
    if "Dataset" in op_type or "Iterator" in op_type:
        return "input pipeline"
    if op_type.startswith("Collective") or op_type.startswith("Nccl"):
        return "collectives: gather" if "Gather" in op_type else "collectives: reduce"
    for link in LINKS:
        if f"/zero_{link}/" in name:
            return "optimizer math" if link == "update" else f"zero {link}"
    if "/zero_gather" in name:
        return "zero stage-3 gathers"
    if f"/{optimizer_scope}/" in name or name.startswith(f"{optimizer_scope}/"):
        return "optimizer math"
    if op_type in MATMUL:
        return "matmul"
    return "other model compute"


def op_rows(logdir):
    """[(type, name, time in us)] of every op kernel the profile in `logdir`
    recorded, on whichever thread ran it (TensorFlow's executor threads, the
    collective threads). Op events do not nest, so their times are self times;
    function calls and tf.data iterators (names with a leading space) do nest
    and are left out, as are the events of TensorFlow's own bookkeeping."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    rows = []
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            metadata = plane.event_metadata
            for line in plane.lines:
                for event in line.events:
                    name = metadata[event.metadata_id].name
                    if ":" not in name or "::" in name or name.startswith(" "):
                        continue
                    name, op_type = name.rsplit(":", 1)
                    if op_type and not op_type.startswith(" "):
                        rows.append((op_type, name, event.duration_ps / 1e6))
    if not rows:
        raise RuntimeError(f"TensorFlow's profiler recorded no op in {logdir}")
    return rows


def profile(mode, args, devices):
    import tensorflow as tf

    model, x, y, batch = _common.make_workload(args.model, mode, devices, args.steps,
                                               args.hidden)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # tracing, warm-up
    logdir = tempfile.mkdtemp(prefix=f"tf_zero_profile_{mode}_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    wall = (time.perf_counter() - start) / args.steps
    tf.profiler.experimental.stop()
    inner = model.optimizer
    inner = getattr(inner, "inner_optimizer", inner)
    scope = inner.name if mode == "mirrored" else model.optimizer.name
    totals = collections.Counter()
    names = collections.Counter()
    for op_type, name, us in op_rows(logdir):
        row = category(op_type, name, scope)
        totals[row] += us / 1000 / args.steps
        names[(row, op_type, name)] += us / 1000 / args.steps
    return wall, totals, names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", *_common.WORKLOADS], default="mlp27m")
    parser.add_argument("--hidden", type=int, default=2048, help="mlp only")
    parser.add_argument("--modes", nargs="+", default=list(_common.MODES),
                        choices=list(_common.MODES))
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest ops")
    args = parser.parse_args()
    devices = _common.configure_cpus(args.replicas)
    results = {mode: profile(mode, args, devices) for mode in args.modes}
    allocator = ("BFC" if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")
                 else "default")
    what = (_common.WORKLOADS[args.model][0] if args.model != "mlp"
            else f"MLP of width {args.hidden}, Adam")
    print(f"{what}; {args.replicas} replicas; {args.steps} "
          f"profiled steps; CPU allocator: {allocator}")
    print("op time, ms per step, summed over threads")
    print(f"{'':>24}" + "".join(f"{m:>11}" for m in args.modes))
    for row in ROWS:
        print(f"{row:>24}" + "".join(f"{results[m][1][row]:11.1f}" for m in args.modes))
    print(f"{'total':>24}" + "".join(f"{sum(results[m][1][r] for r in ROWS):11.1f}"
                                          for m in args.modes))
    print(f"{'wall ms per step':>24}" + "".join(f"{results[m][0] * 1000:11.1f}"
                                                 for m in args.modes))
    for mode in args.modes if args.top else ():
        print(f"\n{mode}: the {args.top} costliest ops (ms per step)")
        for (row, op_type, name), ms in results[mode][2].most_common(args.top):
            print(f"  {ms:8.2f}  {row:<22} {op_type:<22} {name[-90:]}")


if __name__ == "__main__":
    main()
