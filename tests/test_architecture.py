"""The layering of architecture.md, checked on every module's imports (ast, nothing imported).

Fails on an import that goes up or sideways between the layers of the ``layers`` table, on a module
the table does not place, and on a private name or private module used outside its own module or
package. Each rule is also run on a synthetic module, so the checker itself cannot pass vacuously.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"sgengine": ROOT / "sgengine", "sgengine.kernels": ROOT / "kernels"}

def read_layers(text: str) -> list[tuple[str, list[str]]]:
    """The ``layers`` block of architecture.md: one ``name unit unit ...`` row per layer, lowest first."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "architecture.md has no ```layers block"
    return [(row.split()[0], row.split()[1:]) for row in block.group(1).splitlines() if row.strip()]


def place(module: str, layers) -> tuple[int, str] | None:
    """(layer index, unit) of a module: the longest matching unit; the root package only exactly."""
    best = None
    for i, (_, units) in enumerate(layers):
        for unit in units:
            hit = module == unit or (unit != "sgengine" and module.startswith(unit + "."))
            if hit and (best is None or len(unit) > len(best[1])):
                best = (i, unit)
    return best


def module_files() -> dict[str, Path]:
    """Every module of the package by its import name (a package by its own name)."""
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == "sgengine" and name.startswith("sgengine.kernels"):
                continue
            out[name] = path
    return out


def imports(module: str, source: str, is_package: bool, known) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every sgengine import, lazy ones included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "sgengine"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "sgengine":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None, node.lineno) if sub in known else (base, a.name, node.lineno))
    return found


def private_part(target: str) -> str | None:
    """The package that owns a private module on the path (``sgengine.kernels`` for ``._backend``)."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def violations(module: str, source: str, is_package: bool, layers, known) -> list[str]:
    here = place(module, layers)
    if here is None:
        return [f"{module}: not placed in architecture.md's layers table"]
    out = []
    for target, name, line in imports(module, source, is_package, known):
        there = place(target, layers)
        if there is None:
            out.append(f"{module}:{line} imports {target}, which the layers table does not place")
        elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
            kind = "upward" if there[0] > here[0] else "sideways"
            out.append(f"{module}:{line} imports {target} ({kind}: {layers[here[0]][0]} -> {layers[there[0]][0]})")
        owner = private_part(target)
        if owner is not None and not (module == owner or module.startswith(owner + ".")):
            out.append(f"{module}:{line} imports the private module {target}")
        if name and name.startswith("_") and not name.startswith("__"):
            out.append(f"{module}:{line} imports the private name {name} from {target}")
    return list(dict.fromkeys(out))  # one message per import, however many names it brings


@pytest.fixture(scope="module")
def layers():
    return read_layers((ROOT / "architecture.md").read_text())


def _all_violations(layers) -> list[str]:
    files = module_files()
    out = []
    for module, path in sorted(files.items()):
        out += violations(module, path.read_text(), path.name == "__init__.py", layers, set(files))
    return out


def test_imports_go_downward_only(layers):
    found = _all_violations(layers)
    assert not found, "\n".join(found)


def test_every_module_is_placed(layers):
    assert all(place(m, layers) for m in module_files()), "every module must sit in one layer"


# The checker on synthetic modules: each rule must fire, and a clean module must pass.
SYNTHETIC = [
    ("sgengine.guidance.sag", "from sgengine.training.trainer import Trainer\n", "upward"),
    ("sgengine.diffusion.ddpm", "def f():\n    from ..sampling import sample\n", "upward"),
    ("sgengine.annotate.kmeans", "def f():\n    from ..training import trainer\n", "sideways"),
    ("sgengine.training.trainer", "from ..annotate.labels import label_annotations\n", "sideways"),
    ("sgengine.common.io", "from ..checkpoint import load_meta\n", "upward"),
    ("sgengine.sampling", "import sgengine.training.trainer\n", "upward"),
    ("sgengine.annotate.kmeans", "from sgengine.kernels._backend import resolve_backend\n", "private module"),
    ("sgengine.guidance.sag", "from .attach import _find\n", "private name"),
    ("sgengine.newthing", "import torch\n", "not placed"),
]


@pytest.mark.parametrize("module,source,kind", SYNTHETIC)
def test_checker_catches(layers, module, source, kind):
    found = violations(module, source, False, layers, set(module_files()))
    assert any(kind in v for v in found), found


def test_checker_accepts_downward_imports(layers):
    source = ("from ..common.ranks import world_size\nfrom ..kernels import kmeans_assign\n"
              "from .io import Annotations\nimport torch\n")
    assert violations("sgengine.annotate.kmeans", source, False, layers, set(module_files())) == []
