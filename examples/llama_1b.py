"""Train a 1-billion-parameter Llama with ZeRO stage 3 on one 24 GiB machine.

A keras_hub Llama with TinyLlama's shape (hidden 2048, 32 query heads, 4 KV
heads, SwiGLU MLP 5632, vocabulary 32,000) and 20 layers: 1.01B parameters,
random init, trained by `model.fit` with Adam in float32 on 4 replicas (the
GPUs when there are any, else 4 logical CPU devices) on bytes of Python's own
standard library. Its weights, gradients and Adam state take 16 bytes per
parameter; a MirroredStrategy keeps all of that on every replica (64 GiB for
4 replicas), ZeRO stage 3 splits it across them (16 GiB in total).

    pip install -e ".[examples]" && python examples/llama_1b.py   # ZeRO stage 3, 3 steps
    python examples/llama_1b.py --strategy mirrored   # refused: does not fit

Before building anything the script compares `tf_zero.estimate_memory` for
the chosen strategy with the memory the replicas share (this host's RAM on
CPU) and refuses a run that cannot fit, naming one that can; `--force` runs
it anyway. Prints the parameters, each replica's state, the step times, the
loss and the peak resident memory.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC CPU allocator keeps large buffers between steps (its default
# one returns them and page-faults them back every step); set before TF starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import numpy as np  # noqa: E402


def memory_gib():
    """(total, available) RAM of this host, or None where /proc/meminfo is missing."""
    if not os.path.exists("/proc/meminfo"):
        return None
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) / 2 ** 20
    return info["MemTotal"], info["MemAvailable"]


# Outside TensorFlow's allocator: the libraries (~0.7 GiB) and the traced
# step's graph in malloc's heap (~2.8 GiB for 20 layers on 4 replicas).
HOST_OUTSIDE_ALLOCATOR_GIB = 4.0
# The BFC allocator grows its pool and never returns it, so an uncapped pool
# also holds whatever fragmentation the step's changing order leaves: cap it
# at what the host has beside the rest (read once, when TensorFlow starts).
if memory_gib() is not None:
    os.environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(
        max(1024, int((memory_gib()[1] - HOST_OUTSIDE_ALLOCATOR_GIB) * 1024))))

STRATEGIES = {"mirrored": 0, "zero1": 1, "zero2": 2, "zero3": 3}
# Beside the model state (weights, gradients, Adam's two slots: 16 bytes per
# parameter, split by stage), measured on this model at stage 3
# (`python benchmarks/max_llm.py --probe stage3 16`): 0.4 GiB that TensorFlow's
# allocator holds beyond the variables (counted here as 1 byte per parameter)
# and a fixed part: the traced step in malloc's heap (2.8 GiB) and the
# libraries (0.7 GiB), with a margin.
EXTRA_BYTES_PER_PARAM = 1
FIXED_OVERHEAD_GIB = 4.0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="zero3")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--force", action="store_true",
                        help="run even when the memory estimate says it cannot fit")
    return parser.parse_args()


HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 32, 4, 5632, 32000


def parameter_count(layers):
    head_dim = HIDDEN // HEADS
    per_layer = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
                 + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    return layers * per_layer + 2 * VOCAB * HIDDEN + HIDDEN


def check_fits(args):
    """Refuses a CPU run whose model state cannot fit in this host's RAM."""
    import tf_zero

    params = parameter_count(args.layers)
    stage = STRATEGIES[args.strategy]

    def needed(s):
        state = tf_zero.estimate_memory(params, args.replicas, s, "adam").total
        # The replicas share the host: every device's state counts.
        return ((state * args.replicas + EXTRA_BYTES_PER_PARAM * params) / 2 ** 30
                + FIXED_OVERHEAD_GIB)

    if memory_gib() is None:
        print("no /proc/meminfo: the memory check is skipped")
        return
    total, available = memory_gib()
    print(f"Llama, {args.layers} layers x {HIDDEN}: {params:,} parameters; "
          f"{args.replicas} replicas sharing {total:.1f} GiB ({available:.1f} GiB available)")
    for name, s in STRATEGIES.items():
        print(f"  estimated need, {name:>8}: {needed(s):6.1f} GiB"
              f"{'   <- chosen' if name == args.strategy else ''}")
    if needed(stage) <= available or args.force:
        return
    fits = [name for name, s in STRATEGIES.items() if needed(s) <= available]
    hint = (f"use --strategy {fits[-1]}" if fits
            else "use fewer --layers or more replicas' worth of memory")
    sys.exit(f"refused: --strategy {args.strategy} needs about {needed(stage):.1f} GiB for "
             f"{params:,} parameters on {args.replicas} replicas, and this machine has "
             f"{available:.1f} GiB available; {hint} (or --force to try anyway).")


def text_batches(count, seq_len, seed=0):
    """`count` windows of `seq_len + 1` byte tokens of Python's standard library."""
    path = os.path.join(os.path.dirname(os.__file__), "argparse.py")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8).astype("int32")
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, size=count)
    tokens = np.stack([data[s:s + seq_len + 1] for s in starts])
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    return x, tokens[:, 1:]


def release_free_heap():
    """Hands malloc's free pages back to the system (glibc), e.g. what tracing the
    step left behind; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main():
    args = parse_args()
    import tensorflow as tf

    devices = None
    if not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
        devices = [f"/cpu:{i}" for i in range(args.replicas)]
        check_fits(args)
    import keras
    import keras_hub

    import tf_zero

    started = time.time()
    stage = STRATEGIES[args.strategy]
    if stage:
        # prefetch_depth=1: one layer's weights gathered at a time.
        strategy = tf_zero.ZeroStrategy(devices, stage=stage, prefetch_depth=1)
    else:
        strategy = tf.distribute.MirroredStrategy(devices)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=VOCAB, num_layers=args.layers, num_query_heads=HEADS,
            num_key_value_heads=KV_HEADS, hidden_dim=HIDDEN, intermediate_dim=INTERMEDIATE)
        model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        optimizer = keras.optimizers.Adam(1e-4)
        if stage:
            optimizer = tf_zero.ZeroOptimizer(optimizer)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(f"{type(strategy).__name__}"
          f"{f' stage {stage}' if stage else ''}, {strategy.num_replicas_in_sync} replicas: "
          f"{model.count_params():,} parameters, built in {time.time() - started:.0f} s")
    ends = [time.time()]

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.time())
            release_free_heap()
            print(f"  step {batch + 1}: loss {logs['loss']:.4f}, "
                  f"{ends[-1] - ends[-2]:.1f} s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)

    x, y = text_batches(args.batch * args.steps, args.seq_len)
    history = model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False,
                        callbacks=[StepClock()])
    losses = history.history["loss"]
    if stage:
        print(tf_zero.memory_report(model.optimizer, model))
    print(f"final loss {losses[-1]:.4f} (finite: {bool(np.isfinite(losses[-1]))}); "
          f"first step {ends[1] - ends[0]:.0f} s (tracing included), "
          f"wall {time.time() - started:.0f} s, peak RSS {peak_rss_gib():.2f} GiB")
    return 0 if np.isfinite(losses[-1]) else 1


if __name__ == "__main__":
    sys.exit(main())
