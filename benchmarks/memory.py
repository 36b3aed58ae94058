"""Per-replica memory of MirroredStrategy vs ZeRO stages 1, 2 and 3, measured.

For each N and mode, a fresh process builds the model (Adam), trains a few
steps, and reports: per-replica bytes of weights, weight shards, optimizer
slots and gradient buffers (from the variables' device components, via
tf_zero.memory_report) and the process's peak RSS. On CPU all logical
replicas share one process, so peak RSS shows the real saving, transient
buffers included.

    python benchmarks/memory.py [--params 50e6] [--replicas 1 2 4 8] [--steps 3]

Under a mixed policy (`--policy mixed_bfloat16`), stages 1-2 keep 16-bit
working copies over float32 master shards; `--param-dtype float32` measures
them with float32 working weights instead, and every row also gives the
bytes per parameter summed over the replicas (memory_report) and held by
TensorFlow's allocator after training:

    python benchmarks/memory.py --policy mixed_bfloat16 --params 11e6 --replicas 4

With --whole it measures the whole-variable partition instead: the busiest
replica's optimizer state (memory_report) over the ideal 1/N, for Adafactor and
Muon on a keras_hub Llama, at each N:

    python benchmarks/memory.py --whole [--replicas 2 4 8] [--layers 8 --hidden-dim 256]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def child(mode, n, params, steps, hidden=None, policy=None, param_dtype=None):
    devices = _common.configure_cpus(n)
    import keras
    import tensorflow as tf

    import tf_zero

    if policy:
        keras.mixed_precision.set_global_policy(policy)
    hidden = hidden or _common.hidden_for(params)
    strategy, model = _common.make_strategy_and_model(mode, devices, hidden,
                                                      param_dtype=param_dtype)
    x, y = _common.make_data(16 * n * steps)
    model.fit(x, y, batch_size=16 * n, epochs=1, verbose=0)
    report = tf_zero.memory_report(model.optimizer)
    r = report.max_replica
    state = sum(replica.total for replica in report.replicas)
    allocator = tf.config.experimental.get_memory_info("CPU:0")["current"]
    print(json.dumps({"mode": mode, "n": n, "params": model.count_params(),
                      "weights": r.weights, "weight_shards": r.weight_shards,
                      "slots": r.slots, "grad_buffers": r.gradient_buffers,
                      "state_per_param": state / model.count_params(),
                      "allocator_per_param": allocator / model.count_params(),
                      "peak_rss_mib": _common.peak_rss_mib()}))


def whole_child(n, optimizer, layers, hidden, vocab):
    """One process: a keras_hub Llama under ZeroOptimizer(Adafactor or Muon), N replicas."""
    devices = _common.configure_cpus(n)
    import keras
    import keras_hub

    import tf_zero

    strategy = tf_zero.ZeroStrategy(devices, stage=2)
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras_hub.models.LlamaBackbone(
            vocabulary_size=vocab, num_layers=layers, num_query_heads=8, num_key_value_heads=4,
            hidden_dim=hidden, intermediate_dim=hidden * 11 // 4)
        make = {"adafactor": keras.optimizers.Adafactor, "muon": keras.optimizers.Muon}[optimizer]
        opt = tf_zero.ZeroOptimizer(make(1e-3))
        opt.build(model.trainable_variables)
    report = tf_zero.memory_report(opt)
    print(json.dumps({"n": n, "optimizer": optimizer, "params": model.count_params(),
                      "slots": report.max_replica.slots, "unsharded": report.unsharded.slots,
                      "plan": opt.plan.state_imbalance, "weights": opt.plan.imbalance}))


def whole(args):
    """Busiest replica's optimizer state vs the ideal, measured by memory_report."""
    mib = 2 ** 20
    print(f"keras_hub Llama: {args.layers} layers, hidden {args.hidden_dim}, vocabulary "
          f"{args.vocab}; ZeroOptimizer(partition='whole'), stage 2, built (memory_report)")
    print(f"{'optimizer':>10} {'N':>3} {'params':>11} {'unsharded':>10} {'busiest':>9} "
          f"{'x ideal':>8} {'plan':>6} {'weights':>8}   (MiB of slots)")
    for optimizer in args.optimizers:
        for n in args.replicas:
            r = json.loads(_common.run_child([
                __file__, "--whole-child", optimizer, str(n), "--layers", str(args.layers),
                "--hidden-dim", str(args.hidden_dim), "--vocab", str(args.vocab)]))
            ideal = r["unsharded"] / n
            print(f"{optimizer:>10} {n:>3} {r['params']:>11,} {r['unsharded'] / mib:>10.1f} "
                  f"{r['slots'] / mib:>9.1f} {r['slots'] / ideal:>8.3f} {r['plan']:>6.3f} "
                  f"{r['weights']:>8.3f}", flush=True)


def _state(r):
    return r["weights"] + r["weight_shards"] + r["slots"] + r["grad_buffers"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--hidden", type=int, default=None,
                        help="MLP width; overrides --params (quickstart: 2048)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=list(_common.MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plot", default=None, help="write a PNG (slots per replica vs N)")
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--whole", action="store_true",
                        help="Adafactor and Muon on a keras_hub Llama (whole-variable partition)")
    parser.add_argument("--optimizers", nargs="+", default=["adafactor", "muon"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--whole-child", nargs=2)
    parser.add_argument("--policy", default=None,
                        help="a Keras mixed-precision policy, e.g. mixed_bfloat16")
    parser.add_argument("--param-dtype", default=None, choices=["compute", "float32"],
                        help="ZeroStrategy(param_dtype=...): 16-bit working copies or not")
    args = parser.parse_args()
    if args.whole_child:
        return whole_child(int(args.whole_child[1]), args.whole_child[0], args.layers,
                           args.hidden_dim, args.vocab)
    if args.whole:
        return whole(args)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.params), args.steps,
                     args.hidden, args.policy, args.param_dtype)
    mib = 2 ** 20
    extra = (["--policy", args.policy] if args.policy else []) + (
        ["--param-dtype", args.param_dtype] if args.param_dtype else [])
    print(f"policy {args.policy or 'float32'}, param_dtype {args.param_dtype or 'compute'}")
    print(f"{'N':>3} {'mode':>9} {'params':>11} {'weights':>9} {'w-shards':>9} "
          f"{'slots':>9} {'grad-buf':>9} {'peak RSS':>9}   (MiB per replica; RSS per process)"
          f"  B/param: state over all replicas, allocator")
    series = {}
    for n in args.replicas:
        base = None
        for mode in args.modes:
            line = _common.run_child([__file__, "--child", mode, str(n), "--params",
                                      str(args.params), "--steps", str(args.steps)]
                                     + (["--hidden", str(args.hidden)] if args.hidden else [])
                                     + extra)
            r = json.loads(line)
            base = base or r
            print(f"{n:>3} {mode:>9} {r['params']:>11,} {r['weights'] / mib:>9.1f} "
                  f"{r['weight_shards'] / mib:>9.1f} {r['slots'] / mib:>9.1f} "
                  f"{r['grad_buffers'] / mib:>9.1f} {r['peak_rss_mib']:>9.0f}"
                  f"   state x{_state(r) / _state(base):.3f}"
                  f"  slots x{r['slots'] / base['slots']:.3f}"
                  f"  RSS x{r['peak_rss_mib'] / base['peak_rss_mib']:.3f}"
                  f"  {r['state_per_param']:.1f} {r['allocator_per_param']:.1f}", flush=True)
            series.setdefault(mode, []).append(
                (n, (r["weights"] + r["weight_shards"] + r["slots"] + r["grad_buffers"]) / mib))
    if args.plot:
        _common.line_plot(args.plot, series, "replicas (N)", "MiB of model state per replica",
                          "persistent weights + shards + slots, Adam")


if __name__ == "__main__":
    main()
