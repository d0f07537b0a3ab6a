"""The package's layers depend one way: cli -> training / deploy / tools -> data / weights ->
models -> errors, files, hardware, native. A module may import its own folder and the layers below
it."""

import ast
from pathlib import Path

import densenet

PACKAGE = Path(densenet.__file__).parent
BOTTOM = {"errors", "files", "hardware", "native"}
# What each folder may import besides itself; the public API (densenet/__init__.py) sits on top.
ALLOWED = {
    "bottom": set(),
    "models": {"bottom"},
    "weights": {"bottom", "models"},
    "data": {"bottom", "models"},
    "training": {"bottom", "models", "weights", "data"},
    "deploy": {"bottom", "models", "weights", "data"},
    "tools": {"bottom", "models", "weights", "data", "deploy"},
    "cli": {"bottom", "models", "weights", "data", "training", "deploy", "tools", "api"},
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package ("densenet.models.efficient")."""
    parts = module.split(".")[1:]
    if not parts:
        return "api"
    return "bottom" if parts[0] in BOTTOM else parts[0]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "densenet" and node.level == 0:
            # "from densenet import native" names a module of a layer, "create_model" the API.
            modules.update(_submodule_or_package(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return {m for m in modules if m == "densenet" or m.startswith("densenet.")}


def _submodule_or_package(name: str) -> str:
    is_module = (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()
    return f"densenet.{name}" if is_module else "densenet"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join(parts)


def test_every_layer_imports_only_itself_and_the_layers_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name in ("densenet", "densenet.__main__"):
            continue
        layer = layer_of(name)
        for imported in imported_modules(path):
            target = layer_of(imported)
            if target != layer and target not in ALLOWED[layer]:
                violations.append(f"{name} ({layer}) imports {imported} ({target})")
    assert violations == []


def test_every_module_belongs_to_a_known_layer():
    names = [module_name(p) for p in PACKAGE.rglob("*.py")]
    layers = {layer_of(n) for n in names if n not in ("densenet", "densenet.__main__")}
    assert layers <= set(ALLOWED)
