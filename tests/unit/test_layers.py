"""The coordinator's packages are layers: each imports only the layers below it (docs/architecture.md).

Read from the source, so a new import that reaches upward (a market module importing a service, a
service importing a route) fails here rather than tangling the packages unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

COORDINATOR = Path(__file__).resolve().parents[2] / "coordinator"
# Bottom to top. The app factory and the command line (coordinator/app.py, __main__.py) sit above all.
LAYERS = ["core", "money", "identity", "market", "trust", "serving", "status", "services", "web"]


def _imports(path: Path) -> set[str]:
    """The coordinator modules ``path`` imports (``from coordinator.x import y`` counts ``x.y`` when
    ``y`` is a module, else ``x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "coordinator":
            base = node.module.split(".")[1:]
            found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("coordinator."))
    return found


def _layer(dotted: str) -> str | None:
    head = dotted.split(".")[0]
    return head if head in LAYERS else None


def test_every_module_is_in_a_layer() -> None:
    loose = sorted(p.name for p in COORDINATOR.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "app.py"))
    assert loose == [], "coordinator/ holds only the app factory and the command line; put modules in a layer"


def test_no_package_imports_upward() -> None:
    upward = []
    for layer in LAYERS:
        for path in (COORDINATOR / layer).rglob("*.py"):
            for imported in _imports(path):
                target = _layer(imported)
                if imported == "__version__":  # the package's own metadata, below every layer
                    continue
                if target is None:
                    upward.append(f"{path.relative_to(COORDINATOR)} imports coordinator.{imported} (not a layer)")
                elif LAYERS.index(target) > LAYERS.index(layer):
                    upward.append(f"{path.relative_to(COORDINATOR)} imports coordinator.{imported}")
    assert upward == []


def test_routes_never_import_routes() -> None:
    routes = COORDINATOR / "web" / "routes"
    crossing = [
        f"{path.name} imports {imported}"
        for path in routes.glob("*.py")
        for imported in _imports(path)
        if imported.startswith("web.routes")
    ]
    assert crossing == []
