"""Quiet start-up: every ``spliteasy`` command prints its own lines, not its libraries'.

Importing TensorFlow prints a page of C++ start-up messages (CUDA factory registration,
cuInit, XLA's "computation placer", oneDNN and CPU-instruction notes), and more arrive
later (grappler's "Starting new session" while tf2onnx converts, TFLite's XNNPACK
note); Python-level libraries add warnings and ``WARNING:tensorflow:`` log lines. None of
it says anything about the user's run. Three layers remove it, once, at the CLI entry:

1. **Environment** before TensorFlow is imported: ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's
   own C++ INFO and WARNING lines; its errors stay), the TF-DF banner off. Values the
   user set win.
2. **Python** logging and warnings: the loggers of TensorFlow, absl, tf2onnx and
   onnx2torch at ERROR, and library warnings (deprecations, "saving as HDF5 is legacy",
   "tf.lite.Interpreter is deprecated") ignored. Exceptions are untouched.
3. **The stderr file descriptor.** Many of the C++ lines are written by absl *before*
   its logging is initialised ("All log messages before absl::InitializeLog() is called
   are written to STDERR"), which no environment variable reaches. So stderr is routed
   through a small filter process (``spliteasy_cli.quiet.main``) that drops exactly
   C++ INFO/WARNING-format lines and a list of known start-up messages, and passes every
   other byte through at once. It is a separate process, not a thread, so a crash of the
   command (a C++ abort, a segfault) still gets its last words out: the filter drains the
   pipe until the last writer is gone. When stderr is a terminal the filter reads a
   pseudo-terminal, so progress bars and colours still see a terminal.

``SPLITEASY_VERBOSE=1`` turns all of this off.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable

VERBOSE_ENV = "SPLITEASY_VERBOSE"

ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TFDF_DISABLE_WELCOME_MESSAGE": "1",
    "GRPC_VERBOSITY": "ERROR",
}
QUIET_LOGGERS = ("tensorflow", "absl", "tf2onnx", "onnx2torch", "h5py", "jax")
NOISY_MODULES = (
    r"(tensorflow|tensorflow_hub|tensorflowjs|tensorflow_decision_forests|tf_keras|keras|"
    r"tf2onnx|onnx|onnx2torch|onnxruntime|torch|torchvision|google\.protobuf|pkg_resources|"
    r"ydf|h5py|numpy)(\..*)?"
)

# C++ log lines at INFO or WARNING, in absl's format ("W0000 00:00:1796138690.706 7042
# file.cc:177] ...") and in TensorFlow's ("2026-12-01 15:24:50.578: I file.cc:51] ...").
_CPP_INFO_WARNING = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] )"
    rb"[\w./+-]+:\d+\]"
)
# Messages at ERROR level (or plain prints) that every start-up emits and that say
# nothing: a CPU-only machine with the CUDA-enabled wheel, XLA's double registration.
_KNOWN = re.compile(
    rb"Unable to register cu(?:FFT|DNN|BLAS) factory"
    rb"|failed call to cuInit"
    rb"|All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|computation placer already registered"
    rb"|Could not find cuda drivers on your machine"
    rb"|Cannot dlopen some GPU libraries"
    rb"|TF-TRT Warning"
    rb"|oneDNN custom operations are on"
    rb"|This TensorFlow binary is optimized to use available CPU instructions"
    rb"|rebuild TensorFlow with the appropriate compiler flags"
    rb"|^INFO: Created TensorFlow Lite (?:XNNPACK|delegate)"
    rb"|^INFO: Initialized TensorFlow Lite runtime"
    rb"|Hi, looks like you are running TensorFlow\.js in Node\.js"
    rb"|^={28}\s*$"
    # libjpeg's own note on a truncated JPEG; spliteasy's data error names the file
    rb"|^Improper call to JPEG library in state \d+"
)
# A partial line that could still become one of the above is held back until its end
# (C++ writes whole lines, so this is a few microseconds); anything else passes at once.
_MAYBE = re.compile(rb"^(?:\d|[IWEF](?:\d|$)|INFO|Hi,|=|WARNING: All)")
_MAYBE_PREFIXES = (b"INFO: ", b"Hi, looks", b"WARNING: All log", b"=")


def is_noise(line: bytes) -> bool:
    line = line.rstrip(b"\r")
    return bool(_CPP_INFO_WARNING.match(line) or _KNOWN.search(line))


def _could_be_noise(partial: bytes) -> bool:
    if any(p.startswith(partial[: len(p)]) or partial.startswith(p) for p in _MAYBE_PREFIXES):
        return True
    return bool(_MAYBE.match(partial)) and len(partial) < 512


def configure_environment() -> None:
    """Environment for the libraries, before TensorFlow is imported (user values win)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def configure_python() -> None:
    """Library loggers at ERROR and library warnings ignored (spliteasy's own untouched)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=NOISY_MODULES)


def filter_stderr() -> Callable[[], None] | None:
    """Route fd 2 through the filter process; returns the function that undoes it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return None  # no usable stderr: nothing to filter
    reader = writer = -1
    try:
        if os.isatty(saved):
            reader, writer = _pty_like(saved)
        else:
            reader, writer = os.pipe()
        # The package's own directory goes on the child's path explicitly: a filter that
        # failed to start would swallow every error instead of only the noise.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = f"import sys; sys.path.insert(0, {root!r}); from spliteasy_cli.quiet import main; main()"
        proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=reader,
            stdout=subprocess.DEVNULL,
            stderr=saved,
            close_fds=True,
            start_new_session=True,  # Ctrl-C in the terminal is for the command, not for it
        )
    except OSError:
        for fd in (reader, writer, saved):
            if fd >= 0:
                os.close(fd)
        return None
    os.close(reader)
    os.dup2(writer, 2)
    os.close(writer)
    import faulthandler

    faulthandler.enable(file=saved)  # a Python crash report goes straight to the terminal

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes our end: the filter drains and exits
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass  # a child process still holds the pipe; the filter outlives us

    return restore


def _pty_like(terminal: int) -> tuple[int, int]:
    """A pseudo-terminal (reader, writer) with the terminal's size and no output mangling."""
    import fcntl
    import termios

    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": the bytes pass as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        size = fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    except OSError:
        pass
    return master, slave


def quiet_startup(argv_from_command_line: bool) -> Callable[[], None] | None:
    """All three layers (the fd filter only for a real command line, not in-process calls)."""
    if os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0"):
        return None
    configure_environment()
    configure_python()
    return filter_stderr() if argv_from_command_line else None


# -- the filter process -------------------------------------------------------------------


def pump(src: int = 0, dst: int = 2) -> None:
    """Copy ``src`` to ``dst`` line by line, dropping noise, until every writer is gone."""
    import select

    pending = b""  # a partial line held back (it could still turn out to be noise)
    passing = False  # the current partial line was already written: the rest follows it

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(dst, view)
            except BrokenPipeError:
                return
            view = view[n:]

    while True:
        if pending:
            ready, _, _ = select.select([src], [], [], 0.05)
            if not ready:  # nothing more is coming soon: it was not a C++ log line
                if not is_noise(pending):
                    write(pending)
                    passing = True
                pending = b""
                continue
        try:
            chunk = os.read(src, 65536)
        except OSError:  # EIO: a pseudo-terminal whose last writer closed
            chunk = b""
        if not chunk:
            break
        data, pending = pending + chunk, b""
        *lines, tail = data.split(b"\n")
        out = []
        for line in lines:
            if passing or not is_noise(line):
                out.append(line + b"\n")
            passing = False
        if tail:
            if passing or not _could_be_noise(tail):
                out.append(tail)
                passing = True
            else:
                pending = tail
        if out:
            write(b"".join(out))
    if pending and not is_noise(pending):
        write(pending)


def main() -> None:
    """The filter process: stdin -> stderr, noise dropped; Ctrl-C is for the command."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pump()


if __name__ == "__main__":
    main()
