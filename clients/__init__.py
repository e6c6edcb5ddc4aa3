"""Python client library and ``dcsctl`` CLI for the defended-classifier service (torch-free).

- ``dcs.clients.client``: ``Client`` (typed, retries on UNAVAILABLE, deadlines); ``TLSConfig`` (``dcs.clients.tls``).
- ``dcs.clients.results``: frozen result types (``Prediction``, ``ModelInfo``, ``AuditProgress``, ...).
- ``dcs.clients.errors``: ``ClientError`` and one subclass per gRPC status family.
- ``dcs.clients.images``: load PNG/JPEG/.npy/.npz and convert to a model's input spec.
- ``dcs.clients.cli``: the ``dcsctl`` console script.

``from clients import Client`` works too (imported on first use).
"""
from __future__ import annotations

from typing import Any

__all__ = ["Client", "ClientError", "TLSConfig"]


def __getattr__(name: str) -> Any:  # lazy, so `import clients.images` does not load grpc
    if name in ("Client", "TLSConfig"):
        from dcs.clients import client

        return getattr(client, name)
    if name == "ClientError":
        from dcs.clients.errors import ClientError

        return ClientError
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
