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

import json
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
    if config.option.dist == "loadgroup":  # asked for: our order too (below)
        config.option.loadscopereorder = False
    if config.option.numprocesses is not None or config.getoption("usepdb", False):
        return
    if config.option.collectonly or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    workers = int(os.environ.get(WORKERS_ENV, min(2, os.cpu_count() or 1)))
    if workers > 1:
        config.option.numprocesses = workers
        if config.option.dist == "no":
            config.option.dist = "loadgroup"
            # keep the order pytest_collection_modifyitems gives (heaviest unit first),
            # not xdist's "most tests per unit first"
            config.option.loadscopereorder = False


# -- scheduling: heaviest units first, tests that share a module fixture together --------
#
# xdist's loadgroup hands out units (an ``xdist_group``, else one test) in collection
# order, each to the worker that runs out of work first. Two things made the two workers
# end minutes apart and repeat work: (1) a module-scoped fixture (a reference training
# run, an exported model pair) was built on *both* workers when its tests were split
# between them; (2) the heaviest units (a zoo network's group, a crash-recovery run)
# could come last, leaving one worker alone with them. So, in each worker's collection:
#
# - tests of one module that share a module-scoped fixture of that module form one
#   group (named after the module and the fixture), unless already in an xdist_group;
# - units are ordered by their cost, heaviest first (longest-processing-time first), the
#   tests of a unit kept together and in their own order. Costs are seconds per test
#   from ``tests/durations.json`` (a recorded run: ``SPLITEASY_TEST_DURATIONS_OUT=
#   tests/durations.json make test`` writes setup + call + teardown of every test; a
#   test missing from it counts as its function's, its module's or ``DEFAULT_COST``).
#
# Only the order changes; every test still runs. A run without workers keeps pytest's order.

DURATIONS = Path(__file__).with_name("durations.json")
DURATIONS_OUT_ENV = "SPLITEASY_TEST_DURATIONS_OUT"
DEFAULT_COST = 1.0


def _durations() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _cost(nodeid: str, table: dict[str, float]) -> float:
    """A test's seconds: its own entry, else its function's (``file::test``, per
    parametrization), else the mean of its recorded parametrized siblings, else its
    module's (``file``, per test), else ``DEFAULT_COST``."""
    base = nodeid.split("[", 1)[0]
    for key in (nodeid, base):
        if key in table:
            return table[key]
    siblings = [v for k, v in table.items() if k.split("[", 1)[0] == base]
    if siblings:
        return sum(siblings) / len(siblings)
    return table.get(nodeid.split("::", 1)[0], DEFAULT_COST)


def _group_names(item: pytest.Item) -> list[str]:
    return [str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")]  # fmt: skip


def _module_fixture_groups(items: list[pytest.Item]) -> None:
    """Mark tests of one module that share one of its module-scoped fixtures with one
    ``xdist_group`` (union of all such sharing), unless they carry a group already."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    keys: dict[int, list[str]] = {}
    for i, item in enumerate(items):
        if _group_names(item):
            continue
        info = getattr(item, "_fixtureinfo", None)
        module = item.nodeid.split("::", 1)[0]
        own = []
        for name, defs in info.name2fixturedefs.items() if info else ():
            fdef = defs[-1]
            if fdef.scope == "module" and str(fdef.baseid).split("::", 1)[0] == module:
                own.append(f"{module}::{name}")
        for k in own[1:]:
            parent[find(k)] = find(own[0])
        keys[i] = own
    for i, own in keys.items():
        if own:
            root = find(own[0])
            items[i].add_marker(pytest.mark.xdist_group(root.replace("tests/", "")))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: group tests that share a module fixture, then order the units
    heaviest first (runs before xdist's own hook, which turns the groups into units)."""
    # (on a worker xdist sets dist to "no" and keeps "loadgroup" as its own flag)
    if not os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "loadgroup", False):
        return
    _module_fixture_groups(items)
    table = _durations()
    unit_of = {id(it): (_group_names(it) or [it.nodeid])[0] for it in items}
    cost: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        unit = unit_of[id(it)]
        cost[unit] = cost.get(unit, 0.0) + _cost(it.nodeid, table)
        first.setdefault(unit, i)
    order = {id(it): i for i, it in enumerate(items)}
    items.sort(key=lambda it: (-cost[unit_of[id(it)]], first[unit_of[id(it)]], order[id(it)]))


_recorded: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``SPLITEASY_TEST_DURATIONS_OUT``: add up each test's setup + call + teardown."""
    if os.environ.get(DURATIONS_OUT_ENV) and not os.environ.get("PYTEST_XDIST_WORKER"):
        nodeid = report.nodeid.split("@", 1)[0]
        _recorded[nodeid] = _recorded.get(nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get(DURATIONS_OUT_ENV)
    if out and _recorded and not os.environ.get("PYTEST_XDIST_WORKER"):
        rounded = {k: round(v, 1) for k, v in sorted(_recorded.items())}
        Path(out).write_text(json.dumps(rounded, indent=0) + "\n")


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
