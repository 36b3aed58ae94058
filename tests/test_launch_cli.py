"""`python -m tf_zero.launch`: TF_CONFIG per worker, prefixed output, every
worker stopped on failure and timeout and when the launcher is SIGKILLed,
busy ports named, argument errors."""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from worker_procs import REPO, assert_all_stopped, launch


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


def test_the_coordination_host_leaves_last_so_no_worker_logs_an_error(tmp_path):
    """Worker 1 works 4 s longer than worker 0 after a fit. Worker 0, which
    hosts TensorFlow's coordination service, waits for it at exit: worker 1
    logs no 'StartAbort UNAVAILABLE ... leader task ... died'."""
    script = _script(tmp_path, """\
import json, os, time
import keras, numpy as np, tensorflow as tf
import tf_zero
strategy = tf_zero.ZeroStrategy(stage=2)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(tf_zero.ZeroOptimizer(keras.optimizers.Adam()), "mse")
x = np.ones((16, 4), "float32")
model.fit(tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8), epochs=1, verbose=0)
if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1:
    time.sleep(4)
print("done", flush=True)
""")
    status, out, pids = launch(["--workers", "2", "--devices-per-worker", "2",
                                "--timeout", "200", script], timeout=260)
    assert status == 0, out[-3000:]
    assert "[worker 0] done" in out and "[worker 1] done" in out
    assert "StartAbort" not in out and "UNAVAILABLE" not in out, out[-3000:]
    assert_all_stopped(pids)


def test_the_host_waits_for_the_others_at_most_its_bound():
    from tf_zero.fault import shutdown
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen()
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in (a, b)]
        said = []
        threading.Timer(0.5, a.close).start()
        start = time.monotonic()
        assert shutdown.wait_for_others(addresses, 1.5, say=said.append) == addresses[1:]
        assert 1.5 <= time.monotonic() - start < 5
        assert len(said) == 1 and addresses[1] in said[0] and addresses[0] not in said[0]
        b.close()
        said = []
        assert shutdown.wait_for_others(addresses, 30, say=said.append) == [] and not said
    assert shutdown.leave_last([("worker", 0, "h:1"), ("worker", 1, "h:2")], ("worker", 1)) \
        is False  # only the host waits


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


def _alive(pid):
    """Whether `pid` runs (a zombie left for its new parent to reap does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_with_a_sigkilled_launcher(tmp_path):
    """A SIGKILLed launcher cannot stop its workers itself: the kernel does."""
    script = _script(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "tf_zero.launch", "--workers", "2",
                                 script], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    pids, ready, out = [], set(), ""
    try:
        deadline = time.monotonic() + 120
        while len(ready) < 2 and time.monotonic() < deadline:
            if select.select([launcher.stdout], [], [], 1)[0]:
                line = launcher.stdout.readline()
                out += line
                pids += [int(p) for p in re.findall(r"\[launch\] worker \d+: pid (\d+)", line)]
                ready |= set(re.findall(r"\[worker (\d+)\] ready", line))
        assert len(ready) == 2 and len(pids) == 2, out
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), f"workers outlived the launcher: {pids}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)  # each worker leads a session


def test_a_busy_port_is_named_before_any_worker_starts(tmp_path):
    script = _script(tmp_path, "print('started')\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, pids = launch(["--workers", "2", "--port-base", str(port - 1), script])
    assert status == 2 and f"port {port} on 127.0.0.1 is in use" in out
    assert "--port-base" in out and "started" not in out and not pids


def test_a_worker_that_cannot_listen_names_its_port(tmp_path):
    # What TensorFlow prints when a port was taken after the launcher chose it.
    script = _script(tmp_path, "import sys\n"
                     "print('UNKNOWN: Could not start gRPC server', flush=True)\nsys.exit(1)\n")
    status, out, pids = launch(["--workers", "1", script])
    port = re.search(r"worker 0: pid \d+, port (\d+)", out).group(1)
    assert status == 1
    assert f"worker 0 exited with status 1 (it could not listen on 127.0.0.1:{port}" in out
    assert_all_stopped(pids)
