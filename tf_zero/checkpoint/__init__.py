"""Checkpoints of sharded state: read `parallel.py` for `tf_zero.Checkpoint`.

`faces.py` makes sharded state save and restore as unsharded tensors,
`optimizer_state.py` orders a `ZeroOptimizer`'s state as the plain
optimizer's, `slices.py` turns a flat run into checkpoint slices,
`consolidate.py` and `__main__.py` are `python -m tf_zero.checkpoint`.
See docs/checkpoints.md.
"""

from tf_zero.checkpoint.consolidate import consolidate, load_model_factory
from tf_zero.checkpoint.parallel import CHUNK_BYTES, MANIFEST_KEY, Checkpoint, check

__all__ = ["CHUNK_BYTES", "Checkpoint", "MANIFEST_KEY", "check", "consolidate",
           "load_model_factory"]
