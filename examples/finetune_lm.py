"""Train a keras_hub causal LM on real text with ZeRO stage 3 on several replicas.

A GPT-2 (or Llama) built from its constructor (random init, no download)
learns the source code of Python's own standard library, byte-tokenized with
keras_hub's `ByteTokenizer`, through a `tf.data` pipeline, under
`ZeroStrategy(stage=3)`, `mixed_bfloat16` and `GradientAccumulationOptimizer`,
with Keras' progress bar. At the end it prints tf_zero's per-replica memory
report beside the same model's under a plain MirroredStrategy, and a short
sample from `generate()`.

    pip install -e ".[examples]" && python examples/finetune_lm.py
    python examples/finetune_lm.py --size small --arch llama --replicas 4 --stage 3

Runs on all local GPUs when there are any, else on logical CPU devices.
"""

import argparse
import glob
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC allocator reuses freed CPU buffers instead of unmapping
# them (much faster on CPU); it must be chosen before TensorFlow starts.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SIZES = {  # layers, heads, hidden, intermediate
    "tiny": (2, 4, 64, 256),
    "small": (4, 4, 128, 512),
    "medium": (8, 8, 512, 2048),
}
VOCAB = 256  # bytes


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--precision", default="mixed_bfloat16",
                        choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="global batch per micro-step")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="micro-steps per epoch")
    return parser.parse_args()


def configure_devices(replicas):
    """Uses the GPUs if present; otherwise splits the CPU into logical devices."""
    if tf.config.list_physical_devices("GPU"):
        return None
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [f"/cpu:{i}" for i in range(replicas)]


def python_source_text(limit_bytes=2_000_000):
    """The standard library's own source: real text that ships with Python."""
    stdlib = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= limit_bytes:
            break
    return "\n".join(chunks)


def make_dataset(tokenizer, seq_len, batch, steps):
    ids = tokenizer(python_source_text())  # one long sequence of byte ids
    windows = tf.data.Dataset.from_tensor_slices(ids).batch(seq_len + 1, drop_remainder=True)
    windows = windows.shuffle(4096, seed=0).take(batch * steps)

    def to_example(w):
        x = {"token_ids": w[:-1], "padding_mask": tf.ones([seq_len], tf.int32)}
        return x, w[1:]

    return windows.map(to_example).batch(batch, drop_remainder=True).prefetch(2)


def make_model(arch, size, seq_len):
    import keras
    import keras_hub

    layers, heads, hidden, intermediate = SIZES[size]
    keras.utils.set_random_seed(0)
    if arch == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=VOCAB, num_layers=layers, num_heads=heads, hidden_dim=hidden,
            intermediate_dim=intermediate, dropout=0.0, max_sequence_length=2 * seq_len)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=layers, num_query_heads=heads,
        num_key_value_heads=max(1, heads // 2), hidden_dim=hidden,
        intermediate_dim=intermediate)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def compile_model(model, optimizer):
    import keras

    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=["sparse_categorical_accuracy"])


def mirrored_memory(args, devices):
    """The same model and optimizer under a plain MirroredStrategy (built, not trained)."""
    import keras

    import tf_zero

    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = make_model(args.arch, args.size, args.seq_len)
        model.build({"token_ids": (None, args.seq_len), "padding_mask": (None, args.seq_len)})
        # Keras' own accumulation: its build creates the full-size buffers
        # (training with it under MirroredStrategy fails, keras-team/keras#20582).
        optimizer = keras.optimizers.AdamW(
            1e-3, gradient_accumulation_steps=args.accumulation if args.accumulation > 1 else None)
        optimizer.build(model.trainable_variables)
    return tf_zero.memory_report(optimizer, model=model)


def main():
    args = parse_args()
    devices = configure_devices(args.replicas)

    import keras
    import keras_hub

    import tf_zero

    keras.mixed_precision.set_global_policy(args.precision)
    tokenizer = keras_hub.tokenizers.ByteTokenizer()
    data = make_dataset(tokenizer, args.seq_len, args.batch, args.steps)

    strategy = tf_zero.ZeroStrategy(devices, stage=args.stage, persistence_threshold=4096)
    with strategy.scope():
        model = make_model(args.arch, args.size, args.seq_len)
        optimizer = tf_zero.GradientAccumulationOptimizer(
            keras.optimizers.AdamW(2e-3, weight_decay=0.01, global_clipnorm=1.0),
            steps=args.accumulation)
        compile_model(model, optimizer)
    params = model.count_params()
    print(f"{args.arch} ({args.size}, {params:,} parameters) on {strategy.num_replicas_in_sync} "
          f"replicas, ZeRO stage {args.stage}, {args.precision}, accumulation "
          f"{args.accumulation} x {args.batch}")
    start = time.time()
    history = model.fit(data, epochs=args.epochs, verbose=1)
    wall = time.time() - start
    print(f"trained in {wall:.1f} s; final loss {history.history['loss'][-1]:.4f}")

    zero = tf_zero.memory_report(model.optimizer, model=model)
    mirrored = mirrored_memory(args, devices)
    print(zero)
    print(mirrored)
    print(f"model state per replica: {zero.max_replica.total / 2**20:.2f} MiB with ZeRO "
          f"stage {args.stage}, {mirrored.max_replica.total / 2**20:.2f} MiB under "
          f"MirroredStrategy ({zero.max_replica.total / mirrored.max_replica.total:.3f}x)")

    prompt = np.zeros([1, args.seq_len], np.int32)
    prompt[0, :4] = list(b"def ")
    mask = (np.arange(args.seq_len) < 4).astype(np.int32)[None]
    sample = model.generate({"token_ids": prompt, "padding_mask": mask},
                            max_length=args.seq_len, stop_token_ids=None)
    length = int(np.sum(sample["padding_mask"][0]))
    text = bytes(np.asarray(sample["token_ids"][0][:length], np.uint8)).decode(
        "utf-8", errors="replace")
    print("sample:", repr(text))


if __name__ == "__main__":
    main()
