"""Run code as if torch were not installed: prepend ``BLOCK_TORCH`` to a ``python -c`` program.

A meta-path finder refuses ``torch`` and its submodules with ModuleNotFoundError, exactly what a
machine without torch gives. (Setting ``sys.modules['torch'] = None`` instead breaks libraries
such as scipy that probe ``sys.modules`` for optional array backends.)
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK_TORCH = (
    "import sys as _sys, importlib.abc as _abc\n"
    "class _NoTorch(_abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ModuleNotFoundError(\"No module named 'torch' (blocked)\", name=name)\n"
    "        return None\n"
    "_sys.meta_path.insert(0, _NoTorch())\n"
)


def run_without_torch(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -c code`` from the repo root with torch blocked; output captured as text."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
