"""Models users train, small and random-initialized, and one parity run each.

keras_hub LLMs (GPT-2, Llama, Gemma, BERT) and keras.applications CNNs
(MobileNetV2, ResNet50), built from their constructors with small configs
(no downloads), fed real data that ships offline: bytes of the Python
standard library's source text for the language models, scikit-learn's
bundled 8x8 digits (upsampled to 32x32 RGB) for the CNNs.

`train(name, mode, ...)` trains one model for a few `fit` steps and returns
its weights and losses. Modes: `"stage1"`, `"stage2"`, `"stage3"` (ZeroStrategy
and ZeroOptimizer; under a mixed policy stages 1-2 keep 16-bit working
copies), `"stage1_float32"`, `"stage2_float32"` (the same with
`param_dtype="float32"`: float32 working weights), `"mirrored"` (the plain
optimizer under MirroredStrategy: the reference) and `"mirrored_one_device"`
(the same with `ReductionToOneDevice`, which sums the gradients in another
order: its distance to `"mirrored"` is the run's float-noise floor).

Used by `tests/test_models.py` (a representative subset) and
`benchmarks/models.py` (the full sweep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

LM_VOCAB = 512
SEQ = 32
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
MODES = ("mirrored", "mirrored_one_device", "stage1", "stage2", "stage3")
WORKING_MODES = ("stage1_float32", "stage2_float32")  # float32 working weights


def text_tokens(count, seq=SEQ, seed=0):
    """`count` windows of `seq + 1` byte tokens of Python's own source text."""
    path = os.path.join(os.path.dirname(os.__file__), "argparse.py")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8).astype("int32")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq - 1, size=count)
    return np.stack([data[s:s + seq + 1] for s in starts])


def lm_data(count, seed=0):
    tokens = text_tokens(count, seed=seed)
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    return x, tokens[:, 1:]


def classifier_data(count, seed=0):
    tokens = text_tokens(count, seed=seed)[:, :-1]
    x = {"token_ids": tokens, "segment_ids": np.zeros_like(tokens),
         "padding_mask": np.ones_like(tokens)}
    y = (tokens[:, 0] % 3).astype("int32")  # a label the text determines
    return x, y


def image_data(count, seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits.images), size=count, replace=False)
    images = digits.images[idx].astype("float32") / 16.0
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 8x8 -> 32x32
    return np.repeat(images[..., None], 3, axis=-1), digits.target[idx].astype("int32")


def _gpt2():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=LM_VOCAB, num_layers=2, num_heads=4, hidden_dim=64,
        intermediate_dim=128, dropout=0.0, max_sequence_length=64)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _llama():
    import keras_hub

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=LM_VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _gemma():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=LM_VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=64, intermediate_dim=128, head_dim=16)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _bert():
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=LM_VOCAB, num_layers=2, num_heads=4, hidden_dim=64,
        intermediate_dim=128, dropout=0.0, max_sequence_length=64)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3,
                                               preprocessor=None, dropout=0.0)


def _mobilenet_v2():
    import keras

    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          weights=None, classes=10,
                                          classifier_activation=None)


def _resnet50():
    import keras

    return keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10,
                                       classifier_activation=None)


def _adamw():
    import keras

    return keras.optimizers.AdamW(1e-3, weight_decay=0.01)


def _sgd():
    # Not Adam for the CNNs: BatchNormalization cancels the gradient of
    # whatever precedes it up to round-off, and Adam turns round-off into
    # steps of size learning_rate (weights then differ by ~2e-3 after 3 steps
    # between two MirroredStrategy runs that only sum in another order).
    import keras

    return keras.optimizers.SGD(0.01, momentum=0.9)


def _whole_tensor(name):
    """Lamb, Adafactor or Muon, the optimizers tf_zero partitions by whole variable."""
    import keras

    return {"lamb": lambda: keras.optimizers.Lamb(1e-3, weight_decay=0.01),
            "adafactor": lambda: keras.optimizers.Adafactor(1e-3),
            "muon": lambda: keras.optimizers.Muon(1e-3)}[name]()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: object
    data: object
    optimizer: object
    batch_norm: bool  # BatchNormalization on small per-replica batches: chaotic


MODELS = {
    "gpt2": ModelSpec(_gpt2, lm_data, _adamw, False),
    "llama": ModelSpec(_llama, lm_data, _adamw, False),
    "gemma": ModelSpec(_gemma, lm_data, _adamw, False),
    "bert": ModelSpec(_bert, classifier_data, _adamw, False),
    "mobilenet_v2": ModelSpec(_mobilenet_v2, image_data, _sgd, True),
    "resnet50": ModelSpec(_resnet50, image_data, _sgd, True),
}


@contextlib.contextmanager
def graph_optimizer(enabled):
    """TensorFlow's graph optimizer (grappler) on or off while functions run.

    Grappler picks fused kernels by graph pattern, and the control edges of
    stage 3's prefetch window change which patterns it finds. The results
    differ by kernel rounding only, but that is enough to move chaotic runs:
    MobileNetV2's first training forward pass differs from MirroredStrategy's
    by 1e-4 in the logits, and a `mixed_bfloat16` Llama's weights by 1.5e-3
    after 3 AdamW steps (both bitwise equal, or within 3e-8, with grappler
    off). Kernel choice is not what a parity run measures, so `train` runs
    with it off unless asked.
    """
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not enabled})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


@contextlib.contextmanager
def policy(name):
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def densified(optimizer):
    """The plain optimizer fed dense Embedding gradients (Adam's definition;
    Keras' sparse path squares repeated rows one by one, tf_zero reduces the
    dense gradient)."""
    import tensorflow as tf

    apply = optimizer.apply

    def dense_apply(grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in grads]
        return apply(grads, trainable_variables)

    optimizer.apply = dense_apply
    return optimizer


_strategies = {}


def strategy_for(mode, devices, persistence_threshold=1024):
    """One strategy per (mode, devices) in a process (collective keys of its own)."""
    import tensorflow as tf

    import tf_zero
    from tf_zero import _private

    key = (mode, tuple(devices), persistence_threshold)
    if key not in _strategies:
        if mode == "mirrored":
            _strategies[key] = _private.new_mirrored_strategy(devices)
        elif mode == "mirrored_one_device":
            _strategies[key] = tf.distribute.MirroredStrategy(
                devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
        else:
            stage, _, param_dtype = mode.partition("_")
            _strategies[key] = tf_zero.ZeroStrategy(
                devices, stage=int(stage[-1]), persistence_threshold=persistence_threshold,
                param_dtype=param_dtype or "compute")
    return _strategies[key]


@dataclasses.dataclass
class Run:
    weights: list
    losses: list
    sharded_fraction: float  # of the trainable elements stored as stage-3 shards
    optimizer: object = None
    working_fraction: float = 0.0  # of the trainable elements with 16-bit working copies


def train(name, mode, devices, precision="float32", steps=3, batch=16, seed=1, grappler=False,
          optimizer=None):
    """`steps` fit steps of model `name`; its weights and per-step losses.

    `grappler=False` turns TensorFlow's graph optimizer off during the run
    (see `graph_optimizer`). `optimizer`: "lamb", "adafactor" or "muon"
    instead of the model's own.
    """
    import keras

    import tf_zero

    spec = MODELS[name]
    strategy = strategy_for(mode, devices)
    x, y = spec.data(steps * batch)
    losses = []
    with policy(precision), graph_optimizer(grappler):
        with strategy.scope():
            keras.utils.set_random_seed(seed)
            model = spec.build()
            opt = _whole_tensor(optimizer) if optimizer else spec.optimizer()
            opt = densified(opt) if mode.startswith("mirrored") else tf_zero.ZeroOptimizer(opt)
            model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.LambdaCallback(
                      on_train_batch_end=lambda b, logs: losses.append(float(logs["loss"])))])
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    sharded = sum(int(np.prod(v.shape)) for v in model.trainable_variables
                  if tf_zero.is_sharded(v))
    working = sum(int(np.prod(v.shape)) for v in model.trainable_variables
                  if tf_zero.has_working_copy(v))
    return Run(model.get_weights(), losses, sharded / max(total, 1), model.optimizer,
               working / max(total, 1))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(a, b))
