"""Errors of the device side.

SpliteasyError
└── DeviceError          the device cannot go on
    ├── ServerRejected   the server answered 4xx/5xx (code and detail from its JSON body)
    └── ServerUnreachable no answer after the bounded retries
"""

from shared_schema import SpliteasyError


class DeviceError(SpliteasyError):
    pass


class ServerRejected(DeviceError):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"server answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class ServerUnreachable(DeviceError):
    pass
