"""TensorFlow graph internals: the body of a function that a graph's op calls."""

from __future__ import annotations

from tensorflow.python.framework import function_def_to_graph as _function_def_to_graph


def function_graph(graph, name: str, *fallbacks):
    """The graph of library function `name`, called from an op of `graph`.

    A function traced in this process (a `tf.function`, a `tf.cond` branch,
    a `tf.while_loop` body, a custom gradient) keeps the Python graph it was
    traced into, with every static shape TensorFlow inferred then. A
    function known only by its `FunctionDef` (a graph imported from a
    `GraphDef`) is rebuilt from the definition, its shapes inferred again.
    `fallbacks` are further graphs whose libraries may hold `name` (the
    outermost graph holds every function of a trace).

    Returns:
        The function's graph, or None if no graph knows `name`.
    """
    for g in (graph, *fallbacks):
        function = g._get_function(name)
        if function is None:
            continue
        traced = getattr(function, "graph", None)
        if traced is not None:
            return traced
        definition = getattr(function, "definition", None)
        if definition is not None:
            return _function_def_to_graph.function_def_to_graph(definition)
    return None


def defines_function(graph, name: str, *fallbacks) -> bool:
    """Whether `graph` (or a fallback graph) has library function `name`."""
    return any(g._get_function(name) is not None for g in (graph, *fallbacks))
