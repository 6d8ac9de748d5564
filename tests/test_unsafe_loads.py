"""No code runs from an artefact: a static check over lmforge/ and bench/ for the calls that
can execute code while loading (unpickling, `torch.load` without `weights_only=True`, remote
model code), checked itself against snippets that break each rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmforge

REPO = Path(lmforge.__file__).parents[1]

# Loaders that unpickle (or run code) whatever file they are given: never called at all.
UNPICKLERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load",
}  # fmt: skip


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name it was imported as (`import numpy as np`: np -> numpy)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(expr: ast.expr, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return ".".join([aliases.get(expr.id, expr.id), *reversed(parts)])


def _is_const(call: ast.Call, keyword: str, value: object) -> bool:
    return any(
        k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def _safe_yaml_loader(call: ast.Call) -> bool:
    """`yaml.load(..., Loader=X)` where every loader X names is a SafeLoader (C or Python)."""
    (loader,) = [k.value for k in call.keywords if k.arg == "Loader"] or [None]
    if loader is None:
        return False
    names = [n.attr for n in ast.walk(loader) if isinstance(n, ast.Attribute)]
    names += [n.id for n in ast.walk(loader) if isinstance(n, ast.Name)]
    names += [n.value for n in ast.walk(loader) if isinstance(n, ast.Constant)]
    loaders = [n for n in names if isinstance(n, str) and n.endswith("Loader")]
    return bool(loaders) and all(n.endswith("SafeLoader") for n in loaders)


def unsafe_loads(source: str, name: str = "<snippet>") -> list[str]:
    """`name:line: what` for each call in `source` that could run code from a file."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func, aliases) or ""
        why = None
        if func == "yaml.load" and _safe_yaml_loader(node):
            pass
        elif func in UNPICKLERS:
            why = f"{func}() can run code from the file"
        elif func == "torch.load" and not _is_const(node, "weights_only", True):
            why = "torch.load() without weights_only=True unpickles"
        elif func in ("numpy.load", "np.load") and any(
            k.arg == "allow_pickle" and not _is_const(node, "allow_pickle", False)
            for k in node.keywords
        ):
            why = "numpy.load() with allow_pickle unpickles"
        if any(
            k.arg == "trust_remote_code" and not _is_const(node, "trust_remote_code", False)
            for k in node.keywords
        ):
            why = "trust_remote_code runs the model folder's Python code"
        if why:
            found.append(f"{name}:{node.lineno}: {why}")
    return found


def test_no_code_runs_from_a_loaded_file() -> None:
    files = sorted([*(REPO / "lmforge").rglob("*.py"), *(REPO / "bench").rglob("*.py")])
    assert len(files) > 50  # the walk really covers the package
    bad = [
        hit
        for path in files
        for hit in unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load(path)",
        "import torch\nsd = torch.load(path, weights_only=False)",
        "import torch as t\nsd = t.load(path, map_location='cpu')",
        "from torch import load\nsd = load(path)",
        "import pickle\nx = pickle.loads(data)",
        "import pickle as pk\nx = pk.load(open(p, 'rb'))",
        "from pickle import loads as l\nx = l(data)",
        "import numpy as np\nx = np.load(p, allow_pickle=True)",
        "import joblib\nm = joblib.load(p)",
        "import yaml\nc = yaml.load(text, Loader=yaml.Loader)",
        "import yaml\nc = yaml.load(text)",
        "import yaml\nc = yaml.load(text, Loader=getattr(yaml, 'CLoader', yaml.SafeLoader))",
        "from transformers import AutoModel as M\nm = M.from_pretrained(p, trust_remote_code=True)",
        "m = anything(p, trust_remote_code=flag)",
    ],
)
def test_the_checker_catches_each_unsafe_load(snippet: str) -> None:
    assert len(unsafe_loads(snippet)) == 1, snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load(path, weights_only=True)",
        "import numpy as np\nx = np.load(p, allow_pickle=False)\ny = np.load(p)",
        "import yaml\nc = yaml.safe_load(text)",
        "import yaml\nc = yaml.load(text, Loader=getattr(yaml, 'CSafeLoader', yaml.SafeLoader))",
        "from safetensors.torch import load_file\nsd = load_file(p)",
        "m = AutoModel.from_pretrained(p, trust_remote_code=False)",
        "import json\nx = json.loads(s)",
    ],
)
def test_the_checker_passes_safe_loads(snippet: str) -> None:
    assert unsafe_loads(snippet) == [], snippet
