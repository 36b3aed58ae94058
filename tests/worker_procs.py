"""Starts local multi-worker jobs for tests, always stopping every worker."""

import os
import signal
import subprocess
import sys
import time

from tf_zero.launch import free_ports, worker_environments

HERE = os.path.dirname(os.path.abspath(__file__))


def run_workers(args, num_workers, timeout=180, env=None):
    """Runs `python args...` as `num_workers` workers; returns (codes, outputs)."""
    base = dict(os.environ, **(env or {}))
    base["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), base.get("PYTHONPATH", "")])
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
