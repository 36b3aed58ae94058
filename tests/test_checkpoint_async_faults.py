"""Faults in `tf_zero.Checkpoint`'s background saves across 2 workers (through
the launcher, 2 logical CPUs each): a failing write, SIGKILL and SIGTERM while
a write is in flight. The job is tests/jobs/async_save_job.py."""

import json
import os
import re

import pytest
from worker_procs import REPO, assert_all_stopped, launch

JOB = os.path.join(REPO, "tests", "jobs", "async_save_job.py")


def _run(directory, *extra, timeout=240):
    status, output, pids = launch(["--workers", "2", "--devices-per-worker", "2",
                                   "--timeout", str(timeout - 30), JOB,
                                   "--dir", str(directory), *extra], timeout=timeout)
    assert_all_stopped(pids)
    return status, output


def _lines(output, what):
    """{worker: {number or None: value}} of the job's `what` lines."""
    found = {}
    for worker, rest in re.findall(rf"\[worker (\d)\] {what} (.*)", output):
        number, _, value = rest.partition(" ")
        found.setdefault(int(worker), {})[number] = value
    return found


def _finals(output):
    """{worker: digest at the end of fit}."""
    return {int(w): d for w, d in re.findall(r"\[worker (\d)\] final (\w+)", output)}


def _indexes(directory):
    return sorted(p for p in os.listdir(directory / "ckpt") if p.endswith(".index"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: each worker's digest at every save and at the end."""
    directory = tmp_path_factory.mktemp("reference")
    status, output = _run(directory)
    assert status == 0, output
    saved, final = _lines(output, "saved"), _finals(output)
    assert sorted(saved) == [0, 1] and all(len(saved[w]) == 6 for w in saved), output
    assert sorted(final) == [0, 1], output
    assert _indexes(directory) == [f"ckpt-{k}.index" for k in range(1, 7)]
    return saved, final


def test_a_background_write_failing_on_one_worker_is_raised_on_every_worker(
        tmp_path, reference):
    saved, final = reference
    status, output = _run(tmp_path, "--fail", "1:2")
    assert status == 0, output
    raised = _lines(output, "raised")
    # Both workers raise save 2's failure at their next save: worker 1 its own
    # error, worker 0 (the chief) that another worker failed.
    assert raised[1]["2"].startswith("OSError: disk full on worker 1"), output
    assert raised[0]["2"].startswith("RuntimeError: Writing checkpoint"), output
    assert "nothing was published" in raised[0]["2"]
    assert _indexes(tmp_path) == [f"ckpt-{k}.index" for k in (1, 3, 4, 5, 6)]
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.startswith("ckpt-2")]
    assert _lines(output, "saved") == saved  # training went on unchanged
    assert _finals(output) == final


def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint(
        tmp_path, reference):
    saved, _ = reference
    status, output = _run(tmp_path, "--signal", "1:3:KILL")
    assert status != 0 and "signal KILL at save 3 in flight" in output, output
    assert _indexes(tmp_path) == ["ckpt-1.index", "ckpt-2.index"]
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.startswith("ckpt-3")]
    # The relaunch restores save 2 on both workers, each its own state as saved.
    status, output = _run(tmp_path, "--resume")
    assert status == 0, output
    restored = _lines(output, "restored")
    assert restored == {w: {"ckpt-2": saved[w]["2"]} for w in (0, 1)}, output
    assert not [p for p in os.listdir(tmp_path / "ckpt") if ".staging-" in p]  # swept


def test_sigterm_during_a_background_write_waits_for_it_and_resumes_exactly(
        tmp_path, reference):
    saved, final = reference
    status, output = _run(tmp_path, "--signal", "0:3:TERM", "--backup")
    assert status == 75 and "signal TERM at save 3 in flight" in output, output
    # The preemption finished the write in flight on both workers first.
    assert _indexes(tmp_path) == [f"ckpt-{k}.index" for k in (1, 2, 3)]
    status, output = _run(tmp_path, "--resume", "--backup")
    assert status == 0, output
    assert _lines(output, "restored") == {w: {"ckpt-3": saved[w]["3"]} for w in (0, 1)}
    # The backup taken at the preemption resumes at its step: the end is the
    # uninterrupted run's, bit for bit.
    assert _finals(output) == final


def test_sigkill_during_an_asynchronous_sharded_backup_resumes_from_the_previous_one(
        tmp_path, reference):
    """Backups written as tf_zero.Checkpoint in the background (every 2 batches,
    each before the job's own save): worker 1 is killed while backup 3 is in
    flight. latest.json still names backup 2, complete; the relaunch resumes
    there and ends as the uninterrupted run, bit for bit."""
    _, final = reference
    status, output = _run(tmp_path, "--backup", "sharded_async", "--signal", "1:5:KILL")
    assert status != 0 and "signal KILL at save 5 in flight" in output, output
    latest = json.load(open(tmp_path / "backup" / "latest.json"))
    assert (latest["epoch"], latest["batch"]) == (0, 4), latest
    assert os.path.exists(tmp_path / "backup" / (latest["weights"] + ".index"))
    status, output = _run(tmp_path, "--backup", "sharded_async")
    assert status == 0, output
    assert _finals(output) == final
    assert not os.path.exists(tmp_path / "backup")  # removed after the complete run
