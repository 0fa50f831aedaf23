"""Just enough HTTP/1.1 to find where each request and response ends.

The proxy must know message boundaries to drop a connection *between* "the server has
the whole request" and "the client has the whole reply", or to cut one in the middle of
its body. It never interprets anything else: the bytes read are forwarded unchanged
(``Message.raw``), so the proxy is transparent for every message it lets through.

Supported framing (RFC 9112 section 6): ``Content-Length``, ``Transfer-Encoding:
chunked`` (with trailers), no body for requests without either, for responses to HEAD
and for 1xx/204/304, and close-delimited response bodies. ``Expect: 100-continue`` is
not handled (httpx and browsers send whole requests).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024


class IncompleteMessage(Exception):
    """The peer closed or reset the connection in the middle of a message."""


class MalformedMessage(Exception):
    """Bytes that are not HTTP/1.1 framing this parser understands."""


@dataclass
class Message:
    """One HTTP/1.1 request or response exactly as it came off the wire."""

    head: bytes  # start line + headers + the empty line
    body: bytes  # the body as framed on the wire (chunk sizes included when chunked)
    start_line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    close_delimited: bool = False  # a response whose body ended with the connection

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def method(self) -> str:
        """The request method (requests only)."""
        return self.start_line.split(" ", 1)[0]

    @property
    def target(self) -> str:
        """The request target, e.g. ``/v1/sessions/.../forward`` (requests only)."""
        parts = self.start_line.split(" ")
        return parts[1] if len(parts) > 1 else ""

    @property
    def status(self) -> int:
        """The status code (responses only)."""
        parts = self.start_line.split(" ")
        try:
            return int(parts[1])
        except (IndexError, ValueError):
            raise MalformedMessage(f"bad status line {self.start_line!r}") from None

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("Connection") or "").lower()
        return "close" not in connection and not self.close_delimited


async def read_message(
    reader: asyncio.StreamReader, *, response: bool, request_method: str = "GET"
) -> Message | None:
    """The next whole message on ``reader``; None on a clean end of stream before it.

    Raises :class:`IncompleteMessage` when the stream ends inside a message.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise IncompleteMessage("connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise MalformedMessage(f"message head longer than {MAX_HEAD} bytes") from None
    except ConnectionError as exc:
        raise IncompleteMessage(f"connection lost inside a message head: {exc}") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    start, headers = lines[0], []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedMessage(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    msg = Message(head, b"", start, headers)
    try:
        msg.body = await _read_body(reader, msg, response, request_method)
    except asyncio.IncompleteReadError as exc:
        raise IncompleteMessage(
            f"connection closed inside a body ({len(exc.partial)} of {exc.expected} bytes)"
        ) from None
    except ConnectionError as exc:
        raise IncompleteMessage(f"connection lost inside a body: {exc}") from None
    return msg


async def _read_body(
    reader: asyncio.StreamReader, msg: Message, response: bool, request_method: str
) -> bytes:
    if response:
        status = msg.status
        if request_method.upper() == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return b""
    encoding = (msg.header("Transfer-Encoding") or "").lower()
    if encoding:
        if encoding.split(",")[-1].strip() != "chunked":
            if response:
                msg.close_delimited = True
                return await reader.read()
            raise MalformedMessage(f"request with Transfer-Encoding {encoding!r}")
        return await _read_chunked(reader)
    length = msg.header("Content-Length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise MalformedMessage(f"bad Content-Length {length!r}") from None
        if n < 0:
            raise MalformedMessage(f"bad Content-Length {length!r}")
        return await reader.readexactly(n)
    if response:
        msg.close_delimited = True
        return await reader.read()
    return b""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        parts.append(size_line)
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MalformedMessage(f"bad chunk size {size_text!r}") from None
        if size == 0:
            while True:  # trailers, then the empty line
                line = await reader.readuntil(b"\r\n")
                parts.append(line)
                if line == b"\r\n":
                    return b"".join(parts)
        parts.append(await reader.readexactly(size + 2))
