"""A multi-worker job's clean end: the coordination service's host leaves last.

The first task of the cluster (the chief, or worker 0) hosts TensorFlow's
coordination service. When it exits while another worker still runs, that
worker's agent loses the service and logs `BaseCollectiveExecutor::StartAbort
UNAVAILABLE ... the leader task was preempted/died` although nothing failed,
and its own shutdown waits on the missing service. So the host's exit waits
(at most `DEFAULT_EXIT_WAIT` seconds) until the other workers' addresses
accept no connection, that is, until their processes are gone. It does not
wait after an uncaught exception (the others then need the error, not a
wait), nor after `os._exit` (the preemption path) or a signal. See
docs/multi-worker.md ("Logs at the end of a run").
"""

from __future__ import annotations

import atexit
import sys
import time

from tf_zero.fault.startup import _serving

DEFAULT_EXIT_WAIT = 30.0
"""Seconds the coordination service's host waits at exit for the other workers."""

_registered = False
_failed = False


def leave_last(tasks, own, wait: float = DEFAULT_EXIT_WAIT) -> bool:
    """Makes this process, if it hosts the coordination service (`tasks[0]`),
    wait at exit for the other tasks' processes to end.

    Args:
        tasks: `startup.coordinated_tasks` of the cluster.
        own: (job, index) of this worker.
        wait: the bound, in seconds.

    Returns:
        Whether this process waits (it is the host, and has other tasks).
    """
    global _registered
    if not tasks or tuple(tasks[0][:2]) != tuple(own) or len(tasks) < 2:
        return False
    if not _registered:
        _registered = True
        previous = sys.excepthook

        def excepthook(*args):
            global _failed
            _failed = True
            previous(*args)

        sys.excepthook = excepthook
        atexit.register(wait_for_others, [a for _, _, a in tasks[1:]], wait)
    return True


def wait_for_others(addresses, wait: float, poll: float = 0.2, say=None) -> list[str]:
    """Waits until none of `addresses` accepts connections, at most `wait`
    seconds (none after an uncaught exception). Returns those still serving,
    and says so."""
    if _failed:
        return []
    deadline = time.monotonic() + wait
    serving = list(addresses)
    while serving:
        serving = [a for a in serving if _serving(a, timeout=0.5)]
        if not serving or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if serving:
        (say or _say)(
            f"[tf_zero] this worker hosts the coordination service and exits while "
            f"{', '.join(serving)} still run after {wait:g}s; their logs may show "
            "TensorFlow's 'StartAbort UNAVAILABLE ... leader task ... died', which "
            "then means only that this worker has ended.")
    return serving


def _say(text):
    print(text, file=sys.stderr, flush=True)
