"""Largest keras_hub causal LM that trains in this machine's memory, per mode.

A model family scaled as real ones are (width and depth together), random
init: `size` k gives hidden 128k, 64-wide heads, about one layer per 100 of
hidden (20 layers at 2048); Llama adds grouped-query attention (8 query heads
per KV head), a SwiGLU MLP of 2.75 x hidden and a 32,000-token vocabulary
(k=16 is TinyLlama's shape with 20 layers instead of 22: 1.01B parameters);
GPT-2 a 4 x hidden MLP and 50,257 tokens. Adam, float32 (or `--policy
mixed_bfloat16`, with `--param-dtype float32` for float32 working weights at
stages 1-2), `fit` for `--steps` steps of `--batch` sequences of `--seq` tokens, N logical CPU replicas.

For each mode, a bisection over k runs each candidate in its own process and
counts it as fitting when it trains every step with a finite loss while its
resident memory stays under the budget. The budget is the machine's physical
memory less 0.5 GiB (`--budget-gib` overrides it); the child watches its own
RSS every 50 ms and exits at once (status 3) when it crosses the budget, so a
too-large model never pushes the machine into the kernel's OOM killer. Every
mode runs with the same host settings as `examples/llama_1b.py`: TensorFlow's
BFC allocator capped at the budget less 4 GiB (`TF_CPU_BFC_MEM_LIMIT_IN_MB`;
running out of it is a failure like any other) and malloc's free heap handed
back after each step; stage 3 gathers one layer at a time (`prefetch_depth=1`).

    python benchmarks/max_llm.py [--arch llama] [--modes mirrored stage3] [--replicas 4]
    python benchmarks/max_llm.py --probe stage3 16      # one size, with its breakdown

Printed per mode: the largest size, its parameters, peak RSS, the median
step time, and the memory by component: the variables (weights, weight
shards, slots, summed over the replicas by `tf_zero.memory_report`),
TensorFlow's allocator at rest after the last step (the variables and what it
holds beside them) and at its peak, and malloc's heap (the traced step's
graph objects); the rest of RSS is the libraries and allocator pool not in use.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ARCHS = ("llama", "gpt2")


def shape(arch, k):
    """(layers, hidden, heads, kv heads, intermediate, vocabulary) of size k."""
    hidden = 128 * k
    heads = hidden // 64
    layers = max(2, round(hidden / 100))
    if arch == "llama":
        return layers, hidden, heads, max(1, heads // 8), round(2.75 * hidden / 128) * 128, 32000
    return layers, hidden, heads, heads, 4 * hidden, 50257


def param_count(arch, k):
    layers, h, heads, kv, inter, vocab = shape(arch, k)
    if arch == "llama":
        per_layer = 2 * h * h + 2 * h * kv * 64 + 3 * h * inter + 2 * h
        return layers * per_layer + 2 * vocab * h + h
    per_layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h
    return layers * per_layer + vocab * h + 1024 * h + 2 * h


def build(arch, k, seq):
    import keras_hub

    layers, hidden, heads, kv, inter, vocab = shape(arch, k)
    if arch == "llama":
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=vocab, num_layers=layers, num_query_heads=heads,
            num_key_value_heads=kv, hidden_dim=hidden, intermediate_dim=inter)
        return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab, num_layers=layers, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=inter, dropout=0.0, max_sequence_length=1024)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def rss_gib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 2 ** 20
    return out


def heap_gib():
    """glibc's malloc arena size (not TensorFlow's tensors, which its BFC
    allocator maps separately)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                    "keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().arena / 2 ** 30


def watch_rss(budget_gib, started):
    def run():
        while True:
            now = rss_gib()["VmRSS"]
            if now > budget_gib:
                print(json.dumps({"out_of_budget": round(now, 2),
                                  "seconds": round(time.time() - started, 1)}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()


def release_free_heap():
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(arch, mode, k, replicas, budget_gib, seq, batch, steps, policy=None, param_dtype=None):
    started = time.time()
    watch_rss(budget_gib, started)
    os.environ.setdefault("TF_CPU_BFC_MEM_LIMIT_IN_MB", str(int((budget_gib - 4) * 1024)))
    devices = _common.configure_cpus(replicas)
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_zero
    from tf_zero import _private

    if policy:
        keras.mixed_precision.set_global_policy(policy)
    if mode == "mirrored":
        strategy = _private.new_mirrored_strategy(devices)
    else:
        strategy = tf_zero.ZeroStrategy(devices, stage=int(mode[-1]), prefetch_depth=1,
                                        param_dtype=param_dtype)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build(arch, k, seq)
        optimizer = keras.optimizers.Adam(1e-4)
        if mode != "mirrored":
            optimizer = tf_zero.ZeroOptimizer(optimizer)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    built = time.time()
    vocab = shape(arch, k)[5]
    tokens = np.random.default_rng(0).integers(0, vocab, size=(batch * steps, seq + 1))
    x = {"token_ids": tokens[:, :-1].astype("int32"),
         "padding_mask": np.ones((batch * steps, seq), "int32")}
    y = tokens[:, 1:].astype("int32")
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.time())
            release_free_heap()

    history = model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False,
                        callbacks=[Clock()])
    loss = float(history.history["loss"][-1])
    allocator = tf.config.experimental.get_memory_info(
        tf.config.list_logical_devices("CPU")[0].name.replace("/device:", ""))
    steps_s = [b - a for a, b in zip(ends, ends[1:])]
    report = tf_zero.memory_report(model.optimizer, model)
    variables = sum(r.total for r in report.replicas)
    print(json.dumps({
        "params": int(model.count_params()), "loss": loss, "finite": bool(np.isfinite(loss)),
        "peak_rss_gib": round(rss_gib()["VmHWM"], 2),
        "variables_gib": round(variables / 2 ** 30, 2),
        "allocator_at_rest_gib": round(allocator["current"] / 2 ** 30, 2),
        "allocator_peak_gib": round(allocator["peak"] / 2 ** 30, 2),
        "heap_gib": round(heap_gib(), 2),
        "build_s": round(built - started, 1), "first_step_s": round(ends[0] - built, 1),
        "step_s": round(sorted(steps_s)[len(steps_s) // 2], 2) if steps_s else None,
    }), flush=True)


def probe(args, mode, k):
    """Runs size k of `mode` in a subprocess; its result, or None if it did not fit."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(k),
           "--arch", args.arch, "--replicas", str(args.replicas), "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps),
           "--budget-gib", str(args.budget_gib), "--param-dtype", args.param_dtype]
    if args.policy:
        cmd += ["--policy", args.policy]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    fits = r.returncode == 0 and result.get("finite", False)
    if r.returncode not in (0, 3) and not result:
        if "ResourceExhaustedError" in r.stderr:
            result["error"] = "ResourceExhaustedError: over the allocator's cap"
        else:
            result["error"] = r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
    print(f"  {mode} k={k} ({param_count(args.arch, k) / 1e6:,.0f}M): "
          f"{'fits' if fits else 'does not fit'} {json.dumps(result)}", flush=True)
    return result if fits else None


def largest(args, mode):
    """Bisection on k; (k, result) of the largest size that fits, or (None, None)."""
    lo, hi = args.min_size, args.max_size + 1
    best = probe(args, mode, lo)
    if best is None:
        return None, None
    best_k = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = probe(args, mode, mid)
        if result is None:
            hi = mid
        else:
            lo, best_k, best = mid, mid, result
    return best_k, best


def total_memory_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    raise RuntimeError("no MemTotal in /proc/meminfo")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--modes", nargs="+", default=["mirrored", "stage1", "stage2", "stage3"])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="RSS budget (default: physical memory less 0.5 GiB)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--min-size", type=int, default=2, help="smallest k tried")
    parser.add_argument("--max-size", type=int, default=24, help="largest k tried")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "K"),
                        help="run one size of one mode and print its breakdown")
    parser.add_argument("--policy", default=None,
                        help="a Keras mixed-precision policy, e.g. mixed_bfloat16")
    parser.add_argument("--param-dtype", choices=["compute", "float32"], default="compute",
                        help="ZeroStrategy(param_dtype=...) under --policy")
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.budget_gib is None:
        args.budget_gib = round(total_memory_gib() - 0.5, 1)
    if args.child:
        mode, k = args.child
        return child(args.arch, mode, int(k), args.replicas, args.budget_gib, args.seq,
                     args.batch, args.steps, args.policy, args.param_dtype)
    precision = (f"{args.policy}, param_dtype={args.param_dtype}" if args.policy
                 else "float32")
    print(f"{args.arch}: RSS budget {args.budget_gib} GiB, {args.replicas} replicas, Adam, "
          f"{precision}, batch {args.batch} x {args.seq} tokens, {args.steps} steps", flush=True)
    if args.probe:
        probe(args, args.probe[0], int(args.probe[1]))
        return 0
    results = {}
    for mode in args.modes:
        k, result = largest(args, mode)
        results[mode] = result["params"] if result else 0
        base = results.get("mirrored")
        if result is None:
            print(f"{mode:>9}: nothing fits from k={args.min_size}", flush=True)
            continue
        layers, hidden = shape(args.arch, k)[:2]
        ratio = f"  x{result['params'] / base:.2f} of mirrored" if base else ""
        print(f"{mode:>9}: k={k} ({layers} layers x {hidden}), {result['params']:>13,} "
              f"parameters{ratio}, peak RSS {result['peak_rss_gib']} GiB, "
              f"step {result['step_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
