"""The device's step loop: runtime (A, C) + codec (frames) + transport (HTTP), kept apart.

Double split, two round trips per step::

    a = A(x)          --forward(a)-->    b = B(a)
    loss, g_b, C step <--b--
                      --backward(g_b)--> B step, g_a
    A step(g_a)       <--g_a--

Single split, one round trip: ``step(a, labels) -> (g_a, loss)``.

Every step is timed by component: device compute (the runtime), server compute (the
server's own ``X-Spliteasy-Server-Ms``), codec (encode + decode here), and wire (the
rest of each round trip).

The loop talks to the server only through a :class:`~device_tf.transport.Transport`
(open or resume a session, exchange an operation's frames, close); URLs, the token and
reconnection are the transport's. It tracks the server's durable step (the newest
checkpoint's hold on this session) for :mod:`device_tf.state`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from shared_schema import Frame, FrameKind, Manifest, check, decode, encode

from ._exceptions import DeviceError
from .runtime import DeviceRuntime
from .transport import SessionInfo, Transport


@dataclass
class StepTimings:
    device_ms: float = 0.0
    server_ms: float = 0.0
    codec_ms: float = 0.0
    wire_ms: float = 0.0
    total_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class StepResult:
    step: int
    loss: float
    timings: StepTimings = field(default_factory=StepTimings)
    durable_step: int | None = None  # the server's checkpointed step, from the last reply
    replayed: bool = False  # the server answered from its retry store (already applied)
    codec: str = "float32"  # the session's wire codec (bytes_up/bytes_down are its bytes)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "loss": self.loss,
            **asdict(self.timings),
            "durable_step": self.durable_step,
            "replayed": self.replayed,
            "codec": self.codec,
        }


class _Clock:
    def __init__(self) -> None:
        self.t = StepTimings()

    def device(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.t.device_ms += (time.perf_counter() - start) * 1000
        return out

    def codec(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.t.codec_ms += (time.perf_counter() - start) * 1000
        return out


class SplitTrainer:
    """Trains the device's slices against a spliteasy server."""

    def __init__(
        self,
        runtime: DeviceRuntime,
        transport: Transport,
        manifest: Manifest,
        manifest_sha256: str,
        aux_label: bool = False,
        codec: str = "float32",
    ) -> None:
        """``codec``: the wire codec to ask for when the session opens (shared_schema/codec.py);
        its ACTIVATION and GRADIENT frames then travel in it, both ways."""
        from shared_schema.codec import get

        get(codec)  # an unknown name fails here, before any traffic
        self.rt = runtime
        self.codec = codec
        self.transport = transport
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.aux_label = aux_label
        self.session: bytes | None = None
        self.session_id = ""
        self.next_step = 0
        self.durable_step: int | None = None
        self._replayed = False

    # -- session ---------------------------------------------------------------
    def _use(self, info: SessionInfo) -> SessionInfo:
        if info.codec != self.codec:
            raise DeviceError(
                f"session {info.session_id} uses codec {info.codec}, this run {self.codec}; "
                "resume with the same --codec"
            )
        self.session_id = info.session_id
        self.session = bytes.fromhex(info.session_id)
        self.next_step = info.next_step
        self.durable_step = info.durable_step
        return info

    def open(self) -> SessionInfo:
        """A new session on the server."""
        return self._use(
            self.transport.open_session(self.manifest_sha256, self.aux_label, self.codec)
        )

    def resume(self, session_id: str, token: str) -> SessionInfo:
        """Take up an existing session (a restarted device); ``next_step`` is the server's."""
        return self._use(self.transport.resume_session(session_id, token))

    def close(self) -> None:
        if self.session is not None:
            self.transport.close_session()
            self.session = None

    def __enter__(self) -> SplitTrainer:
        """The session opens with the first step (or ``open``/``resume``, or
        ``DeviceState.begin``), and closes on exit."""
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one exchange ----------------------------------------------------------
    def _call(self, clock: _Clock, op: str, frames: list[Frame]) -> list[Frame]:
        body = clock.codec(encode, frames)
        reply = self.transport.exchange(op, body)
        if reply.durable_step is not None:
            self.durable_step = reply.durable_step
        self._replayed = self._replayed or reply.replayed
        out = clock.codec(decode, reply.body)
        clock.t.server_ms += reply.server_ms
        clock.t.wire_ms += max(reply.round_trip_ms - reply.server_ms, 0.0)
        clock.t.bytes_up += len(body)
        clock.t.bytes_down += len(reply.body)
        return out

    def _frame(self, kind: FrameKind, spec, array: np.ndarray, step: int) -> Frame:
        from shared_schema.codec import compressible

        codec = self.codec if compressible(kind.name, spec.dtype) else "float32"
        return Frame(
            kind,
            spec.name,
            np.asarray(array, dtype=spec.dtype),
            spec.layout,
            self.session,
            step,
            codec,
        )

    def _expect(self, frames: list[Frame], kind: FrameKind, spec, step: int) -> np.ndarray:
        found = [f for f in frames if f.name == spec.name]
        if not found:
            raise DeviceError(f"server reply lacks tensor {spec.name!r}")
        frame = found[0]
        check(frame, spec, kind)
        if frame.step != step or frame.session != self.session:
            raise DeviceError(f"server reply is for step {frame.step}, expected {step}")
        return frame.array

    # -- training --------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        if self.session is None:
            self.open()
        m, step, clock = self.manifest, self.next_step, _Clock()
        self._replayed = False
        start = time.perf_counter()
        down = FrameKind.TARGET if self.aux_label else FrameKind.GRADIENT
        a = clock.device(self.rt.a_forward, x)
        if m.split_mode == "double":
            reply = self._call(
                clock, "forward", [self._frame(FrameKind.ACTIVATION, m.cuts[0], a, step)]
            )
            b = self._expect(reply, FrameKind.ACTIVATION, m.cuts[1], step)
            loss, g_b = clock.device(self.rt.c_train, b, y)
            up = (b - g_b) if self.aux_label else g_b  # auxiliary label: b_hat = b - dL/db
            reply = self._call(clock, "backward", [self._frame(down, m.cuts[1], up, step)])
        else:
            frames = [
                self._frame(FrameKind.ACTIVATION, m.cuts[0], a, step),
                self._frame(FrameKind.LABELS, m.labels, y, step),
            ]
            reply = self._call(clock, "step", frames)
            loss_frames = [f for f in reply if f.kind == FrameKind.SCALAR and f.name == "loss"]
            if not loss_frames:
                raise DeviceError("server reply lacks the loss")
            loss = float(loss_frames[0].array)
        g_or_target = self._expect(reply, down, m.cuts[0], step)
        # auxiliary label: the server sent a_hat = a - dL/da; the gradient of
        # 1/2 ||a_hat - a||^2 at a is a - a_hat = dL/da.
        g_a = (a - g_or_target) if self.aux_label else g_or_target
        clock.device(self.rt.a_backward, g_a)
        self.next_step = step + 1
        clock.t.total_ms = (time.perf_counter() - start) * 1000
        return StepResult(step, float(loss), clock.t, self.durable_step, self._replayed, self.codec)

    # -- inference ---------------------------------------------------------------
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's output for x: A and C here, B on the server in inference mode."""
        if self.session is None:
            self.open()
        m, outs = self.manifest, []
        clock = _Clock()
        self._replayed = False
        for start in range(0, len(x), batch_size):
            a = self.rt.a_infer(x[start : start + batch_size])
            reply = self._call(
                clock, "infer", [self._frame(FrameKind.ACTIVATION, m.cuts[0], a, self.next_step)]
            )
            server_out = m.server_output
            b = self._expect(reply, FrameKind.ACTIVATION, server_out, self.next_step)
            outs.append(self.rt.c_infer(b) if m.split_mode == "double" else b)
        return np.concatenate(outs)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
        """The validation score of the bundle's loss (``losses.score``): accuracy for
        class labels, binary accuracy, or the mean squared / absolute error."""
        from .losses import score

        return score(self.manifest.loss, self.predict(x, batch_size), y)
