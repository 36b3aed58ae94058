"""Keras' own saving paths and SIGTERM in 2-worker x 2-device jobs (tests/jobs/fault_job.py).

Every multi-worker run here is compared with one process training on 4
replicas (`test_launch.one_process`), within 1e-6.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import max_weight_diff, zero_strategy
from worker_procs import EXAMPLE, assert_all_stopped, launch, one_process

import tf_zero
from tf_zero.callbacks import PREEMPTED_EXIT_CODE
from tf_zero.fault.coordination import TERMINATED_EXIT_CODE

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "jobs", "fault_job.py")
TWO_BY_TWO = ["--workers", "2", "--devices-per-worker", "2", "--timeout", "240"]


def job(*args):
    return TWO_BY_TWO + [JOB, *args]


def final_weights(out):
    workers = []
    for i in range(2):
        data = np.load(os.path.join(out, f"worker{i}.npz"))
        workers.append([data[f"arr_{k}"] for k in range(len(data.files))])
    for a, b in zip(*workers):
        np.testing.assert_array_equal(a, b)
    return workers[0]


def batches_trained(log, worker=0):
    return re.findall(rf"\[worker {worker}\] worker {worker}: batch (\d+:\d+)", log)


def seconds_since_signal(log):
    """Seconds from the job's signal to now (the launcher has just returned)."""
    sent = float(re.search(r"signal SIG\w+ sent at ([\d.]+)", log).group(1))
    return time.time() - sent


def published(log, worker):
    return json.loads(re.search(rf"worker {worker}: published (\[.*\])", log).group(1))


@pytest.fixture(scope="module")
def reference():
    return one_process("adam:2", epochs=3)


def test_keras_backup_and_restore_survives_a_killed_worker(tmp_path, reference):
    """The issue's scenario: Keras' BackupAndRestore, worker 1 SIGKILLed as epoch 3 begins.

    Before tf_zero published saves, both workers wrote latest.weights.h5: HDF5's
    lock failed on one, and the other was left mid-gather with a file holding
    2 optimizer variables, which the relaunch could not restore.
    """
    backup, out = str(tmp_path / "backup"), str(tmp_path / "out")
    status, log, pids = launch(job("--save", "keras_backup", "--dir", backup,
                                   "--kill", "1:2:0:KILL"))
    assert status == 137, log[-3000:]
    assert_all_stopped(pids)
    assert sorted(os.listdir(backup)) == ["backup-000002-000000.weights.h5", "latest.json"]
    status, log, pids = launch(job("--save", "keras_backup", "--dir", backup, "--out", out))
    assert status == 0, log[-3000:]
    assert_all_stopped(pids)
    assert batches_trained(log)[0] == "2:0" and len(batches_trained(log)) == 4
    assert published(log, 1) == []  # only the chief writes
    assert len(published(log, 0)) == 2  # epoch 3's backup and its pointer
    assert max_weight_diff(final_weights(out), reference) < 1e-6
    assert not os.path.exists(backup)


def test_sigterm_to_one_worker_saves_mid_epoch_and_resumes_there(tmp_path, reference):
    backup, out = str(tmp_path / "backup"), str(tmp_path / "out")
    start = time.monotonic()
    status, log, pids = launch(job("--save", "zero_backup", "--dir", backup,
                                   "--kill", "1:1:1:TERM"))
    to_exit = seconds_since_signal(log)
    assert status == PREEMPTED_EXIT_CODE, log[-3000:]
    assert_all_stopped(pids)
    seconds = re.search(r"([\d.]+)s after this worker's SIGTERM", log).group(1)
    print(f"SIGTERM run {time.monotonic() - start:.1f}s; signal to saved backup {seconds}s, "
          f"to the launcher's exit {to_exit:.1f}s")
    # Worker 1 saw SIGTERM during batch 1:1; peers may already be in batch 1:2,
    # so every worker saves after it: 3 batches of epoch 1 done.
    latest = json.load(open(os.path.join(backup, "latest.json")))
    assert (latest["epoch"], latest["batch"]) == (1, 3)
    assert batches_trained(log)[-1] == "1:2"
    assert log.count("preempted; saved a backup at epoch 1 after 3 batches") == 2
    status, log, pids = launch(job("--save", "zero_backup", "--dir", backup, "--out", out))
    assert status == 0, log[-3000:]
    assert batches_trained(log) == ["1:3", "2:0", "2:1", "2:2", "2:3"]  # none replayed
    assert max_weight_diff(final_weights(out), reference) < 1e-6


def test_sigterm_to_the_launcher_with_keras_backup_resumes_exactly(tmp_path, reference):
    """A scheduler's SIGTERM to the launcher, Keras' own BackupAndRestore in fit.

    Every worker gets the signal (the launcher forwards it); the first to
    announce a step wins, all save it, the relaunch trains the rest.
    """
    backup, out = str(tmp_path / "backup"), str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "tf_zero.launch", *job(
        "--save", "keras_backup", "--dir", backup, "--pause", "0.3")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.path.dirname(HERE))
    lines = []
    try:
        while "[worker 1] worker 1: batch 1:1" not in (lines[-1] if lines else ""):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)[-3000:]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = "".join(lines) + rest
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    print(f"SIGTERM to the launcher: exit {seconds:.1f}s later")
    assert_all_stopped([int(p) for p in re.findall(r"worker \d+: pid (\d+)", log)])
    latest = json.load(open(os.path.join(backup, "latest.json")))
    done = 4 * latest["epoch"] + latest["batch"]
    assert latest["epoch"] == 1 and latest["batch"] >= 2  # mid-epoch, after the signal
    status, log, pids = launch(job("--save", "keras_backup", "--dir", backup, "--out", out))
    assert status == 0, log[-3000:]
    trained = batches_trained(log)
    assert trained[0] == f"{done // 4}:{done % 4}" and len(trained) == 12 - done
    assert max_weight_diff(final_weights(out), reference) < 1e-6


def test_model_checkpoint_and_model_save_publish_once(tmp_path, reference):
    """ModelCheckpoint (.weights.h5, .keras, save_best_only) and model.save on every worker.

    A killed worker at epoch 3; the relaunch continues from the .keras file
    (keras.models.load_model) and saves the final model with model.save and
    model.save_weights on both workers. Every file loads at another replica
    count with the weights of one process's run.
    """
    d, out = str(tmp_path / "d"), str(tmp_path / "out")
    kinds = "checkpoint_h5,checkpoint_keras,checkpoint_best"
    status, log, pids = launch(job("--save", kinds, "--dir", d, "--kill", "1:2:0:KILL"))
    assert status == 137, log[-3000:]
    assert_all_stopped(pids)
    for kind, suffix in [("checkpoint_h5", ".weights.h5"), ("checkpoint_keras", ".keras"),
                         ("checkpoint_best", ".weights.h5")]:
        assert sorted(os.listdir(os.path.join(d, kind))) == [f"e1{suffix}", f"e2{suffix}"]
    status, log, pids = launch(job("--resume", "checkpoint_keras", "--save", "none", "--dir", d,
                                   "--user-save", "--out", out))
    assert status == 0, log[-3000:]
    assert "continuing from e2.keras" in log and batches_trained(log)[0] == "2:0"
    assert published(log, 1) == [] and len(published(log, 0)) == 2
    assert max_weight_diff(final_weights(out), reference) < 1e-6
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no temporary file left

    epoch2 = one_process("adam:2", epochs=2)
    strategy = zero_strategy(2)
    for path in ["checkpoint_h5/e2.weights.h5", "checkpoint_best/e2.weights.h5"]:
        model = _example_model(strategy)
        model.load_weights(os.path.join(d, path))
        assert max_weight_diff(model.get_weights(), epoch2) < 1e-6, path
        assert int(model.optimizer.iterations.numpy()) == 8
    with strategy.scope():
        final = keras.models.load_model(os.path.join(d, "final.keras"))
    assert max_weight_diff(final.get_weights(), reference) < 1e-6
    model = _example_model(strategy)
    model.load_weights(os.path.join(d, "final.weights.h5"))
    assert max_weight_diff(model.get_weights(), reference) < 1e-6


def _example_model(strategy):
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    import multi_worker as example

    model = example.build(strategy, example.parse_config("adam:2"))
    model.optimizer.build(model.trainable_variables)
    return model


def test_sigterm_without_backup_ends_the_job_promptly(tmp_path):
    """No backup callback: SIGTERM ends the worker at once and says nothing was saved.

    The same job first tries the legacy .h5 format, which is refused (model.save
    and ModelCheckpoint at fit start) before anything is trained.
    """
    status, log, pids = launch(job("--save", "none", "--dir", str(tmp_path), "--try-legacy-h5",
                                   "--kill", "1:1:0:TERM"))
    to_exit = seconds_since_signal(log)
    assert status == TERMINATED_EXIT_CODE, log[-3000:]
    assert_all_stopped(pids)
    print(f"SIGTERM without a backup: signal to the launcher's exit {to_exit:.1f}s")
    assert to_exit < 30
    assert "worker 1: SIGTERM received; no backup callback" in log
    assert "so nothing was saved" in log
    assert "1:1" not in batches_trained(log, worker=1)  # it stopped in that batch
    assert log.count("refused: Cannot save") == 2 and log.count("refused: ModelCheckpoint") == 2
    assert log.count("steps trained: 0") == 2
    assert not os.listdir(tmp_path)


def test_launcher_forwards_sigterm_and_waits_for_the_backup(tmp_path):
    """SIGTERM to the launcher reaches every worker; exit 75 once all have saved."""
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, signal, sys, time\n"
        "task = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "def saved(signum, frame):\n"
        "    time.sleep(0.5 * task)  # the chief finishes last\n"
        # os.write: SIGTERM may arrive while print('ready') is still flushing,
        # and a print inside the handler would then be a reentrant call.
        "    os.write(1, b'saved on SIGTERM\\n')\n"
        "    sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, saved)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "tf_zero.launch", "--workers", "2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=os.path.dirname(HERE))
    try:
        lines = []
        while sum("ready" in line for line in lines) < 2:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)  # the launcher ended before its workers started
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == PREEMPTED_EXIT_CODE, log
    assert "forwarding it to every worker" in log
    assert "[worker 0] saved on SIGTERM" in log and "[worker 1] saved on SIGTERM" in log
    assert time.monotonic() - start < 10
    assert_all_stopped([int(p) for p in re.findall(r"worker \d+: pid (\d+)", log)])


# README.md, then the pages it links, in the order it lists them: a later
# block uses what an earlier one made (`model`, `strategy`).
DOC_FILES = ("README.md", "docs/semantics.md", "docs/mixed-precision.md",
             "docs/accumulation.md", "docs/multi-worker.md", "docs/stage3.md",
             "docs/models.md", "docs/finetune-preset.md", "docs/whole-variable.md",
             "docs/checkpoints.md",
             "docs/architecture.md",
             "docs/benchmarks.md", "docs/limits.md", "docs/hybrid-sharding-design.md",
             "docs/quantized-collectives.md", "docs/compat.md",
             "docs/tests.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The Python blocks of README and docs/ run in order, as a reader would paste them.

    The reader's own `make_model`, `x`, `y`, `ds`, `list_of_strings` and a
    preset directory `./my_gpt2` (a tiny GPT-2 made offline) are supplied, and
    the strategies they create are the test process's shared ones (4 logical
    CPUs).
    """
    import presets
    import tensorflow as tf

    root = os.path.dirname(HERE)
    pages = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    assert sorted(DOC_FILES[1:]) == pages  # no page is left out
    listed = open(os.path.join(root, "README.md")).read().split("\n## Documentation\n")[1]
    assert re.findall(r"\]\((docs/[^)]+\.md)\)", listed) == list(DOC_FILES[1:])
    blocks = []
    for name in DOC_FILES:
        text = open(os.path.join(root, name)).read()
        blocks += [(name, b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    assert len(blocks) >= 5
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = np.zeros((32, 3), "float32")

    def make_model():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])

    namespace = {"make_model": make_model, "x": x, "y": y, "__name__": "readme",
                 "ds": tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
                 "_zero2": zero_strategy(4), "_zero3": zero_strategy(4, stage=3)}
    monkeypatch.chdir(tmp_path)
    presets.make_gpt2_preset(str(tmp_path / "my_gpt2"), layers=1, heads=2, hidden=16,
                             intermediate=32, sequence_length=16, merges=32)
    namespace["list_of_strings"] = ["def f(x):", "    return x + 1", "import os", "print(f(2))"] * 4
    for name, block in blocks:
        code = block.replace("tf_zero.ZeroStrategy(stage=2)", "_zero2")
        code = code.replace("tf_zero.ZeroStrategy(stage=3)", "_zero3")
        try:
            exec(compile(code, name, "exec"), namespace)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert isinstance(namespace["backup"], tf_zero.callbacks.BackupAndRestore)
    assert int(namespace["model"].optimizer.iterations.numpy()) == 12
    assert not os.path.exists(tmp_path / "backup")  # deleted after the complete run
    assert os.path.exists(tmp_path / "my_gpt2_tuned" / "model.weights.h5")
