"""Loss curves of a keras_hub GPT-2 at stage 3 with quantized collectives,
against float32 collectives and their noise floor.

Each setting trains the same model from the same weights on the same
byte-level text (Python's own `argparse.py`, `zoo.lm_data`) for `--steps`
steps at N replicas, stage 3, Adam: float32 collectives twice (the second
with the samples of every global batch in reverse order, so each replica
sums different examples: the same mean gradient in another floating-point
order), then int8 weights (qwZ), int8 and int4 gradients (qgZ), and both.
A third float32 run draws other windows of the same text: the run-to-run
variation a change of data order alone makes. The final loss is the mean of
the last `--window` steps' losses; the noise floors are the differences
between the float32 runs (reduction order: the first two; data order: the
first and the third). Weights below
`--persistence-threshold` elements (biases, norms) stay replicated, so they
are neither gathered nor quantized.

    python benchmarks/quantized_convergence.py                     # 300 steps, 4 replicas
    python benchmarks/quantized_convergence.py --steps 60 --plot curves.png

Prints a table; `--plot` writes the curves (matplotlib, the `bench` extra),
`--json` every step's loss.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SETTINGS = {
    "float32": {},
    "float32, other order": {},
    "float32, other data": {},
    "int8 weights": {"quantized_weights": "int8"},
    "int8 gradients": {"quantized_gradients": "int8"},
    "int4 gradients": {"quantized_gradients": "int4"},
    "int8 both": {"quantized_weights": "int8", "quantized_gradients": "int8"},
}


class StepLosses:
    """Keras callback recording each step's loss (Keras logs the running mean
    of the epoch: undone here)."""

    def __new__(cls):
        import keras

        class _Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.losses, self._mean, self._count = [], 0.0, 0

            def on_epoch_begin(self, epoch, logs=None):
                self._mean, self._count = 0.0, 0

            def on_train_batch_end(self, batch, logs=None):
                mean = float(logs["loss"])
                self._count += 1
                self.losses.append(mean * self._count - self._mean * (self._count - 1))
                self._mean = mean

        return _Callback()


def train(label, settings, devices, args, initial):
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    import tf_zero
    import zoo

    strategy = tf_zero.ZeroStrategy(devices, stage=3,
                                    persistence_threshold=args.persistence_threshold,
                                    quantization_block_size=args.block_size, **settings)
    with strategy.scope():
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=zoo.LM_VOCAB, num_layers=args.layers, num_heads=4,
            hidden_dim=args.hidden, intermediate_dim=4 * args.hidden, dropout=0.0,
            max_sequence_length=64)
        model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Adam(args.lr)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if initial is None:
        initial = [w.numpy() for w in model.weights]
    else:
        model.set_weights(initial)
    batch = args.batch_per_replica * strategy.num_replicas_in_sync
    x, y = zoo.lm_data(args.steps * batch, seed=2 if label == "float32, other data" else 1)
    if label == "float32, other order":  # every global batch reversed
        order = np.arange(args.steps * batch).reshape(args.steps, batch)[:, ::-1].ravel()
        x = {k: v[order] for k, v in x.items()}
        y = y[order]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    losses = StepLosses()
    start = time.perf_counter()
    model.fit(data, epochs=args.steps // 10, steps_per_epoch=10, verbose=0,
              callbacks=[losses])
    seconds = time.perf_counter() - start
    sharded = sum(int(np.prod(w.shape)) for w in model.trainable_variables
                  if tf_zero.is_sharded(w))
    params = sum(int(np.prod(w.shape)) for w in model.trainable_variables)
    return losses.losses, seconds, initial, sharded, params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="a multiple of 10")
    parser.add_argument("--window", type=int, default=50, help="steps the final loss averages")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-per-replica", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--persistence-threshold", type=int, default=1000)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--plot", help="write the loss curves to this PNG")
    parser.add_argument("--json", help="write every step's loss to this file")
    args = parser.parse_args()
    devices = _common.configure_cpus(args.replicas)

    curves, initial = {}, None
    for label in args.settings:
        losses, seconds, initial, sharded, params = train(
            label, SETTINGS[label], devices, args, initial)
        curves[label] = losses
        print(f"  {label:<22} {len(losses)} steps in {seconds:6.1f} s", flush=True)
    final = {label: sum(c[-args.window:]) / args.window for label, c in curves.items()}
    def floor(other):
        if other in final and "float32" in final:
            return abs(final[other] - final["float32"])
        return None

    order_floor, data_floor = floor("float32, other order"), floor("float32, other data")
    print(f"\nGPT-2 ({args.layers} layers, hidden {args.hidden}, vocabulary 512, sequence 32): "
          f"{params:,} parameters, {sharded:,} sharded and gathered; stage 3, "
          f"N = {args.replicas}, {args.steps} steps of {args.batch_per_replica * args.replicas} "
          f"sequences, Adam {args.lr}; blocks of {args.block_size}")
    print(f"  {'setting':<22}{'first loss':>12}{'final loss':>12}{'- float32':>12}"
          f"{'/ data floor':>14}")
    for label, curve in curves.items():
        diff = final[label] - final.get("float32", final[label])
        rel = f"{abs(diff) / data_floor:14.2f}" if data_floor else f"{'':>14}"
        print(f"  {label:<22}{curve[0]:12.4f}{final[label]:12.4f}{diff:+12.4f}{rel}")
    print(f"  noise floors: reduction order {order_floor}, data order {data_floor}; final "
          f"loss = mean of the last {args.window} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curves, f)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for label, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), curve, label=label, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"GPT-2, stage 3, N = {args.replicas}: quantized collectives")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"  curves: {args.plot}")


if __name__ == "__main__":
    main()
