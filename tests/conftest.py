"""Generic fixtures: free ports and real servers on 127.0.0.1.

- ``free_port``: a TCP port that was free a moment ago (prefer port 0 where you can).
- ``serve_app(app)``: serve an ASGI app object with real uvicorn in a background thread;
  returns a ``server_torch.serving.ServerThread`` (``.url`` like ``http://127.0.0.1:PORT``).
  Stopped at teardown. Use it for apps built in the test (``create_app(module=..., manifest=...)``).
- ``serve_bundle(bundle_dir, *extra_args)``: run ``spliteasy serve BUNDLE --port 0`` as a
  child process, wait for ``/v1/health``; returns a ``ServerProcess`` (``.url``, ``.proc``,
  ``.output``). Terminated at teardown.
- ``digits_bundle_dir`` / ``digits_bundles``: converted bundles from the on-disk cache
  (``tests/bundle_cache.py``: one conversion per configuration and converter source,
  ``.cache/bundles/``, ``SPLITEASY_TEST_CACHE`` to move it or ``off``). Read-only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# -- the whole suite on every core -------------------------------------------------------

WORKERS_ENV = "SPLITEASY_TEST_WORKERS"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The whole suite (``pytest`` with no paths, ``make test``) runs on pytest-xdist
    workers, one per core (``SPLITEASY_TEST_WORKERS`` to change, 0 for one process),
    with ``--dist loadgroup``: the tests of one zoo network share a worker
    (``xdist_group``), so each network is built once. A selection (``pytest FILE``,
    ``-k``) stays in one process unless ``-n`` asks otherwise: running one test must not
    start two TensorFlows. Runs before xdist's own ``pytest_cmdline_main``."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is not None or config.getoption("usepdb", False):
        return
    if config.option.collectonly or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    workers = int(os.environ.get(WORKERS_ENV, min(2, os.cpu_count() or 1)))
    if workers > 1:
        config.option.numprocesses = workers
        if config.option.dist == "no":
            config.option.dist = "loadgroup"


# -- servers --------------------------------------------------------------------------


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve_app() -> Iterator[Callable[..., Any]]:
    from server_torch.serving import ServerThread

    started: list[ServerThread] = []

    def start(app: Any, **kwargs: Any) -> ServerThread:
        srv = ServerThread(app, **kwargs).start()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.stop()


@pytest.fixture
def serve_bundle(tmp_path_factory) -> Iterator[Callable[..., Any]]:
    """Without ``--state-dir`` in ``extra_args`` the child gets a fresh one: its default
    (``runs/serve-<manifest hash>/`` in the working directory) is shared by every server
    of the same (cached) bundle, and a server would resume another test's checkpoint."""
    from server_torch.serving import ServerProcess

    started: list[ServerProcess] = []

    def start(bundle_dir: Path | str, *extra_args: str, timeout: float = 120.0) -> ServerProcess:
        if not any(a.split("=")[0] == "--state-dir" for a in extra_args):
            state = tmp_path_factory.mktemp("serve-state")
            extra_args = (*extra_args, "--state-dir", str(state))
        srv = ServerProcess(bundle_dir, extra_args)
        started.append(srv)
        return srv.start(timeout)

    yield start
    for srv in reversed(started):
        srv.stop()


# -- bundles (shared by the converter, device and equivalence tests) -------------------


@pytest.fixture(scope="session")
def digits_bundle_dir() -> Path:
    """A double-split digits-cnn bundle (SGD with momentum, runtime tf only), converted
    once per configuration and converter source (``bundle_cache``).

    Read-only for tests: copy it (``bundle_cache.copy_bundle``) before tampering.
    """
    from split_helpers import SGD_CFG, digits_bundle

    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    return bundle


@pytest.fixture(scope="session")
def digits_bundles() -> Callable[..., tuple[Path, Any]]:
    """``get(split, opt_cfg, runtimes=("tf",), model="digits-cnn")`` -> (read-only cached
    bundle, a fresh untrained unsplit reference with the same initial weights)."""
    from split_helpers import digits_bundle

    def get(split: str, opt_cfg: dict, runtimes=("tf",), model: str = "digits-cnn"):
        return digits_bundle(None, split, opt_cfg, runtimes, model)

    return get


@pytest.fixture
def page_files() -> Iterator[Callable[[str], Path]]:
    """Files the device page fetches from /device/data/ (gitignored), unique to this
    test: ``page_files(".frames")`` gives a path; all are removed at teardown."""
    import uuid

    from js_fixtures import JS_DIR

    data_dir = JS_DIR / "data"
    data_dir.mkdir(exist_ok=True)
    tag = f"test-{uuid.uuid4().hex[:12]}"
    made: list[Path] = []

    def path(suffix: str) -> Path:
        made.append(data_dir / f"{tag}{suffix}")
        return made[-1]

    yield path
    for p in made:
        p.unlink(missing_ok=True)
