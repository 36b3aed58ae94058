"""Stage 3: peak memory of a training step above steady state, by depth.

A deep MLP of equal Dense layers (no biases) is trained at stage 3 with every
weight sharded, with and without recompute, and under MirroredStrategy. Each
configuration runs in its own process with TensorFlow's BFC allocator on CPU
(TF_CPU_ALLOCATOR_USE_BFC), whose statistics `get_memory_info` reports: after
a warm-up step the peak counter is reset and one more step is measured, three
times; the least peak minus the bytes held before the step is printed. All
logical CPU replicas share that allocator, so figures cover all N replicas.

    python benchmarks/depth_peak.py [--depths 8 16 32] [--width 512] [--replicas 4]
"""

import argparse
import gc
import json
import os
import sys

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIGS = ("recompute", "no recompute", "mirrored")


def child(config, depth, width, n, prefetch):
    devices = _common.configure_cpus(n)
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_zero
    from tf_zero import _private

    if config == "mirrored":
        strategy = _private.new_mirrored_strategy(devices)
    else:
        strategy = tf_zero.ZeroStrategy(devices, stage=3, persistence_threshold=0,
                                        recompute=config == "recompute",
                                        prefetch_depth=prefetch)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))] + [
            keras.layers.Dense(width, activation="tanh", use_bias=False)
            for _ in range(depth)])
        opt = keras.optimizers.SGD(0.01)
        if config != "mirrored":
            opt = tf_zero.ZeroOptimizer(opt)
        model.compile(optimizer=opt, loss="mse")
    x = np.ones((8 * n, width), "float32")
    model.fit(x, x, batch_size=8 * n, epochs=1, verbose=0)
    peaks = []
    for _ in range(3):
        gc.collect()
        tf.config.experimental.reset_memory_stats("CPU:0")
        steady = tf.config.experimental.get_memory_info("CPU:0")["current"]
        model.fit(x, x, batch_size=8 * n, epochs=1, verbose=0)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - steady)
    print(json.dumps({"peak": min(peaks), "steady": steady}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--prefetch-depth", type=int, default=1)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.width, args.replicas,
                     args.prefetch_depth)
    mib = 2 ** 20
    layer = args.width * args.width * 4 / mib
    print(f"{args.replicas} replicas, Dense({args.width}) x depth, one layer = {layer:.2f} MiB, "
          f"prefetch_depth {args.prefetch_depth}; MiB over all replicas")
    print(f"{'depth':>5} {'config':>13} {'steady':>9} {'step peak above steady':>24}")
    for depth in args.depths:
        for config in CONFIGS:
            r = json.loads(_common.run_child([__file__, "--child", config, str(depth),
                                              "--width", str(args.width),
                                              "--replicas", str(args.replicas),
                                              "--prefetch-depth", str(args.prefetch_depth)]))
            print(f"{depth:>5} {config:>13} {r['steady'] / mib:>9.2f} {r['peak'] / mib:>24.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
