"""The soak: a 2-worker job killed and preempted until it completes (tests/jobs/soak_job.py).

The job trains 3 epochs of 6 batches with tf_zero's BackupAndRestore(save_freq=3),
which divides the epoch, so some backups are taken after an epoch's last
batch. Each run of the test launches it through `tf_zero.launch` with one fault
per launch, three in all: a SIGKILL at an epoch's last batch, a SIGKILL in the
middle of a backup write and a SIGTERM to the launcher; then relaunches it until
it exits 0. Every relaunch must begin at the batch latest.json names, no
worker may outlive its launch, the replayed steps are counted (none after the
SIGTERM, at most save_freq after a SIGKILL), and the final weights are those of
the uninterrupted run within 1e-6.

One schedule runs by default; SOAK_RUNS=5 runs five (seeds 0-4), each printing
its faults, replayed steps and final difference.
"""

import json
import os
import glob
import random
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
from conftest import max_weight_diff, zero_strategy
from worker_procs import example, launch

from tf_zero.callbacks import PREEMPTED_EXIT_CODE

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "jobs", "soak_job.py")
sys.path.insert(0, os.path.dirname(JOB))
import soak_job  # noqa: E402

STEPS = soak_job.STEPS
TOTAL = soak_job.EPOCHS * STEPS
SOAK_RUNS = int(os.environ.get("SOAK_RUNS", "1"))
LAUNCH_TIMEOUT = 150  # the launcher's own; the test waits a minute longer


def schedule(seed):
    """The faults of run `seed`, in order: (kind, parameters).

    Seed 0, the one CI runs: the whole job SIGKILLed after epoch 0's last batch
    (before its backup), the chief SIGKILLed halfway through writing its
    second backup of the relaunch (the one before it is an epoch end's), then
    a SIGTERM to the launcher.
    """
    if seed == 0:
        return [("last_batch", {"worker": 1, "when": "batch_end", "signal": "KILL_JOB"}),
                ("in_save", {"worker": 0, "n": 2}),
                ("term", {"worker": 1, "after": 3})]
    rng = random.Random(seed)
    faults = [("last_batch", {"worker": rng.randrange(2),
                              "when": rng.choice(["batch_begin", "batch_end"]),
                              "signal": rng.choice(["KILL", "KILL_JOB"])}),
              ("in_save", {"worker": rng.randrange(2), "n": rng.choice([1, 2])}),
              ("term", {"worker": rng.randrange(2), "after": rng.randrange(4)})]
    rng.shuffle(faults)
    return faults


def fault_argument(kind, p, resume):
    """soak_job's --fault for this fault, given the step the launch resumes at."""
    if kind == "last_batch":
        return f"{p['worker']}:{p['when']}:{resume // STEPS}:{STEPS - 1}:{p['signal']}"
    if kind == "in_save":
        n = min(p["n"], (TOTAL - resume) // soak_job.SAVE_FREQ)
        assert n >= 1, f"no backup left to interrupt after step {resume}"
        return f"{p['worker']}:save:{n}:KILL"
    step = min(resume + p["after"], TOTAL - 1)
    return f"{p['worker']}:batch_begin:{step // STEPS}:{step % STEPS}:TERM"


def expected_status(kind, p):
    if kind == "term":
        return PREEMPTED_EXIT_CODE
    if p.get("signal") == "KILL_JOB":
        return -9  # the launcher itself was killed
    return 137  # the launcher reports the killed worker


def resume_step(backup):
    """The step latest.json says the next launch resumes at (0 without one)."""
    try:
        latest = json.load(open(os.path.join(backup, "latest.json")))
    except FileNotFoundError:
        return 0
    return STEPS * latest["epoch"] + latest["batch"]


def launches(log_dir, worker):
    """Per launch of `worker`: (pid, steps begun, steps ended), from its log."""
    runs = []
    for line in open(os.path.join(log_dir, f"worker{worker}.log")):
        word, *rest = line.split()
        if word == "pid":
            runs.append((int(rest[0]), [], []))
        else:
            runs[-1][1 if word == "begin" else 2].append(STEPS * int(rest[0]) + int(rest[1]))
    return runs


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def assert_all_gone(pids, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if not gone(p)] == [], "workers outlived their launch"


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run, in this process on 2 replicas."""
    model = example.build(zero_strategy(2), example.parse_config("adam:2"))
    try:
        model.fit(soak_job.make_dataset(), epochs=soak_job.EPOCHS, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model.get_weights()


@pytest.mark.parametrize("seed", range(SOAK_RUNS))
def test_soak_killed_and_preempted_job_ends_as_the_uninterrupted_run(tmp_path, reference, seed):
    backup, log_dir, out = (str(tmp_path / d) for d in ("backup", "log", "out"))
    start = time.monotonic()
    resumes, faults, pids, seconds = [], [], [], []
    for kind, p in schedule(seed) + [(None, None)]:
        resumes.append(resume_step(backup))
        args = ["--dir", backup, "--log", log_dir]
        if kind is None:
            args += ["--out", out]
        else:
            faults.append(fault_argument(kind, p, resumes[-1]))
            args += ["--fault", faults[-1]]
        launched = time.monotonic()
        status, log, launcher_pids = launch(
            ["--workers", "2", "--timeout", str(LAUNCH_TIMEOUT), JOB, *args],
            timeout=LAUNCH_TIMEOUT + 60)
        seconds.append(round(time.monotonic() - launched))
        pids += launcher_pids
        assert_all_gone(pids)
        want = 0 if kind is None else expected_status(kind, p)
        assert status == want, f"{kind} {faults[-1:]}: status {status}\n{log[-4000:]}"

    runs = [launches(log_dir, w) for w in range(2)]
    assert sorted(pids) == sorted(r[0] for w in runs for r in w)  # one log per worker launch
    replayed = []
    for i, resume in enumerate(resumes):
        for w in range(2):
            first = runs[w][i][1][:1]
            assert first in ([resume], []), (  # [] when killed before its first batch
                f"launch {i} worker {w} began at step {first}, latest.json says {resume}")
        if i:
            done_before = max((max(r[i - 1][2], default=-1) for r in runs), default=-1) + 1
            replayed.append(max(0, done_before - resume))
    kinds = [kind for kind, _ in schedule(seed)]
    for kind, n in zip(kinds, replayed):
        assert n <= (0 if kind == "term" else soak_job.SAVE_FREQ), (kinds, replayed)
    assert runs[0][-1][2] == list(range(resumes[-1], TOTAL))  # the last launch ran to the end

    workers = [np.load(os.path.join(out, f"worker{w}.npz")) for w in range(2)]
    final = [[d[f"arr_{k}"] for k in range(len(d.files))] for d in workers]
    for a, b in zip(*final):
        np.testing.assert_array_equal(a, b)
    diff = max_weight_diff(final[0], reference)
    print(f"soak seed {seed}: faults {faults}; resumed at steps {resumes}; replayed "
          f"{replayed} = {sum(replayed)} steps; final difference {diff:.2e}; "
          f"{time.monotonic() - start:.0f}s (launches {seconds}s)")
    assert diff < 1e-6
    assert not os.path.exists(backup)  # no backup, pointer or killed save's debris left
    if TOTAL - resumes[-1] >= soak_job.SAVE_FREQ:  # the last launch saved
        scratch = [glob.glob(os.path.join(tempfile.gettempdir(), f"tf_zero_worker*-{p}-*"))
                   for p in pids]
        assert sum(scratch, []) == []  # copies of workers killed in a save removed
