"""The order of stage 3's gathers: a window of `prefetch_depth` layers.

TensorFlow launches every gather as early as it can, so without an order the
peak would hold every gathered weight at once. In the forward pass the gather
of a layer waits for the input of the layer `prefetch_depth - 1` calls
earlier (`enter_layer`); inside a layer call the gathers wait for what
`pending` set (the window's tensor, or in the backward pass's recompute the
layer's output gradient). One window per thread and traced graph.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import tensorflow as tf


class _GatherWindow(threading.local):
    """Per-thread chain of layer inputs that orders the gathers of one trace."""

    def __init__(self):
        self.graph = None
        self.inputs = collections.deque()
        self.pending = []


_window = _GatherWindow()


def enter_layer(x, depth: int) -> list:
    """Records a layer's input `x`; returns what the layer's gathers wait for."""
    graph = tf.compat.v1.get_default_graph()
    if graph is not _window.graph:
        _window.graph, _window.inputs = graph, collections.deque()
    _window.inputs.append(x)
    while len(_window.inputs) > depth:
        _window.inputs.popleft()
    # Wait for the input of the layer depth - 1 calls back.
    return [_window.inputs[0]]


@contextlib.contextmanager
def pending(deps):
    """Makes the gathers of the enclosed layer call wait for `deps`."""
    saved = _window.pending
    _window.pending = deps
    try:
        yield
    finally:
        _window.pending = saved


def dependencies() -> list:
    """What a gather made now waits for (set by the enclosing `pending`)."""
    return list(_window.pending)
