"""Errors of the shared contract.

    SpliteasyError
    ├── ManifestError           the bundle manifest is missing, invalid, or lies about a file
    └── FrameError              a tensor frame cannot be trusted
        ├── TruncatedFrame      fewer bytes than the header promises
        ├── BadMagic            not a spliteasy frame at all
        ├── UnsupportedVersion  a frame version this build does not speak
        ├── FrameSizeMismatch   the payload length disagrees with dtype x shape
        └── FrameSpecMismatch   well-formed, but not what the manifest expects here

Every component translates these into its own surface (HTTP 4xx JSON, CLI message).
"""


class SpliteasyError(Exception):
    """Base of every error spliteasy raises on purpose."""


class ManifestError(SpliteasyError):
    pass


class FrameError(SpliteasyError, ValueError):
    pass


class TruncatedFrame(FrameError):
    pass


class BadMagic(FrameError):
    pass


class UnsupportedVersion(FrameError):
    pass


class FrameSizeMismatch(FrameError):
    pass


class FrameSpecMismatch(FrameError):
    pass
