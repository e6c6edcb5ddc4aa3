"""Defended-classifier service: one import namespace for the repository's top-level folders.

The repository keeps ``training/``, ``robustness/``, ``data/``, ``server/``, ``clients/`` and
``proto/`` at its root; the distribution installs them as ``dcs.training``, ``dcs.robustness``,
``dcs.data``, ``dcs.server``, ``dcs.clients`` and ``dcs.proto`` (``pyproject.toml``
``package-dir``), so an installed copy cannot shadow or be shadowed by another distribution's
``proto`` (proto-plus), ``server`` or ``training``.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("defended-classifier-service")
except PackageNotFoundError:  # pragma: no cover - imported from a checkout that was never installed
    __version__ = "0+unknown"
