"""Named link profiles: bandwidth each way, latency, jitter and loss of a device's link.

A profile says how a :class:`netem.link.ShapedLink` delays the bytes it relays. The
named ones (``PROFILES``) are typical figures, not measurements of any one network:

=========  ==========  ============  =========  ==========  ======  ===========================
name       up Mbit/s   down Mbit/s   one-way    jitter      loss    what it stands for
=========  ==========  ============  =========  ==========  ======  ===========================
loopback   unlimited   unlimited     0 ms       0 ms        0       no shaping (relay cost only)
lan        1000        1000          0.25 ms    0.05 ms     0       wired gigabit Ethernet
wifi       50          100           3 ms       2 ms        5e-4    good 802.11ac to a LAN server
lte        10          30            25 ms      10 ms       1e-3    a phone on 4G to a cloud server
tunnel     20          20            40 ms      3 ms        0       a VPN / SSH tunnel over the internet
=========  ==========  ============  =========  ==========  ======  ===========================

"up" is device -> server. ``latency_ms`` is one way (a round trip costs twice it);
``jitter_ms`` is an extra one-way delay drawn uniformly from [0, jitter_ms] for each
message (never negative, so the configured latency is a floor); ``loss`` is the
probability that one TCP segment (``SEGMENT_BYTES``) is lost, which on a real link costs
TCP a retransmission timeout (``RTO_MIN_MS`` + a round trip) and the segment's bytes again.

A profile can also come from a JSON file with the same fields (``load_profile(path)``),
and any field can be overridden (``with_overrides``). Pure Python, no spliteasy imports.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

SEGMENT_BYTES = 1448  # TCP payload of a 1500-byte Ethernet frame with timestamps
RTO_MIN_MS = 200.0  # Linux's minimum retransmission timeout


@dataclass(frozen=True)
class LinkProfile:
    """One link's shape. ``None`` bandwidth means unlimited."""

    name: str
    up_mbps: float | None
    down_mbps: float | None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    about: str = ""

    def __post_init__(self) -> None:
        for f in ("up_mbps", "down_mbps"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"link profile {self.name!r}: {f} must be > 0 or null, got {v!r}")
        for f in ("latency_ms", "jitter_ms"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"link profile {self.name!r}: {f} must be >= 0, got {v!r}")
        if not (isinstance(self.loss, int | float) and 0 <= self.loss < 1):
            raise ValueError(
                f"link profile {self.name!r}: loss must be in [0, 1), got {self.loss!r}"
            )

    @property
    def shaped(self) -> bool:
        """False for a link that needs no delay at all (the proxy just relays)."""
        return (
            self.up_mbps is not None
            or self.down_mbps is not None
            or self.latency_ms > 0
            or self.jitter_ms > 0
            or self.loss > 0
        )

    @property
    def rtt_ms(self) -> float:
        """The round-trip floor: twice the one-way latency (jitter and loss only add)."""
        return 2 * self.latency_ms

    def bytes_per_s(self, direction: str) -> float | None:
        mbps = self.up_mbps if direction == "up" else self.down_mbps
        return None if mbps is None else mbps * 1e6 / 8

    def transfer_ms(self, nbytes: int, direction: str) -> float:
        """Serialisation time of ``nbytes`` in ``direction`` ("up" or "down"), no latency."""
        rate = self.bytes_per_s(direction)
        return 0.0 if rate is None else nbytes / rate * 1e3

    def bound_ms(self, bytes_up: int, bytes_down: int, round_trips: int) -> float:
        """The floor of the communication time of an exchange pattern:
        bytes/bandwidth each way + round trips x RTT (no jitter, no loss)."""
        return (
            self.transfer_ms(bytes_up, "up")
            + self.transfer_ms(bytes_down, "down")
            + round_trips * self.rtt_ms
        )

    def expected_ms(self, bytes_up: int, bytes_down: int, round_trips: int) -> float:
        """The bound plus the mean jitter (half of jitter_ms each way per round trip) and
        the expected cost of lost segments (each: an RTO and its bytes again)."""
        segments = math.ceil(bytes_up / SEGMENT_BYTES) + math.ceil(bytes_down / SEGMENT_BYTES)
        lost = segments * self.loss
        per_loss = RTO_MIN_MS + self.rtt_ms
        return (
            self.bound_ms(bytes_up, bytes_down, round_trips)
            + round_trips * self.jitter_ms
            + lost * per_loss
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        def bw(v: float | None) -> str:
            return "unlimited" if v is None else f"{v:g} Mbit/s"

        return (
            f"{self.name}: up {bw(self.up_mbps)}, down {bw(self.down_mbps)}, "
            f"{self.latency_ms:g} ms one way (+0..{self.jitter_ms:g} ms jitter), loss {self.loss:g}"
        )

    def with_overrides(self, **values: Any) -> LinkProfile:
        """This profile with the given fields replaced (``None`` values are ignored)."""
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            return self
        return replace(self, name=f"{self.name}*", **given)


def _p(name: str, up, down, lat, jit, loss, about) -> LinkProfile:  # noqa: ANN001
    return LinkProfile(name, up, down, lat, jit, loss, about)


PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        _p("loopback", None, None, 0.0, 0.0, 0.0, "no shaping: the proxy only relays"),
        _p("lan", 1000.0, 1000.0, 0.25, 0.05, 0.0, "wired gigabit Ethernet, one switch"),
        _p("wifi", 50.0, 100.0, 3.0, 2.0, 5e-4, "good 802.11ac to a server on the same LAN"),
        _p("lte", 10.0, 30.0, 25.0, 10.0, 1e-3, "a phone on 4G/LTE to a cloud server"),
        _p("tunnel", 20.0, 20.0, 40.0, 3.0, 0.0, "a VPN or SSH tunnel across the internet"),
    )
}

_FIELDS = {f.name for f in fields(LinkProfile)}


def profile_from_dict(doc: dict[str, Any], name: str = "custom") -> LinkProfile:
    """A profile from a JSON object with ``LinkProfile``'s fields (bandwidths may be null)."""
    unknown = set(doc) - _FIELDS
    if unknown:
        raise ValueError(f"link profile {name!r}: unknown field(s) {sorted(unknown)}")
    missing = {"up_mbps", "down_mbps"} - set(doc)
    if missing:
        raise ValueError(f"link profile {name!r}: missing field(s) {sorted(missing)}")
    return LinkProfile(**{"name": name, **doc})


def load_profile(spec: str | Path) -> LinkProfile:
    """A named profile (``PROFILES``) or the path of a JSON file holding one."""
    text = str(spec)
    if text in PROFILES:
        return PROFILES[text]
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"link profile file {path}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"link profile file {path}: expected a JSON object")
        return profile_from_dict(doc, doc.pop("name", path.stem))
    raise ValueError(
        f"unknown link profile {text!r}: choose from {', '.join(PROFILES)} or give a .json file"
    )
