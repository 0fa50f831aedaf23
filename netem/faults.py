"""What to do to each request: the fault kinds and the schedule that picks them.

Requests are numbered in the order the proxy reads them (0, 1, 2, ... over all
connections, retries included). A schedule maps that index (and the request itself, so
a test can spare ``/v1/health``) to one :class:`Fault`. Two ways to say which:

- explicit indices: ``FaultSchedule(explicit={3: Fault.DROP_AFTER_APPLY})``;
- probabilities drawn from a seeded generator, one draw per request, so the same seed
  and the same request sequence give the same faults:
  ``FaultSchedule(probabilities={Fault.DROP_BEFORE_SERVER: 0.1, Fault.DROP_AFTER_APPLY: 0.1}, seed=7)``.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .http11 import Message


class Fault(StrEnum):
    NONE = "none"
    # Close the client's connection once its whole request has arrived; the server never
    # sees the request.
    DROP_BEFORE_SERVER = "drop_before_server"
    # Forward the request, let the server apply it and answer, read the whole reply, then
    # close the client's connection instead of passing the reply on.
    DROP_AFTER_APPLY = "drop_after_apply"
    # Forward the head and half the request body, then reset both connections (TCP RST):
    # the server sees a truncated request.
    RESET_REQUEST_BODY = "reset_request_body"
    # Forward the request, pass the head and half the reply body to the client, then
    # reset the client's connection.
    RESET_RESPONSE_BODY = "reset_response_body"


Selector = Callable[[Message], bool]


def path_matches(pattern: str) -> Selector:
    """A selector for requests whose target matches the regular expression ``pattern``."""
    regex = re.compile(pattern)
    return lambda request: regex.search(request.target) is not None


@dataclass
class FaultSchedule:
    """Which fault hits the request with a given index.

    ``applies_to`` limits faults to the requests it selects (others pass and draw no
    random number, so sparing health checks does not shift the faults of the rest).
    An explicit entry wins over the probabilities.
    """

    probabilities: Mapping[Fault, float] = field(default_factory=dict)
    explicit: Mapping[int, Fault] = field(default_factory=dict)
    seed: int = 0
    applies_to: Selector | None = None

    def __post_init__(self) -> None:
        total = sum(self.probabilities.values())
        if any(p < 0 for p in self.probabilities.values()) or total > 1:
            raise ValueError(f"fault probabilities must be >= 0 and sum to <= 1, got {total}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def decide(self, index: int, request: Message) -> Fault:
        if self.applies_to is not None and not self.applies_to(request):
            return Fault.NONE
        with self._lock:
            draw = self._rng.random() if self.probabilities else 1.0
        if index in self.explicit:
            return self.explicit[index]
        edge = 0.0
        for fault, p in self.probabilities.items():
            edge += p
            if draw < edge:
                return fault
        return Fault.NONE


NO_FAULTS = FaultSchedule()
