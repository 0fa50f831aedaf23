"""The CLI's stderr filter (``spliteasy_cli.quiet``): library noise out, everything else in.

Fast tests without TensorFlow: the filter is fed the very lines TensorFlow 2.19 prints
on this machine, plus lines that must survive (real errors, progress bars, a crash).
The subcommands themselves are checked in ``test_export.py`` (``cuts``, ``serve``,
``train``, ``export`` as real processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NOISE_LINES = [
    b"2026-12-01 15:24:50.578634: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:467]"
    b" Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when"
    b" one has already been registered",
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"E0000 00:00:1796138690.659715    7042 cuda_dnn.cc:8579] Unable to register cuDNN factory:"
    b" Attempting to register factory for plugin cuDNN when one has already been registered",
    b"E0000 00:00:1796138690.675439    7042 cuda_blas.cc:1407] Unable to register cuBLAS factory:"
    b" Attempting to register factory for plugin cuBLAS when one has already been registered",
    b"W0000 00:00:1796138690.705969    7042 computation_placer.cc:177] computation placer already"
    b" registered. Please check linkage and avoid linking the same target more than once.",
    b"2026-12-01 15:24:58.253319: E external/local_xla/xla/stream_executor/cuda/"
    b"cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit:"
    b" UNKNOWN ERROR (303)",
    b"I0000 00:00:1796138760.569432    9598 devices.cc:67] Number of eligible GPUs (core count >="
    b" 8, compute capability >= 0.0): 0",
    b"I0000 00:00:1796138760.574789    9598 single_machine.cc:374] Starting new session",
    b"2026-12-01 15:25:00.000001: I tensorflow/core/util/port.cc:153] oneDNN custom operations"
    b" are on. You may see slightly different numerical results.",
    b"2026-12-01 15:25:00.000002: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38]"
    b" TF-TRT Warning: Could not find TensorRT",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    b"Hi, looks like you are running TensorFlow.js in Node.js. To speed things up dramatically,"
    b" install our node backend, visit https://github.com/tensorflow/tfjs-node for more details.",
]
KEPT_LINES = [
    b"2026-12-01 15:24:50.578634: E tensorflow/core/framework/op_kernel.cc:1857] OP_REQUIRES"
    b" failed at conv_ops.cc:123 : INVALID_ARGUMENT: a real error",
    b"E0000 00:00:1796138690.659715    7042 some_kernel.cc:12] another real error",
    b"F0000 00:00:1796138690.659715    7042 check.cc:12] Check failed: fatal",
    b"spliteasy convert: error: unknown layer 'x'",
    b"Traceback (most recent call last):",
    b"epoch 1/2: loss 0.8908, test accuracy 0.9167",
    b"INFO:     Started server process [17033]",
]


def run_pump(chunks: list[bytes]) -> bytes:
    from spliteasy_cli.quiet import pump

    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    worker = threading.Thread(target=pump, args=(src_r, dst_w))
    worker.start()
    for chunk in chunks:
        os.write(src_w, chunk)
    os.close(src_w)
    worker.join(10)
    os.close(dst_w)
    out = b""
    while data := os.read(dst_r, 65536):
        out += data
    os.close(src_r)
    os.close(dst_r)
    return out


def test_noise_dropped_everything_else_kept():
    lines = [x for pair in zip(NOISE_LINES, KEPT_LINES * 2, strict=False) for x in pair]
    out = run_pump([b"\n".join(lines) + b"\n"])
    assert out == b"".join(line + b"\n" for line in lines if line in KEPT_LINES)


def test_lines_split_across_writes_and_progress_bars():
    noise, kept = NOISE_LINES[0], KEPT_LINES[0]
    chunks = [
        noise[:10], noise[10:] + b"\n" + kept[:7], kept[7:] + b"\n",  # split mid-line
        b"\r  10%|#   | 1/10", b"\r 100%|####| 10/10\n",  # tqdm: no newline until the end
        b"no newline at the end",
    ]  # fmt: skip
    out = run_pump(chunks)
    assert out == kept + b"\n\r  10%|#   | 1/10\r 100%|####| 10/10\nno newline at the end"


def test_a_crash_still_gets_its_last_words_out():
    """The filter is a process of its own: it drains the pipe after the command died."""
    code = (
        "import os, sys\n"
        "from spliteasy_cli.quiet import filter_stderr\n"
        "filter_stderr()\n"
        f"os.write(2, {NOISE_LINES[0]!r} + b'\\n')\n"
        "os.write(2, b'F0000 00:00:1.0 1 check.cc:12] Check failed: the last words\\n')\n"
        "os.abort()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert b"Check failed: the last words" in proc.stderr
    assert b"Fatal Python error: Aborted" in proc.stderr  # faulthandler, to the real stderr
    assert b"cuFFT" not in proc.stderr


def test_verbose_turns_it_off(monkeypatch):
    from spliteasy_cli.quiet import VERBOSE_ENV, quiet_startup

    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert quiet_startup(argv_from_command_line=True) is None
