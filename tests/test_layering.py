"""Imports point one way: config/runtime/distributed -> tokenizers -> models -> data ->
objectives -> generation -> evaluation -> training -> pipeline -> cli. An import from a higher
layer fails."""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parent
LAYERS = {
    "errors": 0, "io": 0, "config": 0, "runtime": 0, "distributed": 0,
    "tokenizers": 1, "models": 2, "data": 3, "objectives": 4, "generation": 5,
    "evaluation": 6, "feedback": 6, "training": 7, "pipeline": 8, "cli": 9, "__main__": 9,
}  # fmt: skip


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("lmforge.") else module
    return LAYERS[top]


def test_no_upward_imports() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        own = layer_of("lmforge." + rel.parts[0].removesuffix(".py"))
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("lmforge.") and layer_of(name) > own:
                    bad.append(f"{rel} imports {name}")
    assert not bad, bad


def test_models_import_no_trainer_or_data_code() -> None:
    for path in (ROOT / "models").glob("*.py"):
        src = path.read_text()
        for banned in ("lmforge.training", "lmforge.data", "lmforge.cli"):
            assert banned not in src, f"{path.name} imports {banned}"
