"""Local multi-worker launcher: `python -m tf_zero.launch --workers N script.py ...`.

Starts N worker processes of `script.py` on 127.0.0.1, each with its own
`TF_CONFIG` (free loopback ports, or `--port-base P`), streams their output
prefixed with `[worker i]`, and stops every worker as soon as one fails or
the `--timeout` expires. It exits with 0 when all workers succeed, with the
failing worker's status otherwise (124 on timeout), and never leaves a worker
process behind.

Workers die with the launcher: each asks the kernel, before it imports
TensorFlow, to SIGKILL it when the launcher exits (Linux's
`PR_SET_PDEATHSIG`), so a launcher that is itself SIGKILLed leaves no
worker training on. `--port-base` ports are checked free before any worker
starts, and a busy one is named.

SIGTERM to the launcher (what a scheduler sends before it kills a job) is
forwarded to every worker. Workers that save a backup on SIGTERM
(`tf_zero.callbacks.BackupAndRestore`) exit with status 75 once the backup
is complete; when one worker exits with 75 the launcher lets the others
finish theirs (up to `--preemption-grace` seconds) and exits with 75 too.

`--devices-per-worker K` gives each worker K logical CPU devices (when it
has no GPU) and tells `ZeroStrategy` to use them as K replicas, so 2 workers
x 2 devices train on 4 replicas on one CPU machine.

Real clusters do not need this: they set `TF_CONFIG` on every host
themselves, or pass a cluster resolver (`SlurmClusterResolver`,
`KubernetesClusterResolver`) to `ZeroStrategy(cluster_resolver=...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tf_zero.fault.coordination import DEVICES_ENV, PREEMPTED_EXIT_CODE
DEFAULT_PREEMPTION_GRACE = 60.0
LAUNCHER_PID_ENV = "TF_ZERO_LAUNCHER_PID"

# What each worker runs (`python -c`), self-contained so that nothing it does
# not need is imported (TensorFlow takes seconds). First the kernel is asked to
# SIGKILL the worker when the launcher dies (Linux; PR_SET_PDEATHSIG is 1), and
# a launcher already gone by then means the worker leaves at once; elsewhere
# the launcher's own shutdown still stops its workers, and only a SIGKILLed
# launcher leaves them running. Then, with --devices-per-worker K on a machine
# without GPUs, K logical CPU devices; then the script, as `python script`.
_WORKER_ENTRY = f"""\
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (AttributeError, OSError):
    pass
if os.getppid() != int(os.environ["{LAUNCHER_PID_ENV}"]):
    sys.exit("tf_zero.launch: the launcher exited before this worker started")
if os.environ.get("{DEVICES_ENV}"):
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * int(os.environ["{DEVICES_ENV}"]))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def busy_ports(ports) -> list[int]:
    """Those of `ports` that a socket is bound to on 127.0.0.1 (TIME_WAIT
    leftovers of earlier runs do not count: TensorFlow's server reuses them)."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def worker_environments(num_workers, ports, devices_per_worker=None, base_env=None):
    """One environment per worker with its TF_CONFIG.

    Workers also get TensorFlow's BFC CPU allocator unless the environment
    chooses one (`TF_CPU_ALLOCATOR_USE_BFC`): the default CPU allocator
    returns large buffers to the system and page-faults them back on every
    step, which dominates CPU step times (it concerns host memory only).
    """
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = []
    for i in range(num_workers):
        env = dict(os.environ if base_env is None else base_env)
        env.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        if devices_per_worker:
            env[DEVICES_ENV] = str(devices_per_worker)
        envs.append(env)
    return envs


# What TensorFlow prints when a worker's server cannot listen on its port.
_PORT_FAILURE = "Could not start gRPC server"


def _stream(prefix, pipe, sink, lock, seen=None):
    for line in iter(pipe.readline, ""):
        if seen is not None and _PORT_FAILURE in line:
            seen.add(_PORT_FAILURE)
        with lock:
            sink.write(f"{prefix} {line}")
            sink.flush()
    pipe.close()


def _signal_running(procs, signum):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)
            except ProcessLookupError:
                pass


def _stop(procs, grace=5.0):
    _signal_running(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _forward_sigterm(procs, lock, out):
    """Installs a SIGTERM handler that passes the signal on to every worker."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def forward(signum, frame):
        # The handler runs on the main thread, which may hold the lock or be
        # inside `out.write` at this moment: never wait on it for long, and a
        # reentrant write loses the message, not the signal.
        acquired = lock.acquire(timeout=0.5)
        try:
            out.write("[launch] SIGTERM received; forwarding it to every worker\n")
            out.flush()
        except RuntimeError:
            pass
        finally:
            if acquired:
                lock.release()
        _signal_running(procs, signal.SIGTERM)

    return signal.signal(signal.SIGTERM, forward)


def launch(script, args=(), *, workers, devices_per_worker=None, port_base=None,
           timeout=None, out=None, preemption_grace=DEFAULT_PREEMPTION_GRACE) -> int:
    """Runs `script` as `workers` local workers; returns the job's exit status."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if devices_per_worker is not None and devices_per_worker < 1:
        raise ValueError(f"--devices-per-worker must be at least 1, got {devices_per_worker}")
    if not os.path.exists(script):
        raise FileNotFoundError(f"no such script: {script}")
    out = out or sys.stdout
    if port_base:
        ports = list(range(port_base, port_base + workers))
        busy = busy_ports(ports)
        if busy:
            raise ValueError(
                f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} on 127.0.0.1 "
                f"{'are' if len(busy) > 1 else 'is'} in use (--port-base {port_base} gives "
                f"worker i port {port_base} + i): choose another --port-base, or leave it "
                "out to use free ports.")
    else:
        ports = free_ports(workers)
    envs = worker_environments(workers, ports, devices_per_worker)
    lock = threading.Lock()
    procs, threads, seen = [], [], []
    previous_handler = _forward_sigterm(procs, lock, out)
    try:
        for i, env in enumerate(envs):
            env[LAUNCHER_PID_ENV] = str(os.getpid())
            cmd = [sys.executable, "-c", _WORKER_ENTRY, script, *args]
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, start_new_session=True)
            procs.append(p)
            seen.append(set())
            with lock:
                out.write(f"[launch] worker {i}: pid {p.pid}, port {ports[i]}\n")
                out.flush()
            t = threading.Thread(target=_stream,
                                 args=(f"[worker {i}]", p.stdout, out, lock, seen[i]),
                                 daemon=True)
            t.start()
            threads.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        preempted_deadline = None
        while True:
            codes = [p.poll() for p in procs]
            preempted = [i for i, c in enumerate(codes) if c == PREEMPTED_EXIT_CODE]
            failed = [(i, c) for i, c in enumerate(codes)
                      if c not in (None, 0, PREEMPTED_EXIT_CODE)]
            if preempted and not failed:
                running = [i for i, c in enumerate(codes) if c is None]
                if not running:
                    with lock:
                        out.write(f"[launch] workers saved a backup on SIGTERM and exited "
                                  f"with status {PREEMPTED_EXIT_CODE}; run the same command "
                                  "again to resume\n")
                    return PREEMPTED_EXIT_CODE
                if preempted_deadline is None:
                    preempted_deadline = time.monotonic() + preemption_grace
                elif time.monotonic() > preempted_deadline:
                    with lock:
                        out.write(f"[launch] workers {running} still running "
                                  f"{preemption_grace}s after worker {preempted[0]} saved "
                                  "on SIGTERM; stopping them\n")
                    return PREEMPTED_EXIT_CODE
                time.sleep(0.1)
                continue
            if failed:
                i, code = failed[0]
                threads[i].join(timeout=2)  # its last lines, which may say why
                reason = (f" (it could not listen on 127.0.0.1:{ports[i]}: the port is in use)"
                          if _PORT_FAILURE in seen[i] else "")
                with lock:
                    out.write(f"[launch] worker {i} exited with status {code}{reason}; "
                              "stopping the other workers\n")
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                running = [i for i, c in enumerate(codes) if c is None]
                with lock:
                    out.write(f"[launch] timeout after {timeout}s; workers {running} "
                              "still running; stopping them\n")
                return 124
            time.sleep(0.1)
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=2)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tf_zero.launch",
        description="Run a training script as N local TF_CONFIG workers.")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--devices-per-worker", type=int, default=None)
    parser.add_argument("--port-base", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every worker is stopped (exit 124)")
    parser.add_argument("--preemption-grace", type=float, default=DEFAULT_PREEMPTION_GRACE,
                        help="seconds the other workers get to finish after one exits "
                             f"with {PREEMPTED_EXIT_CODE} (saved on SIGTERM)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        return launch(ns.script, ns.args, workers=ns.workers,
                      devices_per_worker=ns.devices_per_worker,
                      port_base=ns.port_base, timeout=ns.timeout,
                      preemption_grace=ns.preemption_grace)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
