"""Bearer-token authentication for the audit methods."""
from __future__ import annotations

import hmac

from dcs.server.errors import PermissionDenied, Unauthenticated


class TokenAuth:
    """Bearer-token check for audit methods (constant-time compare)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    def check(self, metadata) -> None:
        """Raise ``Unauthenticated``/``PermissionDenied`` unless ``metadata`` carries the token."""
        if self._token is None:
            raise PermissionDenied("audits are disabled on this server: no token configured "
                                   "(--audit-token-file or DCS_AUDIT_TOKEN)")
        header = ""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if not header:
            raise Unauthenticated("metadata 'authorization' is missing; expected 'Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("metadata 'authorization' is not of the form 'Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise PermissionDenied("bearer token is not valid for audit methods")
