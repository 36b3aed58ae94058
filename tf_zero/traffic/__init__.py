"""Communication accounting: read `report.py` for `collective_traffic`.

`traced_ops.py` finds every collective op and device copy of a traced step
(function bodies, cond branches and while loops included); `report.py`
charges each the bytes a replica sends, inside its worker and across
workers. See docs/benchmarks.md.
"""

from tf_zero.traffic.report import (
    KINDS, ZERO_SCOPES, CollectiveTraffic, TrafficReport, collective_traffic, name_scope,
    sent_bytes)

__all__ = ["KINDS", "ZERO_SCOPES", "CollectiveTraffic", "TrafficReport", "collective_traffic",
           "name_scope", "sent_bytes"]
