"""Fine-tune a keras_hub causal LM on real text with ZeRO on several replicas.

With `--preset NAME_OR_DIR`, a pretrained keras_hub preset (a name such as
`gpt2_base_en` where Kaggle is reachable, or a local directory laid out as
`save_to_preset` writes it) is loaded with its own tokenizer and
preprocessor inside `ZeroStrategy(stage=...).scope()`: at stage 3 each
weight goes from the file straight into the replicas' shards. `--lora RANK`
freezes the base and trains LoRA weights. It is fine-tuned on raw text
(`--text FILE_OR_DIR`; by default Python's own standard-library source) and
can be written back with `--save DIR` as a preset any plain Keras loads.

Without `--preset`, a GPT-2 (or Llama) built from its constructor (random
init, no download) learns the same text byte-tokenized with keras_hub's
`ByteTokenizer`.

Either way it trains through a `tf.data` pipeline under `ZeroStrategy`,
`mixed_bfloat16` and `GradientAccumulationOptimizer`, with Keras' progress
bar, then prints tf_zero's per-replica memory report beside the same
model's under a plain MirroredStrategy, and a short sample from `generate()`.

    pip install -e ".[examples]" && python examples/finetune_lm.py
    python examples/finetune_lm.py --size small --arch llama --replicas 4 --stage 3
    python examples/finetune_lm.py --preset gpt2_base_en --lora 4       # downloads
    python examples/finetune_lm.py --preset ./my_gpt2 --lora 4 --save ./my_gpt2_tuned

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
    parser.add_argument("--preset", help="a keras_hub preset name or a local preset directory "
                        "(default: a model built from scratch)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="train LoRA weights of this rank over a frozen base")
    parser.add_argument("--text", help="a text file or a directory of .py/.txt/.md files "
                        "(default: the standard library's source)")
    parser.add_argument("--save", metavar="DIR", help="save the fine-tuned preset here")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--precision", default="mixed_bfloat16",
                        choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--persistence-threshold", type=int, default=4096,
                        help="stage 3 shards the weights with at least this many elements")
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


def python_source_text(limit_bytes=2_000_000, where=None):
    """The text to learn: `where` (a file, or a directory's .py, .txt and .md
    files), by default the standard library's own source, which ships with Python."""
    if where is not None and os.path.isfile(where):
        with open(where, encoding="utf-8", errors="replace") as f:
            return f.read(limit_bytes)
    if where is not None:
        paths = [p for ext in ("py", "txt", "md")
                 for p in glob.glob(os.path.join(where, "**", f"*.{ext}"), recursive=True)]
    else:
        paths = glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))
    chunks, total = [], 0
    for path in sorted(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= limit_bytes:
            break
    return "\n".join(chunks)


def make_dataset(tokenizer, seq_len, batch, steps, where=None):
    ids = tokenizer(python_source_text(where=where))  # one long sequence of byte ids
    windows = tf.data.Dataset.from_tensor_slices(ids).batch(seq_len + 1, drop_remainder=True)
    windows = windows.shuffle(4096, seed=0).take(batch * steps)

    def to_example(w):
        x = {"token_ids": w[:-1], "padding_mask": tf.ones([seq_len], tf.int32)}
        return x, w[1:]

    return windows.map(to_example).batch(batch, drop_remainder=True).prefetch(2)


def text_dataset(seq_len, batch, steps, where=None):
    """Raw strings of about `seq_len` tokens each: the preset's own
    preprocessor tokenizes them inside `fit` (keras_hub's tasks map it)."""
    text = python_source_text(where=where)
    width = 4 * seq_len  # characters; the preprocessor pads or truncates to seq_len tokens
    pieces = [text[i:i + width] for i in range(0, len(text) - width, width)]
    rng = np.random.default_rng(0)
    pieces = [pieces[i] for i in rng.permutation(len(pieces))[:batch * steps]]
    return tf.data.Dataset.from_tensor_slices(pieces).batch(batch, drop_remainder=True)


def save_preset(model, directory):
    """`save_to_preset`, with the weights' float32 policy in its configs.

    Under a mixed policy the variables are float32 but the configs name the
    mixed policy, which keras_hub 0.32's `from_preset` cannot read back
    ("Invalid dtype: mixed_bfloat16"); a float32 preset loads under whatever
    policy the loader sets.
    """
    import json

    model.save_to_preset(directory)
    for name in ("config.json", "task.json"):
        path = os.path.join(directory, name)
        with open(path) as f:
            text = f.read()
        policy = model.backbone.dtype_policy.name
        if policy.startswith("mixed_"):
            config = json.loads(text.replace(f'"name": "{policy}"', '"name": "float32"'))
            with open(path, "w") as f:
                json.dump(config, f, indent=4)


def load_preset(preset, seq_len, lora):
    """The preset's causal LM, its weights and tokenizer, in the current scope."""
    import keras_hub

    # A preset saved in float32 loads under the global policy (`--precision`).
    model = keras_hub.models.CausalLM.from_preset(preset)
    model.preprocessor.sequence_length = seq_len
    if lora:
        model.backbone.enable_lora(lora)
    return model


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
        if args.preset:
            model = load_preset(args.preset, args.seq_len, args.lora)
        else:
            model = make_model(args.arch, args.size, args.seq_len)
            model.build({"token_ids": (None, args.seq_len),
                         "padding_mask": (None, args.seq_len)})
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
    strategy = tf_zero.ZeroStrategy(devices, stage=args.stage, 
                                    persistence_threshold=args.persistence_threshold)
    if args.preset:
        data = text_dataset(args.seq_len, args.batch, args.steps, args.text)
        learning_rate = 1e-3 if args.lora else 1e-4  # a pretrained base: smaller steps
    else:
        tokenizer = keras_hub.tokenizers.ByteTokenizer()
        data = make_dataset(tokenizer, args.seq_len, args.batch, args.steps, args.text)
        learning_rate = 2e-3
    with strategy.scope():
        if args.preset:
            start = time.time()
            model = load_preset(args.preset, args.seq_len, args.lora)
            print(f"loaded {args.preset} in {time.time() - start:.1f} s")
        else:
            model = make_model(args.arch, args.size, args.seq_len)
        optimizer = tf_zero.GradientAccumulationOptimizer(
            keras.optimizers.AdamW(learning_rate, weight_decay=0.01, global_clipnorm=1.0),
            steps=args.accumulation)
        compile_model(model, optimizer)
    params = model.count_params()
    what = (f"{type(model).__name__} from preset {args.preset}" if args.preset
            else f"{args.arch} ({args.size})")
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    lora = f", LoRA rank {args.lora} ({trainable:,} trainable)" if args.lora else ""
    print(f"{what}, {params:,} parameters{lora}, on {strategy.num_replicas_in_sync} "
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

    if args.preset:
        print("sample:", repr(model.generate("def ", max_length=args.seq_len)))
        if args.save:
            save_preset(model, args.save)
            print(f"saved the fine-tuned preset to {args.save}")
            if args.lora:
                # save_to_preset writes the base weights only: the adapters go
                # beside them (load: backbone.enable_lora(rank), load_lora_weights).
                path = os.path.join(args.save, "model.lora.h5")
                model.backbone.save_lora_weights(path)
                print(f"saved the LoRA weights to {path}")
        return
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
