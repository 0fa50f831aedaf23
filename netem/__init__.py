"""netem: a loopback TCP proxy that injects network faults and shapes the link.

Neutral test and benchmark infrastructure (no spliteasy imports): the fault proxy
(:class:`FaultProxy`), its fault kinds and schedules (:mod:`netem.faults`), the
HTTP/1.1 framing it needs (:mod:`netem.http11`), the link seam (:mod:`netem.link`:
a perfect :class:`Link` or a :class:`ShapedLink` with bandwidth, latency, jitter and
loss) and the named link profiles (:mod:`netem.profiles`: loopback, lan, wifi, lte,
tunnel).
"""

from .faults import NO_FAULTS, Fault, FaultSchedule, path_matches
from .link import Direction, Link, LinkStats, ShapedLink
from .profiles import PROFILES, LinkProfile, load_profile
from .proxy import Event, FaultProxy

__all__ = [
    "NO_FAULTS",
    "PROFILES",
    "Direction",
    "Event",
    "Fault",
    "FaultProxy",
    "FaultSchedule",
    "Link",
    "LinkProfile",
    "LinkStats",
    "ShapedLink",
    "load_profile",
    "path_matches",
]
