"""Import rules between the packages, read from the source (AST), not from a running import.

- The product never imports its own test double: outside ``relay/simulator/`` the
  only imports of ``relay.simulator`` are the two places that *start* the simulator
  (``relay simulate`` in :mod:`relay.cli`, the built-in upstream in :mod:`relay.launch`).
  OpenAI's wire schema, which both need, lives in ``relay/protocol/``.
- ``relay/protocol/`` is the bottom layer: it imports nothing of ``relay`` but itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"

#: (module, imported module, imported name): the simulator's start-up points.
ALLOWED_SIMULATOR_IMPORTS = {
    ("relay.cli", "relay.simulator.server", "serve_simulator"),
    ("relay.launch", "relay.simulator.server", "serve_simulator"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str]]:
    return _imports_in(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_in(source: str, module: str, *, is_package: bool) -> list[tuple[str, str]]:
    """Every import as ``(module, name)``: ``from m import n`` is ``(m, n)`` (relative
    imports resolved), ``import m`` is ``(m, "")``. Imports inside functions count too."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend((base, alias.name) for alias in node.names)
    return found


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _reaches(imported: tuple[str, str], package: str) -> bool:
    """Whether an import loads ``package`` or part of it (``from relay import simulator`` does)."""
    module, name = imported
    return _is_within(module, package) or (name != "" and _is_within(f"{module}.{name}", package))


def _sources(*, excluding: str | None = None) -> list[Path]:
    paths = sorted(RELAY.rglob("*.py"))
    if excluding is not None:
        paths = [path for path in paths if not path.is_relative_to(RELAY / excluding)]
    return paths


def test_nothing_outside_the_simulator_imports_it_but_its_two_start_up_points() -> None:
    seen: set[tuple[str, str, str]] = set()
    offending: list[str] = []
    for path in _sources(excluding="simulator"):
        module = _module_name(path)
        for imported, name in _imports(path):
            if not _reaches((imported, name), "relay.simulator"):
                continue
            if (module, imported, name) in ALLOWED_SIMULATOR_IMPORTS:
                seen.add((module, imported, name))
                continue
            offending.append(f"{path.relative_to(RELAY.parent)}: {imported} {name}".rstrip())
    assert offending == [], "the product imports its test double:\n" + "\n".join(offending)
    # The allowance is not stale: both start-up points are still where they were.
    assert seen == ALLOWED_SIMULATOR_IMPORTS


def test_the_protocol_package_imports_nothing_of_relay_but_itself() -> None:
    offending = [
        f"{path.relative_to(RELAY.parent)}: {imported}"
        for path in _sources()
        if path.is_relative_to(RELAY / "protocol")
        for imported in _imports(path)
        if _reaches(imported, "relay") and not _reaches(imported, "relay.protocol")
    ]
    assert offending == []


def test_the_rule_sees_relative_and_package_imports() -> None:
    """The checker itself: relative imports resolve; ``from relay import simulator`` counts."""
    source = (
        "from ..simulator import engine\n"
        "from relay import simulator\n"
        "def f():\n"
        "    import relay.simulator.secrets\n"
    )
    found = _imports_in(source, "relay.dataplane.policy", is_package=False)
    assert found == [
        ("relay.simulator", "engine"),
        ("relay", "simulator"),
        ("relay.simulator.secrets", ""),
    ]
    assert all(_reaches(imported, "relay.simulator") for imported in found)
    assert not _reaches(("relay", "protocol"), "relay.simulator")
    assert not _reaches(("relay.simulatorish", ""), "relay.simulator")
