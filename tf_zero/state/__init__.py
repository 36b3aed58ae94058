"""What the sharded step reads, built once: read `shards.py` first.

`build.py` is the one build path (`build_state`, called by
`ZeroOptimizer.build`); `shards.py` the element split's state record,
`owners.py` and `runs.py` the whole-variable partition's; `partition.py`
decides who updates which variable, `admission.py` what is accepted. See
docs/architecture.md, "Before the first step".
"""
