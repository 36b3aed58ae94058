"""GPU check: NCCL reduce-scatter correctness and per-GPU peak memory.

    python benchmarks/gpu_check.py [--logical 2] [--hidden 4096]

1. Reduce-scatter: every GPU replica contributes a known vector; the shard
   each receives through `tf_zero.collectives.reduce_scatter` (the NCCL
   collective reduce-scatter on GPUs) is compared with numpy, for float32,
   float16 and bfloat16; the all-gather likewise.
2. Memory: the same MLP trained a few steps under MirroredStrategy and under
   ZeRO stage 2, each in a fresh process; peak bytes per GPU from
   `tf.config.experimental.get_memory_info`.

With one physical GPU, `--logical K` splits it into K logical GPUs with a
memory limit each. That exercises the NCCL code path and the per-device
accounting, but K logical GPUs share one physical device: peak figures are
per logical device and bandwidth says nothing about a real multi-GPU host.
Exits with status 2 and a message when no GPU is present.
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def configure(logical, limit_mib):
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("no GPU available: nothing to check")
        sys.exit(2)
    if len(gpus) == 1 and logical > 1:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=limit_mib)] * logical)
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def check_collectives(devices):
    import numpy as np
    import tensorflow as tf

    import tf_zero
    from tf_zero import collectives

    strategy = tf_zero.ZeroStrategy(devices)
    n = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    table = rng.uniform(-2, 2, size=(n, 64 * n)).astype(np.float32)
    for dtype in (tf.float32, tf.float16, tf.bfloat16):
        def fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            x = tf.cast(tf.gather(tf.constant(table), r), dtype)
            return collectives.backend(), collectives.reduce_scatter(x), collectives.all_gather(x)

        backend, shards, gathered = tf.function(lambda: strategy.run(fn))()
        rounded = tf.cast(tf.cast(table, dtype), tf.float64).numpy()
        total = rounded.sum(axis=0)
        got = np.concatenate([tf.cast(s, tf.float64).numpy()
                              for s in strategy.experimental_local_results(shards)])
        err = float(np.max(np.abs(got - total)))
        gat = tf.cast(strategy.experimental_local_results(gathered)[-1], tf.float64).numpy()
        exact = bool(np.array_equal(gat, rounded.reshape(-1)))
        print(f"reduce_scatter {dtype.name:>8}: backend {backend}, max |error| {err:.3g}; "
              f"all_gather exact: {exact}")


def memory_child(mode, logical, limit_mib, hidden, steps):
    devices = configure(logical, limit_mib)
    import tensorflow as tf

    import _common

    _, model = _common.make_strategy_and_model(mode, devices, hidden)
    x, y = _common.make_data(32 * len(devices) * steps)
    for d in devices:
        tf.config.experimental.reset_memory_stats(d)
    model.fit(x, y, batch_size=32 * len(devices), epochs=1, verbose=0)
    peaks = [tf.config.experimental.get_memory_info(d)["peak"] for d in devices]
    print(json.dumps({"params": model.count_params(), "peaks": peaks}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--logical", type=int, default=2,
                        help="logical GPUs when there is one physical GPU")
    parser.add_argument("--limit-mib", type=int, default=16000)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        return memory_child(args.child, args.logical, args.limit_mib, args.hidden, args.steps)
    devices = configure(args.logical, args.limit_mib)
    print(f"GPU replicas: {devices}")
    check_collectives(devices)
    base = None
    for mode in ("mirrored", "stage2"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--logical", str(args.logical),
             "--limit-mib", str(args.limit_mib), "--hidden", str(args.hidden),
             "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak = max(r["peaks"])
        base = base or peak
        print(f"{mode:>9}: {r['params']:,} params, peak per GPU "
              f"{peak / 2**20:.1f} MiB (x{peak / base:.3f})")


if __name__ == "__main__":
    main()
