"""A multi-worker start: `TF_CONFIG` read with errors that name it, and a
bound on the wait for the other workers.

TensorFlow's collective timeout (`CommunicationOptions.timeout_seconds`)
bounds collectives, not start-up: while a worker that `TF_CONFIG` names has
not started, the others wait without a word inside the strategy's
constructor, in the coordination service's barrier, for up to an hour. That
wait holds Python's global interpreter lock inside TensorFlow's C++ code, so
no exception and no Python thread of the waiting process can end it:
`StartupWatch` starts a small watchdog process instead (this file, run as a
script: it imports nothing but the standard library). Once a while has
passed it names the workers whose addresses accept no connection (not
started, or not yet serving), and when the wait exceeds its timeout it names
those that never joined and SIGKILLs the waiting worker. See
docs/multi-worker.md.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

DEFAULT_STARTUP_TIMEOUT = 600.0
"""Seconds `ZeroStrategy` waits for every worker of the cluster to start."""

COORDINATED_JOBS = ("chief", "worker")
"""The jobs whose tasks the coordination service waits for at start-up."""

_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}')


def read_tf_config(text: str | None = None) -> dict:
    """The parsed `TF_CONFIG` (default: the environment's), checked.

    Returns {} when it is unset or empty.

    Raises:
        ValueError: it is not JSON, not an object, its cluster is not a map of
            jobs to address lists, or its task is not one of the cluster's;
            the message names `TF_CONFIG`, what is wrong and an example.
    """
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    if not text.strip():
        return {}

    def refuse(what):
        shown = text if len(text) <= 300 else text[:300] + "..."
        return ValueError(f"TF_CONFIG {what}: {shown!r}. It should look like {_EXAMPLE}.")

    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise refuse(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    if not isinstance(config, dict):
        raise refuse("must be a JSON object")
    cluster = config.get("cluster") or {}
    if not isinstance(cluster, dict) or not all(
            isinstance(tasks, (list, dict)) and all(
                isinstance(a, str) for a in (tasks.values() if isinstance(tasks, dict)
                                             else tasks))
            for tasks in cluster.values()):
        raise refuse('has a "cluster" that is not a map of job names to lists of '
                     '"host:port" addresses')
    if not cluster:
        return config
    task = config.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise refuse(f'needs a "task" whose "type" is one of the cluster\'s jobs '
                     f"({', '.join(sorted(cluster))})")
    index, tasks = task.get("index", 0), cluster[task["type"]]
    known = ([int(i) for i in tasks] if isinstance(tasks, dict) else range(len(tasks)))
    if isinstance(index, bool) or not isinstance(index, int) or index not in known:
        raise refuse(f'has task index {index!r}, not one of the {len(known)} '
                     f'"{task["type"]}" tasks of its cluster')
    return config


SLURM_PORT_BASE_ENV = "TF_ZERO_PORT_BASE"
"""The first port of a SLURM step's tasks on each node (default 8888)."""


def in_slurm_step(environ=None) -> bool:
    """Whether this process is one of several tasks of a SLURM job step (`srun`)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in environ
    except ValueError:
        return False


def _gpus_on_this_node() -> int:
    """GPUs this node shows (CUDA_VISIBLE_DEVICES, else nvidia-smi; 0 without
    either), counted without initializing TensorFlow's devices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True,
                                timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def slurm_cluster_resolver(port_base: int | None = None):
    """TensorFlow's `SlurmClusterResolver` for this `srun` step, also on nodes
    without GPUs.

    Every task of the step is a worker; the tasks of a node listen on
    `port_base`, `port_base + 1`, ... (default: `TF_ZERO_PORT_BASE`, else
    8888). With GPUs, each task sees its share (TensorFlow sets
    `CUDA_VISIBLE_DEVICES`); without, TensorFlow's resolver would list no
    task at all (it pairs tasks with GPUs), so each task is given one
    placeholder GPU slot and `CUDA_VISIBLE_DEVICES` is left alone.
    """
    import tensorflow as tf  # not at module level: the watchdog runs this file

    if port_base is None:
        port_base = int(os.environ.get(SLURM_PORT_BASE_ENV, "8888"))
    gpus = _gpus_on_this_node()
    if gpus:
        return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base)
    tasks = [int(t.split("(x")[0]) for t in
             os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split(",")]
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=max(tasks), gpus_per_task=1, auto_set_gpu=False)


def coordinated_tasks(cluster: dict) -> list[tuple[str, int, str]]:
    """(job, index, address) of every task the start-up waits for, from a
    cluster spec as a dict (`ClusterSpec.as_dict()`)."""
    tasks = []
    for job in COORDINATED_JOBS:
        addresses = cluster.get(job, [])
        items = (sorted((int(i), a) for i, a in addresses.items())
                 if isinstance(addresses, dict) else enumerate(addresses))
        tasks += [(job, i, address) for i, address in items]
    return tasks


def _serving(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class StartupWatch:
    """Bounds a multi-worker start (a context manager around the wait).

    Entering starts the watchdog process; leaving (the cluster formed, or the
    wait raised) closes its input, and it exits quietly. If this process dies
    first its input closes likewise.

    Args:
        tasks: `coordinated_tasks` of the cluster.
        own: (job, index) of this worker.
        timeout: seconds before this worker is stopped; None: no bound
            (TensorFlow's own hour).
        notice_after: seconds before the workers not serving are named once.
    """

    def __init__(self, tasks, own, timeout=DEFAULT_STARTUP_TIMEOUT, notice_after=30.0):
        self._others = [(job, i, a) for job, i, a in tasks if (job, i) != tuple(own)]
        self._own = tuple(own)
        self._timeout = timeout
        self._notice_after = notice_after
        self._watchdog = None

    def __enter__(self):
        if self._others:
            self._watchdog = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), json.dumps(
                    [os.getpid(), self._own, self._others, self._timeout, self._notice_after])],
                stdin=subprocess.PIPE)
        return self

    def __exit__(self, *exc):
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
        return False


LEADER_GONE_SECONDS = 5.0
"""How long `unjoined_message` gives the coordination service's host to stop
accepting connections before it lists who accepts none."""


def unjoined_message(tasks, own, error) -> str:
    """What a worker says when its wait for the cluster ended in an error
    (TensorFlow raises one when the coordination service's host, the first
    task of `tasks`, stops while the others wait): the error, and the tasks
    whose addresses accept no connection now."""
    own = tuple(own)
    others = [(job, i, a) for job, i, a in tasks if (job, i) != own]
    # The error says the service's host went away; its process may still be
    # closing its sockets for a moment (SIGKILL of a large process under load).
    deadline = time.monotonic() + LEADER_GONE_SECONDS
    while others and tasks[0][:2] != own and _serving(tasks[0][2], timeout=0.2) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    absent = [f"{job} {i} ({a})" for job, i, a in others if not _serving(a)]
    leader = f"{tasks[0][0]} {tasks[0][1]} ({tasks[0][2]})" if tasks else "the first task"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{own[0]} {own[1]} stopped waiting for the cluster (TF_CONFIG or the cluster "
            f"resolver) to form: {type(error).__name__}: {first_line}. "
            + (f"These accept no connection now: {', '.join(absent)}. " if absent else "")
            + f"{leader} hosts TensorFlow's coordination service; when it stops (its own "
            "start-up timeout, or a failure), every waiting worker stops too. Start every "
            "worker the cluster names, each with the same cluster, or raise "
            "ZeroStrategy(startup_timeout=...).")


def watch(others, own, timeout, notice_after, done, say, stop, probe_every=2.0) -> None:
    """The watchdog's logic: names the `others` not serving after
    `notice_after` seconds, and after `timeout` names those that never joined
    and calls `stop()`, unless `done(seconds)` returns True first (it waits up
    to `seconds` for the start to end). Addresses are probed every
    `probe_every` seconds, so that a worker that served and then died (the
    first to give up) is not said never to have joined."""
    own_name = f"{own[0]} {own[1]}"
    seen = set()

    def serving_now():
        now = {i for i, (_, _, address) in enumerate(others) if _serving(address)}
        seen.update(now)
        return now

    def named(indices):
        return ", ".join(f"{others[i][0]} {others[i][1]} ({others[i][2]})"
                         for i in sorted(indices))

    start = time.monotonic()
    noticed = timeout is not None and timeout <= notice_after
    while True:
        elapsed = time.monotonic() - start
        if timeout is not None and elapsed >= timeout:
            break
        next_stop = min(notice_after if not noticed else float("inf"),
                        timeout if timeout is not None else float("inf"))
        if done(max(0.0, min(probe_every, next_stop - elapsed))):
            return
        serving = serving_now()
        if not noticed and time.monotonic() - start >= notice_after:
            noticed = True
            missing = set(range(len(others))) - serving
            if missing and not done(0):
                bound = (f"; it stops {timeout:g}s after start-up began "
                         "(ZeroStrategy(startup_timeout=...))" if timeout is not None else "")
                say(f"{own_name} has waited {notice_after:g}s for workers that have not "
                    f"started: {named(missing)}{bound}.")
    serving = serving_now()
    if done(0):
        return  # the cluster formed while the addresses were probed
    never = set(range(len(others))) - seen
    gone = seen - serving
    say(f"{own_name} waited {timeout:g}s for every worker of the cluster (TF_CONFIG or the "
        "cluster resolver) to start; "
        + (f"these never joined: {named(never)}. " if never else "")
        + (f"These stopped after they started: {named(gone)}. " if gone else "")
        + ("" if never or gone else
           "every address accepts connections, but the cluster did not form (a worker may "
           "have restarted, or the workers were given different clusters). ")
        + "Start every worker the cluster names, each with the same cluster, or raise "
        "ZeroStrategy(startup_timeout=...). Stopping this worker (SIGKILL): TensorFlow's "
        "wait cannot be interrupted.")
    stop()


def _watchdog_main(argument: str) -> None:
    parent, own, others, timeout, notice_after = json.loads(argument)

    def done(seconds):
        # The parent closes our input when its start ends, or when it dies.
        return bool(select.select([sys.stdin], [], [], seconds)[0])

    def say(text):
        sys.stderr.write(f"tf_zero: {text}\n")
        sys.stderr.flush()

    def stop():
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watch(others, own, timeout, notice_after, done, say, stop)


if __name__ == "__main__":
    _watchdog_main(sys.argv[1])
