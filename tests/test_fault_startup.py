"""A multi-worker start: a worker that never starts is named within the
start-up timeout instead of a silent hour; a malformed `TF_CONFIG` is named."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from worker_procs import REPO

import tf_zero
from tf_zero.fault import startup
from tf_zero.launch import free_ports, worker_environments

WORKER = """\
import tf_zero
tf_zero.ZeroStrategy(startup_timeout=float({timeout}))
print("strategy created", flush=True)
"""


def test_workers_name_the_one_that_never_started(tmp_path):
    """TF_CONFIG names 3 workers; 2 start. Both stop within worker 0's start-up
    timeout, naming worker 2 and its address (TensorFlow alone waits an hour,
    whatever the collective timeout): worker 0, which hosts the coordination
    service, is stopped by its watchdog; worker 1, whose own timeout is longer,
    and which waits before worker 0 starts, gets TensorFlow's error when worker
    0 goes and raises one that names who is missing."""
    ports = free_ports(3)
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    environments = worker_environments(3, ports, base_env=base)
    procs = [None, None]
    try:
        start = time.monotonic()
        # Worker 1 starts first and waits for the cluster; then worker 0.
        for i, timeout in ((1, 120), (0, 6)):
            script = tmp_path / f"worker{i}.py"
            script.write_text(WORKER.format(timeout=timeout))
            procs[i] = subprocess.Popen(
                [sys.executable, str(script)], env=environments[i], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True)
            while i == 1 and not startup._serving(f"127.0.0.1:{ports[1]}"):
                assert procs[1].poll() is None and time.monotonic() - start < 90
                time.sleep(0.2)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL, 1], outputs
    assert "worker 0 waited 6s for every worker" in outputs[0]
    assert f"these never joined: worker 2 (127.0.0.1:{ports[2]})." in outputs[0]
    assert ("RuntimeError: worker 1 stopped waiting for the cluster (TF_CONFIG or the cluster "
            "resolver) to form: UnavailableError" in outputs[1]), outputs[1]
    assert (f"These accept no connection now: worker 0 (127.0.0.1:{ports[0]}), "
            f"worker 2 (127.0.0.1:{ports[2]})." in outputs[1])
    assert "hosts TensorFlow's coordination service" in outputs[1]
    assert all("strategy created" not in out for out in outputs)
    assert elapsed < 90  # TensorFlow's import and server start, then 6 s


def test_the_watch_names_workers_not_serving_and_stays_quiet_when_all_join():
    with socket.socket() as serving:
        serving.bind(("127.0.0.1", 0))
        serving.listen()
        present = f"127.0.0.1:{serving.getsockname()[1]}"
        absent = f"127.0.0.1:{free_ports(1)[0]}"
        tasks = startup.coordinated_tasks(
            {"chief": ["127.0.0.1:1"], "worker": [present, absent], "ps": ["127.0.0.1:2"]})
        assert [t[:2] for t in tasks] == [("chief", 0), ("worker", 0), ("worker", 1)]
        said, stops = [], []
        never = threading.Event()
        startup.watch(tasks[2:], ("worker", 0), 0.6, 0.2, never.wait, said.append,
                      lambda: stops.append(1))
        assert stops == [1] and len(said) == 2
        assert said[0] == (f"worker 0 has waited 0.2s for workers that have not started: "
                           f"worker 1 ({absent}); it stops 0.6s after start-up began "
                           "(ZeroStrategy(startup_timeout=...)).")
        assert f"these never joined: worker 1 ({absent})." in said[1]
        said, stops = [], []
        startup.watch(tasks[1:2], ("worker", 1), 0.6, 0.2, never.wait, said.append,
                      lambda: stops.append(1))
        assert stops == [1] and len(said) == 1  # no notice: every address serves
        assert "every address accepts connections" in said[0]
        formed = threading.Event()
        formed.set()
        said, stops = [], []
        startup.watch(tasks[2:], ("worker", 0), 0.6, 0.2, formed.wait, said.append,
                      lambda: stops.append(1))
        assert not said and not stops


@pytest.mark.parametrize("tf_config, match", [
    ("{'cluster': {}}", "TF_CONFIG is not valid JSON"),
    ('["127.0.0.1:1"]', "TF_CONFIG must be a JSON object"),
    ('{"cluster": {"worker": "127.0.0.1:1"}}', 'TF_CONFIG has a "cluster" that is not a map'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}',
     r'TF_CONFIG needs a "task" whose "type" is one of the cluster\'s jobs \(worker\)'),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
     '"task": {"type": "worker", "index": 2}}',
     'TF_CONFIG has task index 2, not one of the 2 "worker" tasks'),
])
def test_a_malformed_tf_config_is_named(monkeypatch, tf_config, match):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=match) as raised:
        tf_zero.ZeroStrategy()
    assert "It should look like" in str(raised.value)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}}))
    assert startup.read_tf_config() == {"cluster": {}}
