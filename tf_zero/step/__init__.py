"""The sharded step's links, in data order: read `chain.py` first.

`chain.py` calls `gradients.py` (flatten, reduce-scatter), `accumulation.py`
(k-step windows), `statistics.py` (unscale, statistics, clip), `update.py`
(the inner update and the publish) and `loss_scale.py` (overflow agreement).
See docs/architecture.md, "One step".
"""
