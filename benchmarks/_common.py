"""Shared helpers of the benchmark scripts (each run is its own process)."""

import os
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's default CPU allocator returns large buffers to the system and
# faults them back every step; BFC keeps them (read once, at TensorFlow's start).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

MODES = ("mirrored", "stage1", "stage2", "stage3")
# Not a training mode: MirroredStrategy running the forward and backward pass
# alone (no gradient reduction, no update), the floor under any step of
# data-parallel training on the same replicas (step_time.py --modes ... gradients).
FLOOR = "gradients"
# Stages 1-2 with float32 working weights under a mixed policy (param_dtype="float32").
FLOAT32_WORKING_MODES = ("stage1_float32", "stage2_float32")


def configure_cpus(n):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return None
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    return [f"/cpu:{i}" for i in range(n)]


def hidden_for(params, inputs=64, outputs=10, layers=3):
    """Width of an MLP with `layers` hidden layers and about `params` weights."""
    # params ~ inputs*h + (layers-1)*h*h + h*outputs
    a, b, c = layers - 1, inputs + outputs + layers, -params
    return max(8, int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))


def make_model(hidden, inputs=64, outputs=10, layers=3):
    import keras

    keras.utils.set_random_seed(0)
    stack = [keras.Input((inputs,))]
    stack += [keras.layers.Dense(hidden, activation="relu") for _ in range(layers)]
    stack += [keras.layers.Dense(outputs)]
    return keras.Sequential(stack)


def make_strategy_and_model(mode, devices, hidden, lr=1e-3, layers=3, bucket_size_bytes=None,
                            param_dtype=None):
    """`mode`: "mirrored", or "stage1" / "stage2" / "stage3" (ZeroStrategy);
    `param_dtype` as `ZeroStrategy`'s (16-bit working copies under a mixed
    policy unless "float32")."""
    import keras

    import tf_zero
    from tf_zero import _private

    if mode == "mirrored":
        strategy = _private.new_mirrored_strategy(devices)
    else:
        strategy = tf_zero.ZeroStrategy(devices, stage=int(mode[-1]), param_dtype=param_dtype)
    with strategy.scope():
        model = make_model(hidden, layers=layers)
        opt = keras.optimizers.Adam(lr)
        if mode != "mirrored":
            opt = tf_zero.ZeroOptimizer(opt, bucket_size_bytes=bucket_size_bytes)
        model.compile(optimizer=opt, loss="mse")
    return strategy, model


def make_data(n, inputs=64, outputs=10):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, inputs)).astype("float32"),
            rng.normal(size=(n, outputs)).astype("float32"))


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args):
    """Runs this interpreter on `args`; returns the last line of stdout."""
    out = subprocess.run([sys.executable] + args, check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()
    return out[-1]


def _pyplot(path):
    """matplotlib's pyplot (Agg), or None with a note (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; no plot written to {path} "
              "(pip install -e '.[bench]')")
        return None
    return plt


def _save(plt, fig, ax, path, ylabel, title):
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


def bar_plot(path, values, ylabel, title):
    """Writes a bar chart of {label: value}."""
    plt = _pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(list(values), list(values.values()), color=["#888", "#48c", "#26a", "#048"][:len(values)])
    _save(plt, fig, ax, path, ylabel, title)


def line_plot(path, series, xlabel, ylabel, title):
    """Writes lines of {label: [(x, y), ...]}."""
    plt = _pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.legend()
    _save(plt, fig, ax, path, ylabel, title)


def step_op_count(model, x, y, batch):
    """Nodes of one traced `fit` step (Keras' `strategy.run(train_step)`), the
    functions it calls included: the size of the graph TensorFlow runs."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))
    step = tf.function(lambda d: strategy.run(model.train_step, args=(d,)))
    graph_def = step.get_concrete_function(next(iter(data))).graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


# The workloads of the step-time benchmarks: {name: (description, builder)}.
# A builder returns (model, optimizer, loss, x, y, global batch) for a number
# of replicas, built under the current strategy's scope.
def _mlp27m(replicas, steps):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1024,)),
                              keras.layers.Dense(8192, activation="relu"),
                              keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(1024)])
    batch = 64
    x, y = make_data(batch * steps, inputs=1024, outputs=1024)
    return model, keras.optimizers.Adam(1e-4), "mse", x, y, batch


def _gpt2_12(replicas, steps):
    import keras
    import keras_hub

    import zoo

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=zoo.LM_VOCAB, num_layers=12, num_heads=4, hidden_dim=256,
        intermediate_dim=1024, dropout=0.0, max_sequence_length=64)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    batch = 8 * replicas
    x, y = zoo.lm_data(batch * steps)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, keras.optimizers.AdamW(1e-4, weight_decay=0.01), loss, x, y, batch


WORKLOADS = {
    "mlp27m": ("27M-parameter MLP 1024-8192-2048-1024, Adam, global batch 64", _mlp27m),
    "gpt2": ("keras_hub GPT-2, 12 layers, hidden 256, vocabulary 512, 32 tokens, AdamW, "
             "batch 8 per replica", _gpt2_12),
}


def make_workload(name, mode, devices, steps, hidden=2048, batch_per_replica=32,
                  bucket_size_bytes=None):
    """(model, x, y, global batch) of workload `name` compiled under `mode`;
    `"mlp"` is `make_model(hidden)` with Adam (the quickstart's at 2048)."""
    import tf_zero
    from tf_zero import _private

    replicas = len(devices or [0])
    compiled = "mirrored" if mode == FLOOR else mode  # the floor compiles as MirroredStrategy
    param_dtype = None
    if compiled in FLOAT32_WORKING_MODES:  # "stage2_float32": ZeroStrategy(param_dtype="float32")
        compiled, param_dtype = compiled.split("_")
    if name == "mlp":
        batch = batch_per_replica * replicas
        x, y = make_data(batch * steps)
        _, model = make_strategy_and_model(compiled, devices, hidden,
                                           bucket_size_bytes=bucket_size_bytes,
                                           param_dtype=param_dtype)
    else:
        if compiled == "mirrored":
            strategy = _private.new_mirrored_strategy(devices)
        else:
            strategy = tf_zero.ZeroStrategy(devices, stage=int(compiled[-1]),
                                            param_dtype=param_dtype)
        with strategy.scope():
            model, opt, loss, x, y, batch = WORKLOADS[name][1](replicas, steps)
            if compiled != "mirrored":
                opt = tf_zero.ZeroOptimizer(opt, bucket_size_bytes=bucket_size_bytes)
            model.compile(optimizer=opt, loss=loss)
    if mode == FLOOR:
        gradients_only(model)
    return model, x, y, batch


def gradients_only(model):
    """Makes `model`'s train step the forward and backward pass alone: no
    reduction across replicas, no update. One element of every gradient is
    returned, so the whole backward pass stays in the traced step."""
    import keras
    import tensorflow as tf

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, model.trainable_weights)
        firsts = [tf.reshape(g.values if isinstance(g, tf.IndexedSlices) else g, [-1])[0]
                  for g in grads if g is not None]
        return {"loss": loss, "gradient_elements": tf.add_n(firsts)}

    model.train_step = train_step
