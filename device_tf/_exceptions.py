"""Errors of the device side.

SpliteasyError
└── DeviceError            the device cannot go on
    ├── ServerRejected     the server answered 4xx/5xx (code, detail and its JSON body)
    │   └── StepConflict   409 step_conflict: the server wants another step (``next_step``)
    ├── ServerUnreachable  no answer within the reconnect time
    └── StateError         a device state directory that cannot be used (other bundle, ...)
"""

from shared_schema import SpliteasyError


class DeviceError(SpliteasyError):
    pass


class ServerRejected(DeviceError):
    def __init__(self, status: int, code: str, detail: str, body: dict | None = None) -> None:
        super().__init__(f"server answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.body = body or {}


class StepConflict(ServerRejected):
    """409 step_conflict. ``next_step`` (None from an older server) is the step the
    session expects: after a server restart, the step its checkpoint holds."""

    @property
    def next_step(self) -> int | None:
        value = self.body.get("next_step")
        return int(value) if value is not None else None

    @property
    def durable_step(self) -> int | None:
        value = self.body.get("durable_step")
        return int(value) if value is not None else None


class ServerUnreachable(DeviceError):
    pass


class StateError(DeviceError):
    pass
