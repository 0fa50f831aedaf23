"""The packages' dependency arrows point one way.

    shared_schema  <-  {converters, server_torch, device_tf}  <-  spliteasy_cli

(converters bridge the frameworks, so they may read server_torch; nothing imports
converters but the CLI). Read from the source's AST, so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_schema", "converters", "server_torch", "device_tf", "spliteasy_cli", "netem")

# package -> the first-party packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "shared_schema": set(),
    "device_tf": {"shared_schema"},
    "server_torch": {"shared_schema"},
    "converters": {"shared_schema", "server_torch"},
    "spliteasy_cli": {"shared_schema", "converters", "server_torch", "device_tf", "netem"},
    "netem": set(),  # the fault proxy stands alone (tests put it between device and server)
}
# third-party frameworks shared_schema must not import (it is the neutral contract)
FRAMEWORKS = {"tensorflow", "tf_keras", "torch", "onnx", "onnx2torch", "tensorflowjs"}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """{imported top-level name: {file:line, ...}} over every .py file of the package."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(where)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_it_may(package: str) -> None:
    imports = imported_top_levels(package)
    forbidden = set(PACKAGES) - ALLOWED[package] - {package}
    bad = {name: sorted(imports[name]) for name in forbidden & imports.keys()}
    assert not bad, f"{package} imports {bad}"


def test_shared_schema_imports_no_framework() -> None:
    imports = imported_top_levels("shared_schema")
    bad = {name: sorted(imports[name]) for name in FRAMEWORKS & imports.keys()}
    assert not bad, f"shared_schema imports frameworks: {bad}"


def test_allowed_arrows_are_acyclic() -> None:
    """The policy itself has no cycle (a depth-first walk finds no back edge)."""
    state: dict[str, str] = {}

    def visit(node: str) -> None:
        state[node] = "open"
        for dep in ALLOWED.get(node, set()):
            assert state.get(dep) != "open", f"cycle through {node} -> {dep}"
            if dep not in state:
                visit(dep)
        state[node] = "done"

    for package in ALLOWED:
        if package not in state:
            visit(package)


def test_demo_resize_matches_tensorflow_bit_for_bit() -> None:
    """The server's demo digits (numpy resize) equal what the device used to feed itself
    (``tf.image.resize``), so moving the data out of device_tf changed no byte."""
    tf = pytest.importorskip("tensorflow")
    from shared_schema.demo_data import load_digits_split, resize_bilinear

    x = load_digits_split()[0][:64]
    for size in (5, 8, 32, 75, 224):
        expected = tf.image.resize(x, (size, size)).numpy()
        np.testing.assert_array_equal(resize_bilinear(x, size, size), expected)
