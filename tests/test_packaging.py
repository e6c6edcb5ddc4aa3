"""How the distribution is laid out: one ``dcs`` namespace mapped from the repo's folders, torch-free
parts that never reach into ``dcs.training``, and a wheel that holds every module and no tests."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_FREE = ("data", "robustness", "server", "clients", "proto")
TOP_LEVEL = ("training", "robustness", "data", "server", "clients", "proto")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", TORCH_FREE)
def test_torch_free_parts_never_import_training(folder):
    """Datasets live in ``dcs.data``: the server, engine and client need nothing of training/."""
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in (ROOT / folder).rglob("*.py")
           for name in _imports(p) if name == "dcs.training" or name.startswith("dcs.training.")]
    assert not bad, bad


@pytest.mark.parametrize("folder", [*TOP_LEVEL, "tests", "bench", "scripts"])
def test_code_imports_the_namespace_not_bare_folder_names(folder):
    """``import server`` would pick up whatever else is installed under that name (proto-plus
    installs ``proto``): every import of our code goes through ``dcs.``."""
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in (ROOT / folder).rglob("*.py")
           for name in _imports(p) if name.split(".")[0] in TOP_LEVEL]
    assert not bad, bad


def test_wheel_holds_every_module_the_stubs_and_scripts_and_no_tests():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "test_deps.py"), "--only", "build"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "built defended_classifier_service-" in res.stdout
