"""Hybrid sharding (`shard_group_size=K`): state sharded over groups of K
replicas and replicated across the groups trains as full sharding does."""

import keras
import numpy as np
import pytest
from conftest import assert_replicas_identical, max_weight_diff, mlp, regression_data, zero_strategy

import tf_zero

N = 4


def _compiled(strategy, make, steps=1):
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=tf_zero.ZeroOptimizer(make(), accumulation_steps=steps),
                      loss="mse")
    return model


def _fit(model):
    x, y = regression_data()
    model.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0)
    return model


ADAM = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
ADAMW_CLIPPED = lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05, global_clipnorm=0.1)  # noqa: E731
LAMB_CLIPPED = lambda: keras.optimizers.Lamb(0.01, global_clipnorm=0.1)  # noqa: E731
MUON = lambda: keras.optimizers.Muon(0.01, adam_lr_ratio=0.5)  # noqa: E731


@pytest.mark.parametrize("stage, k, make, steps", [
    pytest.param(3, 2, ADAMW_CLIPPED, 1, id="stage3-K2-adamw-clipped"),
    pytest.param(3, 2, ADAM, 2, id="stage3-K2-adam-accumulation"),
    pytest.param(1, 2, ADAM, 1, id="stage1-K2-adam"),
    pytest.param(2, 2, ADAMW_CLIPPED, 1, id="stage2-K2-adamw-clipped"),
    pytest.param(2, 1, ADAM, 1, id="stage2-K1-adam"),
    pytest.param(1, 2, ADAM, 2, id="stage1-K2-adam-accumulation"),
    pytest.param(2, 2, ADAM, 2, id="stage2-K2-adam-accumulation"),
])
def test_hybrid_trains_as_full_sharding(stage, k, make, steps):
    """Reduce-scatter inside the group, all-reduce of the shard across the
    groups, statistics and publish inside the group: the weights match full
    sharding over all 4 replicas (the sums run in another order: within
    1e-6), every replica holds the same weights, and each holds 1/K of the
    slots."""
    sharded = dict(persistence_threshold=0) if stage == 3 else {}  # every weight
    hybrid = _compiled(zero_strategy(N, stage=stage, shard_group_size=k, **sharded), make, steps)
    full = _compiled(zero_strategy(N, stage=stage, **sharded), make, steps)
    _fit(hybrid)
    _fit(full)
    plan = hybrid.optimizer.plan
    assert plan.num_shards == k
    if stage == 3:  # a bucket per weight, each 1/K of it on every replica
        assert all(tf_zero.is_sharded(w) for w in hybrid.trainable_weights)
        assert [b.shard_size for b in plan.buckets] == [
            -(-int(np.prod(w.shape)) // k) for w in hybrid.trainable_weights]
    else:
        (bucket,) = plan.buckets
        assert bucket.shard_size == -(-87 // k)
    assert max_weight_diff(hybrid.get_weights(), full.get_weights()) < 1e-6
    assert_replicas_identical(hybrid)


@pytest.mark.parametrize("stage, make, steps", [
    pytest.param(2, LAMB_CLIPPED, 1, id="stage2-lamb-clipped"),
    pytest.param(1, LAMB_CLIPPED, 2, id="stage1-lamb-clipped-accumulation"),
    pytest.param(2, MUON, 1, id="stage2-muon-split-vectors"),
])
def test_hybrid_whole_variable_partition_trains_as_full_sharding(stage, make, steps):
    """The whole-variable partition under hybrid sharding (K = 2 of 4):
    each variable is owned whole by one replica of each group (Muon's
    vectors poured in runs over the group), its gradient reduce-scattered
    inside the group and all-reduced across; the weights match full
    sharding over 4 replicas within 1e-6, every replica holds the same
    weights, and both groups hold the same state, each half of it."""
    hybrid = _compiled(zero_strategy(N, stage=stage, shard_group_size=2), make, steps)
    full = _compiled(zero_strategy(N, stage=stage), make, steps)
    _fit(hybrid)
    _fit(full)
    assert max_weight_diff(hybrid.get_weights(), full.get_weights()) < 1e-6
    assert_replicas_identical(hybrid)
    shards = hybrid.optimizer.shards
    plan = shards.plan
    assert plan.partition == tf_zero.Partition.WHOLE and plan.num_shards == 2
    owners = shards.owners
    assert sorted(owners) == [0, 1, 2, 3]
    for rank in (0, 1):  # replica r and r + 2 own the same variables, with equal state
        mine, twin = owners[rank], owners[rank + 2]
        assert sorted(mine.views) == sorted(twin.views)
        assert sorted(mine.runs) == sorted(twin.runs)
        for i in mine.views:
            for a, b in zip(mine.slots(i), twin.slots(i)):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert sorted(set(owners[0].views) | set(owners[1].views)) == sorted(
        i for i in range(len(shards.variables)) if not plan.is_split(i))
    report = tf_zero.memory_report(hybrid.optimizer).replicas
    full_report = tf_zero.memory_report(full.optimizer).replicas
    assert sum(r.slots for r in report) == 2 * sum(r.slots for r in full_report)


def test_hybrid_refusals_name_the_fix():
    with pytest.raises(ValueError, match="must divide the 4 replicas"):
        tf_zero.ZeroStrategy([f"/cpu:{i}" for i in range(N)], shard_group_size=3)
    with pytest.raises(ValueError, match=r"resolved by ZeroStrategy.*ZeroStrategy\(shard_group"):
        tf_zero.ZeroConfig(stage=2, shard_group_size="worker")
    # One worker: its devices are every replica (full sharding, named as such).
    assert tf_zero.ZeroStrategy([f"/cpu:{i}" for i in range(N)], shard_group_size="worker"
                                ).zero_config.shard_group_size == N
    strategy = zero_strategy(N, stage=2, shard_group_size=2, quantized_gradients="int8")
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=tf_zero.ZeroOptimizer(keras.optimizers.Lamb(0.01)), loss="mse")
    with pytest.raises(ValueError, match="quantized_gradients=None"):
        _fit(model)


@pytest.mark.parametrize("writer, stage, make", [
    ("tf.train.Checkpoint", 2, ADAM), ("tf_zero.Checkpoint", 2, ADAM),
    ("tf_zero.Checkpoint", 3, ADAM), ("tf.train.Checkpoint", 2, LAMB_CLIPPED),
    ("tf_zero.Checkpoint", 1, LAMB_CLIPPED)])
def test_hybrid_checkpoint_restores_into_full_sharding_and_into_every_group(
        tmp_path, writer, stage, make):
    """One group's pieces are saved (the others hold the same); restored
    into full sharding, into both groups of a fresh hybrid run, or into
    hybrid sharding at another replica count (2 groups of 1), the next epoch
    continues as the uninterrupted hybrid run; so does a checkpoint of full
    sharding at 2 replicas restored into hybrid sharding at 4. At stage 3 the
    weights themselves are 1/K shards; under Lamb each group's owner of a
    variable holds its slots whole."""
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint if writer == "tf.train.Checkpoint" else tf_zero.Checkpoint

    x, y = regression_data()
    sharded = dict(persistence_threshold=0) if stage == 3 else {}
    hybrid = zero_strategy(N, stage=stage, shard_group_size=2, **sharded)

    def epochs(model, first, last):
        model.fit(x, y, batch_size=24, epochs=last, initial_epoch=first, shuffle=False,
                  verbose=0)
        return model

    def save(strategy, name):
        model = epochs(_compiled(strategy, make), 0, 1)
        return checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / name))

    reference = epochs(_compiled(hybrid, make), 0, 2)
    from_hybrid = save(hybrid, "hybrid")
    from_full = save(zero_strategy(2, stage=stage, **sharded), "full")
    for prefix, strategy in (
            (from_hybrid, zero_strategy(N, stage=stage, **sharded)),
            (from_hybrid, hybrid),
            (from_hybrid, zero_strategy(2, stage=stage, shard_group_size=1, **sharded)),
            (from_full, hybrid)):
        resumed = _compiled(strategy, make)
        resumed.optimizer.build(resumed.trainable_variables)
        checkpoint(model=resumed, optimizer=resumed.optimizer).restore(prefix)
        epochs(resumed, 1, 2)
        assert max_weight_diff(resumed.get_weights(), reference.get_weights()) < 1e-6, (
            prefix, strategy.num_replicas_in_sync, strategy.zero_config.shard_group_size)
        assert_replicas_identical(resumed)


SLURM_WORKER = """\
import os, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tf_zero
{prelude}
strategy = tf_zero.ZeroStrategy(stage={stage}, shard_group_size="worker", startup_timeout=120,
                                persistence_threshold=0{settings})
assert strategy.zero_config.shard_group_size == 2
assert strategy.num_replicas_in_sync == 4, strategy.num_replicas_in_sync
sys.path.insert(0, {support!r})
from slurm_model import slurm_data, slurm_model
model = slurm_model(strategy, {optimizer!r})
x, y = slurm_data({data})
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=2, verbose=0)
scale = getattr(model.optimizer, "dynamic_scale", None)
np.savez(os.path.join({out!r}, "worker%s.npz" % os.environ["SLURM_PROCID"]),
         *model.get_weights(), iterations=model.optimizer.iterations.numpy(),
         scale=np.nan if scale is None else scale.numpy())
# Every worker writes its shards (one group's copy); Keras' file is published once.
prefix = tf_zero.Checkpoint(model=model, optimizer=model.optimizer).write(
    os.path.join({out!r}, "ckpt", "hybrid"))
model.save_weights(os.path.join({out!r}, "hybrid.weights.h5"))
# Restored across the same 2 workers, each worker's replicas hold what they
# held, including the group whose pieces the other worker saved.
restored = slurm_model(strategy, {optimizer!r})
restored.optimizer.build(restored.trainable_variables)
tf_zero.Checkpoint(model=restored, optimizer=restored.optimizer).read(prefix).assert_consumed()


def local_state(m):
    from tf_zero import _private
    optimizer = m.optimizer
    while not hasattr(optimizer, "shards"):  # a LossScaleOptimizer around it
        optimizer = optimizer.inner_optimizer
    shards = optimizer.shards
    stored = [v for b, v in zip(shards.plan.buckets, shards.storage) if shards.is_stored(b)]
    state = [c.numpy() for v in [*stored, *(s for b in shards.slots for s in b)]
             for c in _private.components(v)]
    for rank, owned in sorted(shards.owners.items()):
        state += [s.numpy() for i in sorted(owned.slot_lists) for s in owned.slot_lists[i]]
        state += [s.numpy() for i in sorted(owned.runs) for s in owned.runs[i].slots]
    return state


mine, theirs = local_state(restored), local_state(model)
assert len(mine) == len(theirs) > 0
for a, b in zip(mine, theirs):
    np.testing.assert_array_equal(a, b)
for a, b in zip(restored.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)
print("trained", os.environ["SLURM_PROCID"], flush=True)
"""


SLURM_RESUMING_WORKER = """\
import os, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tf_zero
strategy = tf_zero.ZeroStrategy(stage={stage}, shard_group_size="worker", startup_timeout=120,
                                persistence_threshold=0)
sys.path.insert(0, {support!r})
from slurm_model import slurm_data, slurm_model
x, y = slurm_data()
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
backup_dir = os.path.join({out!r}, "backup")


class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 5:
            raise RuntimeError("interrupted at step 5")


model = slurm_model(strategy)
try:
    model.fit(data, epochs=2, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir, save_freq=3), Interrupt()])
    raise AssertionError("not interrupted")
except RuntimeError as error:
    assert "step 5" in str(error), error
# A fresh model resumes from the backup of step 3 and trains to the end.
model = slurm_model(strategy)
model.fit(data, epochs=2, verbose=0,
          callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq=3)])
np.savez(os.path.join({out!r}, "worker%s.npz" % os.environ["SLURM_PROCID"]),
         *model.get_weights(), iterations=model.optimizer.iterations.numpy(), scale=np.nan)
model.save(os.path.join({out!r}, "hybrid.keras"))
print("trained", os.environ["SLURM_PROCID"], flush=True)
"""


def _slurm_job(tmp_path, stage, settings="", prelude="", data="", with_state=False,
               template=SLURM_WORKER, optimizer="adamw"):
    """Runs SLURM_WORKER as 2 tasks of a SLURM step (ZeroStrategy keywords
    `settings` added, `prelude` run before the strategy is made, `data` the
    arguments of `slurm_data`, `optimizer` that of `slurm_model`); returns each worker's weights after training
    (with `with_state`, also each worker's (iterations, loss scale))."""
    import os
    import signal
    import subprocess
    import sys

    from worker_procs import REPO

    from tf_zero.launch import busy_ports, free_ports

    for base in free_ports(8):
        if not busy_ports([base, base + 1]):
            break
    script = tmp_path / "worker.py"
    script.write_text(template.format(support=os.path.join(os.path.dirname(__file__), "support"),
                                         out=str(tmp_path), stage=stage, settings=settings,
                                         prelude=prelude, data=data, optimizer=optimizer))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]),
               SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_ID="4242", SLURM_STEP_ID="0",
               TF_ZERO_PORT_BASE=str(base), TF_ZERO_DEVICES_PER_WORKER="2")
    procs = []
    try:
        for rank in (0, 1):
            procs.append(subprocess.Popen(
                [sys.executable, str(script)], env=dict(env, SLURM_PROCID=str(rank),
                                                        SLURM_LOCALID=str(rank)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    workers = [np.load(tmp_path / f"worker{r}.npz") for r in (0, 1)]
    weights = [[w[f"arr_{i}"] for i in range(len(w.files) - 2)] for w in workers]
    if with_state:
        return weights, [(int(w["iterations"]), float(w["scale"])) for w in workers]
    return weights


@pytest.mark.parametrize("stage, optimizer", [(2, "adamw"), (3, "adamw"), (2, "lamb")])
def test_a_slurm_step_of_two_tasks_trains_hybrid_as_one_process(tmp_path, stage, optimizer):
    """`srun -n 2` on one node, as SLURM sets the environment (no TF_CONFIG,
    no GPU, no scontrol): ZeroStrategy finds the cluster itself, and hybrid
    sharding (a shard group per worker: the all-reduce of gradient shards is
    the only state traffic across workers; at stage 3 every weight a 1/2
    shard gathered inside the worker; Lamb's variables each owned whole by
    one replica of each worker) reaches one process's full sharding over 4
    replicas within 1e-6; its checkpoints resume in one process."""
    from slurm_model import slurm_data, slurm_model
    from worker_procs import h5_arrays

    workers = _slurm_job(tmp_path, stage, optimizer=optimizer)
    reference = slurm_model(zero_strategy(N, stage=stage, persistence_threshold=0), optimizer)
    x, y = slurm_data()
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b, ref in zip(*workers, reference.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, atol=1e-6)
    # Keras' file holds every slot, as one process saves them.
    reference.save_weights(str(tmp_path / "reference.weights.h5"))
    saved, expected = h5_arrays(tmp_path / "hybrid.weights.h5"), h5_arrays(
        tmp_path / "reference.weights.h5")
    assert sorted(saved) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(saved[key], expected[key], atol=1e-6, err_msg=key)
    # The sharded checkpoint resumes in one process at another replica count (2)
    # and stage 2 with full sharding: one more epoch as the reference's.
    resumed = slurm_model(zero_strategy(2, stage=2), optimizer)
    resumed.optimizer.build(resumed.trainable_variables)
    tf_zero.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
        str(tmp_path / "ckpt" / "hybrid"))  # checked both ways by tf_zero.Checkpoint
    for got, want in zip(resumed.get_weights(), workers[0]):
        np.testing.assert_array_equal(got, want)
    for model in (resumed, reference):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-6)


QUANTIZED = dict(quantized_weights="int8", quantized_gradients="int8",
                 quantization_block_size=64)


def test_a_slurm_step_trains_with_quantized_collectives_as_one_process(tmp_path):
    """Stage 3, a shard group per worker, int8 weight gathers inside the
    worker and the int8 gradient all-reduce across the two processes: both
    workers end with the same weights as one process with the same settings
    (the quantized bytes are the same wherever they travel), and not with
    full precision's."""
    from slurm_model import slurm_data, slurm_model

    settings = "".join(f", {k}={v!r}" for k, v in QUANTIZED.items())
    workers = _slurm_job(tmp_path, 3, settings)
    x, y = slurm_data()
    # The job's dataset hands each worker every other quarter of a global
    # batch of 16 (worker 0: examples 0-3 and 8-11); the quantized sums
    # depend on which replica holds which examples, so one process is given
    # the same: replicas 1 and 2 swap quarters.
    order = np.concatenate([np.r_[0:4, 8:12, 4:8, 12:16] + 16 * k for k in range(len(x) // 16)])
    x, y = x[order], y[order]
    reference = slurm_model(zero_strategy(N, stage=3, persistence_threshold=0,
                                          shard_group_size=2, **QUANTIZED))
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    full = slurm_model(zero_strategy(N, stage=3, persistence_threshold=0, shard_group_size=2))
    full.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b, ref, exact in zip(*workers, reference.get_weights(), full.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, atol=1e-6)
    assert max_weight_diff(workers[0], full.get_weights()) > 1e-5  # it did quantize


def test_a_slurm_step_at_stage1_under_mixed_float16_skips_one_workers_overflow_everywhere(
        tmp_path, policy):
    """Stage 1, a shard group per worker, mixed_float16 with AdamW and
    global-norm clipping: one example of worker 1's part of the second
    batch overflows float16. Both workers skip that step (in each of the
    two epochs) and halve the loss scale, as one process with 4 replicas and full sharding does, and end
    with its weights within 1e-6."""
    from slurm_model import slurm_data, slurm_model

    poison = "poison=21"  # batch 1, example 5: worker 1's quarter (examples 4-7)
    workers, states = _slurm_job(
        tmp_path, 1, prelude='keras.mixed_precision.set_global_policy("mixed_float16")',
        data=poison, with_state=True)
    policy("mixed_float16")
    x, y = slurm_data(poison=21)
    order = np.concatenate([np.r_[0:4, 8:12, 4:8, 12:16] + 16 * k for k in range(len(x) // 16)])
    reference = slurm_model(zero_strategy(N, stage=1))
    reference.fit(x[order], y[order], batch_size=16, epochs=2, shuffle=False, verbose=0)
    steps = 2 * len(x) // 16
    expected = (int(reference.optimizer.iterations.numpy()),
                float(reference.optimizer.dynamic_scale.numpy()))
    # The poisoned batch, once per epoch, was skipped and halved the scale.
    assert expected == (steps - 2, reference.optimizer.initial_scale / 4), expected
    assert states == [expected, expected]
    for a, b, ref in zip(*workers, reference.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_slurm_step_resumes_from_keras_backup_and_saves_a_keras_file(tmp_path, stage):
    """Keras' own BackupAndRestore(save_freq=3) across 2 workers under hybrid
    sharding: the fit is interrupted at step 5, a fresh model resumes from
    the backup of step 3 and ends as one process with full sharding that was
    never interrupted (within 1e-6), iterations included; the `.keras` file
    the 2 workers save loads in one process with the same weights and its
    optimizer state, and trains on as the reference does."""
    from slurm_model import slurm_data, slurm_model

    workers, states = _slurm_job(tmp_path, stage, with_state=True,
                                 template=SLURM_RESUMING_WORKER)
    x, y = slurm_data()
    reference = slurm_model(zero_strategy(N, stage=stage, persistence_threshold=0))
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert [s[0] for s in states] == [2 * len(x) // 16] * 2
    for a, b, ref in zip(*workers, reference.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, atol=1e-6)
    loaded = keras.models.load_model(str(tmp_path / "hybrid.keras"))
    for got, want in zip(loaded.get_weights(), workers[0]):
        np.testing.assert_array_equal(got, want)
    assert int(loaded.optimizer.iterations.numpy()) == 2 * len(x) // 16
    for model in (loaded, reference):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(loaded.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_memory_per_replica_is_the_group_share():
    """memory_report (summed from the replicas' components) holds 1/K of the
    slots and weight shards per replica, as estimate_memory(shard_group_size=K)
    says; K = 1 is data parallelism's full state."""
    slots, shards = {}, {}
    for k in (None, 2, 1):
        model = _compiled(zero_strategy(N, stage=2, shard_group_size=k), ADAM)
        model.optimizer.build(model.trainable_variables)
        device = tf_zero.memory_report(model.optimizer).replicas[0]
        slots[k], shards[k] = device.slots, device.weight_shards
    # The MLP's 87 parameters, padded to a multiple of the group; Adam's 2 slots.
    for k, group in ((None, N), (2, 2), (1, 1)):
        assert slots[k] == 2 * 4 * -(-87 // group) and shards[k] == 4 * -(-87 // group)
    for k in (None, 2, 1):
        ours = tf_zero.estimate_memory(1e6, N, 2, shard_group_size=k)
        assert ours.optimizer_states == tf_zero.estimate_memory(1e6, k or N, 2).optimizer_states
    with pytest.raises(ValueError, match="must divide num_replicas=4"):
        tf_zero.estimate_memory(1e6, N, 2, shard_group_size=3)


@pytest.mark.parametrize("stage", [2, 3])
def test_working_copies_under_hybrid_match_float32_weights_bit_for_bit(policy, stage):
    """mixed_bfloat16 under hybrid sharding: 16-bit working copies published
    (stage 2), or shards gathered (stage 3), inside the group of 2, from
    float32 master shards, train as Keras' float32 weights cast at each use
    under the same hybrid sharding: bit for bit."""
    policy("mixed_bfloat16")
    runs = {}
    for param_dtype in ("compute", "float32"):
        strategy = zero_strategy(N, stage=stage, shard_group_size=2, param_dtype=param_dtype,
                                 persistence_threshold=0)
        runs[param_dtype] = _fit(_compiled(strategy, ADAM))
    working = runs["compute"]
    if stage == 2:
        assert all(tf_zero.has_working_copy(w) for w in working.trainable_weights)
    assert max_weight_diff(working.get_weights(), runs["float32"].get_weights()) == 0.0
    assert_replicas_identical(working)


def test_stage3_hybrid_gathers_stay_inside_the_group():
    """Read from the traced step, 2 workers x 2 replicas, a shard group per
    worker: stage 3's gathers and reduce-scatters stay inside the worker;
    only the all-reduce of each 1/K gradient shard crosses, 2 (Psi_B/K)(W-1)/W
    bytes per replica per step (Psi_B: the float32 gradient's bytes)."""
    strategy = zero_strategy(N, stage=3, shard_group_size=2, persistence_threshold=0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256),
                                  keras.layers.Dense(10)])
        model.compile(tf_zero.ZeroOptimizer(keras.optimizers.Adam()), "mse")
    x = np.random.default_rng(0).random((16, 64)).astype("float32")
    y = np.zeros((16, 10), "float32")
    report = tf_zero.collective_traffic(model, x, y, batch_size=16, workers=2)
    psi_bytes = 4 * model.count_params()
    assert report.across_bytes_per_replica == 2 * (psi_bytes // 2) * (2 - 1) // 2
    assert report.select(scope="zero_gather").across_bytes_per_replica == 0
    assert report.select(kind="all_gather").across_bytes_per_replica == 0
    assert report.select(kind="all_to_all").across_bytes_per_replica == 0
    assert report.select(kind="all_gather").bytes_per_replica == psi_bytes  # 2 gathers, Psi_B/2
