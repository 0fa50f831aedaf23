"""netem: a loopback TCP proxy that injects network faults into HTTP/1.1 exchanges.

Neutral test infrastructure (no spliteasy imports): the fault proxy
(:class:`FaultProxy`), its fault kinds and schedules (:mod:`netem.faults`), the
HTTP/1.1 framing it needs (:mod:`netem.http11`) and the link seam where bandwidth and
latency shaping will go (:mod:`netem.link`).
"""

from .faults import NO_FAULTS, Fault, FaultSchedule, path_matches
from .link import Direction, Link
from .proxy import Event, FaultProxy

__all__ = [
    "NO_FAULTS",
    "Direction",
    "Event",
    "Fault",
    "FaultProxy",
    "FaultSchedule",
    "Link",
    "path_matches",
]
