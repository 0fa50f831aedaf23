"""The one patience policy of the device's transports: when to try a message again.

Both bindings of the transport seam (HTTP, :mod:`device_tf.transport`; WebSocket,
:mod:`device_tf.ws_transport`) resend a message whose attempt failed in transit, and
resending is always safe: every frame carries (session, step) and the server answers an
applied step from its retry store. What differs between them is only how an attempt
fails; *when* to try again is this module's, so the two cannot drift apart:

- the first retry at once (a lone dropped connection is not news, and is not reported);
- then exponential backoff, ``backoff[0]`` doubling up to ``backoff[1]`` seconds;
- never sooner than the server asked (``Retry-After`` / ``retry_after`` of 503 ``busy``,
  ``shutting_down``, 429 ``rate_limited``);
- for at most ``reconnect_timeout`` seconds from the first failure (or ``retries``
  attempts, the older API), then :class:`ServerUnreachable` with what failed last;
- one line when the server is lost (from the second failed attempt) and one when it is
  back, through ``notify``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ._exceptions import ServerUnreachable

T = TypeVar("T")


class Retry(Exception):
    """This attempt failed in a way an identical later attempt may get through: raised by
    an attempt function, ``after`` seconds at the earliest (the server's Retry-After)."""

    def __init__(self, why: str, after: float = 0.0) -> None:
        super().__init__(why)
        self.after = after


@dataclass
class Patience:
    """How long and how often to retry a message (see the module docstring)."""

    reconnect_timeout: float = 300.0
    backoff: tuple[float, float] = (0.1, 5.0)
    retries: int | None = None
    notify: Callable[[str], None] = print
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, after: float = 0.0) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based), not below ``after``."""
        wait = 0.0 if attempt <= 1 else min(self.backoff[0] * 2 ** (attempt - 2), self.backoff[1])
        return max(wait, after)

    def run(self, attempt: Callable[[], T], *, label: str, target: str) -> T:
        """Call ``attempt`` until it returns (or raises anything but :class:`Retry`).

        ``label`` names the server in the lost/back lines (``http://host:port``);
        ``target`` is what could not be reached, in the final error (a URL with path)."""
        first_failure: float | None = None
        attempts, announced = 0, False
        while True:
            try:
                result = attempt()
            except Retry as retry:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                attempts += 1
                if attempts >= 2 and not announced:
                    announced = True
                    self.notify(
                        f"spliteasy: {label} unreachable ({retry}); retrying with backoff "
                        f"for up to {self.reconnect_timeout:g} s"
                    )
                waited = now - first_failure
                if waited >= self.reconnect_timeout or (
                    self.retries is not None and attempts > self.retries
                ):
                    raise ServerUnreachable(
                        f"{target}: no answer for {waited:.0f} s ({attempts} attempts; last: "
                        f"{retry}); is the server running? Restart the same command to resume "
                        "where it stopped."
                    ) from None
                left = max(first_failure + self.reconnect_timeout - now, 0.0)
                self.sleep(min(self.delay(attempts, retry.after), left))
                continue
            if announced and first_failure is not None:
                self.notify(
                    f"spliteasy: {label} is back after "
                    f"{time.monotonic() - first_failure:.1f} s; continuing"
                )
            return result
