"""Multi-worker runs: the launcher, parity with one process, a killed worker."""

import functools
import os
import re
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import zero_strategy
from worker_procs import run_workers

import tf_zero

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "multi_worker.py")
sys.path.insert(0, os.path.dirname(EXAMPLE))
import multi_worker as example  # noqa: E402  (examples/multi_worker.py)

# Lamb, Adafactor and Muon: the whole-variable partition (each variable's
# state on one replica, half of them on the other worker).
CONFIGS = ["sgd:1", "sgd:2", "adam:1", "adam:2", "adam:2:2", "adam:1:1:f16",
           "lamb:2", "adafactor:1", "muon:2:2"]
# Also saved at the end (--save); Muon's biases (its AdamW) are spread in runs
# over the replicas of both workers.
SAVED = ["lamb:2", "adafactor:1", "muon:2:2"]
# Element split: every slot in pieces on both workers' replicas; saved also as a
# tf_zero.Checkpoint, each worker writing its own slices.
SLICED = ["adam:1", "adam:2"]


def launch(args, timeout=300):
    """Runs the launcher; returns (status, output, worker pids)."""
    proc = subprocess.run([sys.executable, "-m", "tf_zero.launch", *args],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(HERE))
    pids = [int(p) for p in re.findall(r"\[launch\] worker \d+: pid (\d+)", proc.stdout)]
    return proc.returncode, proc.stdout + proc.stderr, pids


def assert_all_stopped(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def one_process_model(config, epochs, n=4, restore=None):
    """The same training in this process: 1 worker x `n` replicas.

    `restore`: a `.weights.h5` file or a `tf.train.Checkpoint` prefix to
    start from.
    """
    model = example.build(zero_strategy(n), example.parse_config(config))
    try:
        if restore is not None and restore.endswith(".weights.h5"):
            model.load_weights(restore)
        elif restore is not None:
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
                restore).assert_existing_objects_matched()
        model.fit(example.make_dataset(), epochs=epochs, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


@functools.lru_cache(maxsize=None)
def one_process(config, epochs):
    return one_process_model(config, epochs).get_weights()


def load(out, config, worker):
    data = np.load(os.path.join(out, f"{config.replace(':', '_')}.worker{worker}.npz"))
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def h5_arrays(path):
    """{"optimizer/vars/3": array, ...}: every dataset of a .weights.h5 file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One 2 workers x 2 logical CPUs run of CONFIGS (one launch: ~60 s of start-up)."""
    out = tmp_path_factory.mktemp("two_workers")
    start = time.monotonic()
    status, log, pids = launch(["--workers", "2", "--devices-per-worker", "2", "--timeout", "400",
                                EXAMPLE, "--epochs", "2", "--out", str(out / "out"),
                                "--save", str(out / "saved"), "--save-configs", *SAVED, *SLICED,
                                "--configs", *CONFIGS], timeout=450)
    assert status == 0, log[-4000:]
    assert "[worker 1] worker 1: 4 replicas in sync" in log
    assert_all_stopped(pids)
    print(f"2x2 multi-worker run of {len(CONFIGS)} configs: {time.monotonic() - start:.1f}s")
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_two_workers_match_one_process(two_workers, config):
    """2 workers x 2 logical CPUs reach one process's weights (4 replicas)."""
    w0, w1 = load(two_workers / "out", config, 0), load(two_workers / "out", config, 1)
    reference = one_process(config, epochs=2)
    for a, b, ref in zip(w0, w1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, atol=1e-6, err_msg=config)


@pytest.mark.parametrize("config", SAVED)
def test_whole_partition_saves_every_slot_across_workers(two_workers, config, tmp_path):
    """Each worker owns half the slots; the file holds all, as one process saves them."""
    name = config.replace(":", "_")
    saved = h5_arrays(two_workers / "saved" / f"{name}.weights.h5")
    one_process_model(config, epochs=2).save_weights(str(tmp_path / "ref.weights.h5"))
    reference = h5_arrays(tmp_path / "ref.weights.h5")
    assert sorted(saved) == sorted(reference)
    assert sum(k.startswith("optimizer/vars/") for k in saved) > 2  # step, rate and slots
    for key, ref in reference.items():
        np.testing.assert_allclose(saved[key], ref, atol=1e-6, err_msg=key)


RESUMES = [("lamb:2", 4, "ckpt"), ("lamb:2", 2, "weights.h5"),
           ("adafactor:1", 2, "ckpt"), ("adafactor:1", 4, "weights.h5"),
           ("muon:2:2", 3, "ckpt")]


@pytest.mark.parametrize("config, n, kind", RESUMES)
def test_whole_partition_resumes_in_one_process(two_workers, config, n, kind):
    """Saved on 2 workers after 2 epochs, one more epoch here == 3 uninterrupted."""
    name = config.replace(":", "_")
    saved = two_workers / "saved" / (f"{name}/ckpt" if kind == "ckpt" else f"{name}.{kind}")
    model = one_process_model(config, epochs=1, n=n, restore=str(saved))
    steps = 3 * 4 // example.parse_config(config)["accumulation"]
    assert int(model.optimizer.iterations.numpy()) == steps
    for got, ref in zip(model.get_weights(), one_process(config, epochs=3)):
        np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{config} at {n}")


SLICED_RESUMES = [("adam:2", 1), ("adam:2", 3), ("adam:1", 2), ("lamb:2", 4)]


@pytest.mark.parametrize("config, n", SLICED_RESUMES)
def test_parallel_sharded_checkpoint_resumes_in_one_process(two_workers, config, n):
    """tf_zero.Checkpoint on 2 workers: each wrote its own slices (a data file
    each, merged by the chief); restored here by tf.train.Checkpoint at
    another replica count, one more epoch == 3 uninterrupted epochs."""
    prefix = two_workers / "saved" / config.replace(":", "_") / "sharded"
    data = sorted(p.name for p in prefix.parent.iterdir() if p.name.startswith("sharded.data"))
    staging = [p.name for p in prefix.parent.iterdir() if ".staging-" in p.name]
    assert not staging  # removed after the publish
    if config.startswith("adam"):
        # The chief's graph part, each worker's slices (one chunk each), the manifest.
        assert data == [f"sharded.data-0000{i}-of-00004" for i in range(4)], data
    tf_zero.checkpoint.check(str(prefix))  # sizes and hashes as recorded
    model = one_process_model(config, epochs=1, n=n, restore=str(prefix))
    assert int(model.optimizer.iterations.numpy()) == 3 * 4
    for got, ref in zip(model.get_weights(), one_process(config, epochs=3)):
        np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{config} at {n}")


def test_stage3_two_workers_match_one_process(tmp_path):
    """Sharded weights across 2 workers x 2 logical CPUs == stage 2 in one process."""
    configs = ["adam:3", "sgd:3:2"]
    status, out, pids = launch(["--workers", "2", "--devices-per-worker", "2", "--timeout", "280",
                                EXAMPLE, "--epochs", "2", "--out", str(tmp_path),
                                "--save", str(tmp_path / "saved"), "--save-configs", "adam:3",
                                "--strategy-stage", "3", "--configs", *configs])
    assert status == 0, out[-4000:]
    assert_all_stopped(pids)
    for config in configs:
        w0, w1 = load(tmp_path, config, 0), load(tmp_path, config, 1)
        reference = one_process(config.replace(":3", ":2", 1), epochs=2)
        for a, b, ref in zip(w0, w1, reference):
            np.testing.assert_array_equal(a, b)  # both workers save the full weights
            np.testing.assert_allclose(a, ref, atol=1e-6, err_msg=config)
    # The stage-3 state written by both workers (tf_zero.Checkpoint) resumes at
    # stage 2 on 3 replicas: one more epoch == 3 uninterrupted epochs.
    model = one_process_model("adam:2", epochs=1, n=3,
                              restore=str(tmp_path / "saved" / "adam_3" / "sharded"))
    for got, ref in zip(model.get_weights(), one_process("adam:2", epochs=3)):
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_killed_worker_resumes_from_backup(tmp_path):
    backup, out = tmp_path / "backup", tmp_path / "out"
    common = ["--workers", "2", "--devices-per-worker", "2", "--timeout", "200", EXAMPLE,
              "--epochs", "3", "--configs", "adam:2", "--backup", str(backup)]
    status, log, pids = launch(common + ["--crash-worker", "1", "--crash-epoch", "2"])
    assert status == 137, log[-3000:]  # SIGKILL
    assert "worker 1 exited with status -9" in log
    assert_all_stopped(pids)
    saved = sorted(os.listdir(backup / "adam_2"))
    assert saved == ["backup-000002-000000.weights.h5", "latest.json"]  # nothing half-written

    status, log, pids = launch(common + ["--out", str(out)])
    assert status == 0, log[-3000:]
    assert_all_stopped(pids)
    reference = one_process("adam:2", epochs=3)
    for a, ref in zip(load(out, "adam:2", 0), reference):
        np.testing.assert_allclose(a, ref, atol=1e-6)
    assert not os.path.exists(backup / "adam_2")  # removed after success


def test_dead_peer_becomes_an_error_within_the_timeout():
    """Without the launcher, a dead worker turns into a collective timeout."""
    start = time.monotonic()
    codes, outs = run_workers([EXAMPLE, "--crash-worker", "1", "--crash-epoch", "1",
                               "--timeout", "10", "--epochs", "3"], 2, timeout=150,
                              env={"TF_ZERO_DEVICES_PER_WORKER": "1"})
    assert codes[1] == -9
    # The collective timeout (DeadlineExceededError) or, if it fires first,
    # TensorFlow's peer health check (UnavailableError / CancelledError).
    assert codes[0] != 0
    assert re.search(r"(DeadlineExceeded|Unavailable|Cancelled|Aborted)Error", outs[0])
    assert "Collective" in outs[0] or "collective" in outs[0]
    assert time.monotonic() - start < 120


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(body)
    return str(path)


def test_launcher_sets_tf_config_and_prefixes_output(tmp_path):
    script = _script(tmp_path, "import json, os\n"
                     "c = json.loads(os.environ['TF_CONFIG'])\n"
                     "print('task', c['task']['index'], 'of', len(c['cluster']['worker']),"
                     " os.environ['TF_ZERO_DEVICES_PER_WORKER'])\n")
    status, out, pids = launch(["--workers", "3", "--devices-per-worker", "2", script])
    assert status == 0
    for i in range(3):
        assert f"[worker {i}] task {i} of 3 2" in out
    assert_all_stopped(pids)


def test_launcher_stops_everyone_when_one_worker_fails(tmp_path):
    script = _script(tmp_path, "import json, os, sys, time\n"
                     "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1:\n"
                     "    sys.exit(3)\n"
                     "time.sleep(600)\n")
    start = time.monotonic()
    status, out, pids = launch(["--workers", "2", script])
    assert status == 3
    assert "worker 1 exited with status 3" in out
    assert time.monotonic() - start < 30
    assert_all_stopped(pids)


def test_launcher_timeout(tmp_path):
    script = _script(tmp_path, "import time\ntime.sleep(600)\n")
    status, out, pids = launch(["--workers", "2", "--timeout", "2", script])
    assert status == 124 and "timeout" in out
    assert_all_stopped(pids)


@pytest.mark.parametrize("args, match", [
    (["--workers", "0", "x.py"], "at least 1"),
    (["--workers", "2", "does_not_exist.py"], "no such script"),
])
def test_launcher_bad_arguments(args, match):
    status, out, _ = launch(args)
    assert status == 2 and match in out


def test_workers_get_the_bfc_cpu_allocator_unless_chosen():
    from tf_zero.launch import worker_environments

    envs = worker_environments(2, [1, 2], base_env={"PATH": "/bin"})
    assert [e["TF_CPU_ALLOCATOR_USE_BFC"] for e in envs] == ["true", "true"]
    chosen = worker_environments(1, [1], base_env={"TF_CPU_ALLOCATOR_USE_BFC": "false"})
    assert chosen[0]["TF_CPU_ALLOCATOR_USE_BFC"] == "false"
