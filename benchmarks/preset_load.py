"""Host memory of `keras_hub.models.CausalLM.from_preset` under each strategy.

A GPT-2 preset (GPT-2 small's shapes by default: 12 layers x 768, a 50,257
token vocabulary, with 128 positions 123.8M parameters; `presets.make_gpt2_preset`) is saved once
to a temporary directory. Then, for each mode, a fresh process creates the
strategy on N logical CPUs, reads its resident set size (RSS), resets the
kernel's peak-RSS counter (`/proc/self/clear_refs`) and runs what
`from_preset` runs inside `strategy.scope()`, in its two phases, reading the
peak (`VmHWM`) and the RSS after each:

* build: `CausalLM.from_preset(preset, load_weights=False)`, the model
  constructed with its random initial values, tokenizer and preprocessor;
* load: `model.backbone.load_weights(preset/model.weights.h5)`, the file's
  weights written into the model (what `from_preset` does next).

* "held" = RSS after both - RSS before: what the loaded model keeps (at
  stage 3 the N shards, one full model in all on this one host).
* "transient" of a phase = its peak - the RSS after it: what it needed on top
  of what it keeps. The load's bound at stage 3 is one full tensor (the
  largest, GPT-2's token embedding): each tensor is read from the file once
  and each replica's shard written from it, never one full copy per replica.
  The build's transient is the initializers' (Keras draws each full random
  tensor, then scales it), under any strategy.
* "peak-before" = the highest RSS of the two phases - RSS before.

Everything is in MiB and as a multiple of the weights' size W (the file's
tensors, float32) and of the largest tensor T. The processes run with
TensorFlow's default CPU allocator and glibc's mmap threshold fixed at
64 KiB, so freed buffers go back to the system and the RSS after the load
is what is held, not what an allocator kept cached.

    python benchmarks/preset_load.py [--replicas 4] [--modes mirrored stage1 stage2 stage3]
        [--layers 12 --hidden 768 --vocabulary 50257] [--preset DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("mirrored", "stage1", "stage2", "stage3")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocabulary", type=int, default=50257)
    parser.add_argument("--sequence-length", type=int, default=1024)
    parser.add_argument("--preset", help="an existing preset directory (else one is made)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON line per mode")
    return parser.parse_args(argv)


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def weights_in_file(preset):
    """(total bytes, largest tensor's bytes, tensor count) of model.weights.h5."""
    import h5py

    sizes = []
    with h5py.File(os.path.join(preset, "model.weights.h5"), "r") as f:
        f.visititems(lambda name, obj: sizes.append(obj.nbytes)
                     if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes), max(sizes), len(sizes)


def child(mode, preset, replicas):
    """One measurement in this process; returns a dict of bytes."""
    sys.path.insert(0, HERE)
    import _common
    import keras_hub
    import tensorflow as tf

    import tf_zero
    from tf_zero import _private

    devices = _common.configure_cpus(replicas)
    if mode == "mirrored":
        strategy = _private.new_mirrored_strategy(devices)
    else:
        # persistence_threshold=0: every float weight is sharded at stage 3,
        # the biases and layer norms too.
        strategy = tf_zero.ZeroStrategy(devices, stage=int(mode[-1]), persistence_threshold=0)
    with strategy.scope():
        tf.zeros([1]) + 1  # start the runtime before the baseline
    def measured(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        result = fn()
        return result, status("VmHWM"), status("VmRSS")

    before = status("VmRSS")
    with strategy.scope():
        model, build_peak, built = measured(
            lambda: keras_hub.models.CausalLM.from_preset(preset, load_weights=False))
        _, load_peak, after = measured(lambda: model.backbone.load_weights(
            os.path.join(preset, "model.weights.h5")))
    sharded = sum(1 for v in model.weights if tf_zero.is_sharded(v))
    return {"mode": mode, "replicas": replicas, "before": before, "build_peak": build_peak,
            "built": built, "load_peak": load_peak, "after": after,
            "weights": len(model.weights), "sharded": sharded,
            "params": int(model.count_params())}


def run_child(mode, preset, replicas):
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="false", MALLOC_MMAP_THRESHOLD_="65536",
               TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", mode, "--preset", preset,
         "--replicas", str(replicas), "--json"],
        env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_preset(directory, args):
    sys.path.insert(0, HERE)
    import presets

    presets.make_gpt2_preset(
        directory, layers=args.layers, heads=max(1, args.hidden // 64), hidden=args.hidden,
        intermediate=4 * args.hidden, sequence_length=min(128, args.sequence_length),
        vocabulary_size=args.vocabulary)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.replicas)))
        return
    with tempfile.TemporaryDirectory(prefix="tf_zero_preset_") as tmp:
        preset = args.preset
        if preset is None:
            preset = os.path.join(tmp, "gpt2")
            subprocess.run([sys.executable, "-c",
                            "import sys; sys.path.insert(0, %r); import preset_load as p; "
                            "p.make_preset(%r, p.parse_args(%r))" % (
                                HERE, preset, sys.argv[1:] if argv is None else argv)],
                           check=True)
        total, largest, count = weights_in_file(preset)
        mib = 2.0 ** 20
        print(f"preset {preset}: {count} tensors, W = {total / mib:.1f} MiB, "
              f"largest tensor T = {largest / mib:.1f} MiB; N = {args.replicas}")
        print(f"{'mode':<9} {'held MiB':>9} {'held/W':>7} {'build transient/T':>18} "
              f"{'load transient MiB':>19} {'load transient/T':>17} {'peak-before MiB':>16}")
        for mode in args.modes:
            r = run_child(mode, preset, args.replicas)
            held = r["after"] - r["before"]
            build, load = r["build_peak"] - r["built"], r["load_peak"] - r["after"]
            peak = max(r["build_peak"], r["load_peak"]) - r["before"]
            r.update(W=total, T=largest)
            if args.json:
                print(json.dumps(r))
            print(f"{mode:<9} {held / mib:9.1f} {held / total:7.2f} {build / largest:18.2f} "
                  f"{load / mib:19.1f} {load / largest:17.2f} {peak / mib:16.1f}", flush=True)


if __name__ == "__main__":
    main()
