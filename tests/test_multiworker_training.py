"""Multi-worker runs (2 workers x 2 devices through the launcher): parity with
one process, checkpoints across workers, a killed worker, a dead peer."""

import os
import re
import time

import numpy as np
import pytest
from worker_procs import (EXAMPLE, assert_all_stopped, example, h5_arrays, launch, one_process,
                          one_process_model, run_workers)

import tf_zero



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


def load(out, config, worker):
    data = np.load(os.path.join(out, f"{config.replace(':', '_')}.worker{worker}.npz"))
    return [data[f"arr_{i}"] for i in range(len(data.files))]


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
    # Saves gather each bucket's slots once, in a function traced once; an
    # eager gather per slot and variable retraced at every save (seconds each).
    assert "compute_gathered_values" not in log, log[-4000:]
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


@pytest.mark.parametrize("config", SAVED + SLICED)
def test_saves_every_slot_across_workers(two_workers, config, tmp_path):
    """The file holds every slot, as one process saves them: whole partition,
    each worker owning half the slots; element split, every slot in pieces on
    both workers' replicas."""
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
