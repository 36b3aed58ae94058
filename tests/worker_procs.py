"""Starts local multi-worker jobs for tests, always stopping every worker."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_ports(count):
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def run_workers(args, num_workers, timeout=180, env=None):
    """Runs `python args...` as `num_workers` workers; returns (codes, outputs)."""
    ports = free_ports(num_workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(num_workers):
            worker_env = dict(os.environ, **(env or {}))
            worker_env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}})
            worker_env["PYTHONPATH"] = os.pathsep.join(
                [os.path.dirname(HERE), worker_env.get("PYTHONPATH", "")])
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
