"""Starts local multi-worker jobs for tests, always stopping every worker; the
one-process runs of examples/multi_worker.py they are compared with."""

import functools
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import keras
import pytest
import tensorflow as tf
from conftest import zero_strategy

from tf_zero.launch import free_ports, worker_environments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "multi_worker.py")
sys.path.insert(0, os.path.dirname(EXAMPLE))
import multi_worker as example  # noqa: E402  (examples/multi_worker.py)


def run_workers(args, num_workers, timeout=180, env=None):
    """Runs `python args...` as `num_workers` workers; returns (codes, outputs)."""
    base = dict(os.environ, **(env or {}))
    base["PYTHONPATH"] = os.pathsep.join([REPO, base.get("PYTHONPATH", "")])
    procs = []
    try:
        for worker_env in worker_environments(num_workers, free_ports(num_workers),
                                              base_env=base):
            procs.append(subprocess.Popen(
                [sys.executable] + list(args), env=worker_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
        deadline = time.monotonic() + timeout
        outputs = []
        for p in procs:
            remaining = max(1.0, deadline - time.monotonic())
            out, _ = p.communicate(timeout=remaining)
            outputs.append(out)
        return [p.returncode for p in procs], outputs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def launch(args, timeout=300):
    """Runs the launcher; returns (status, output, worker pids)."""
    proc = subprocess.run([sys.executable, "-m", "tf_zero.launch", *args],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
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


def h5_arrays(path):
    """{"optimizer/vars/3": array, ...}: every dataset of a .weights.h5 file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays
