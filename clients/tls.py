"""TLS settings for the client's channels (server roots, mutual TLS, name override)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from dcs.clients.errors import InvalidArgument


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel. ``ca_file`` None = the system roots; ``cert_file``/``key_file`` for
    mutual TLS; ``server_name`` overrides the name checked against the certificate."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | Path | None) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"TLS file {str(p)!r} cannot be read: "
                                      f"{exc.strerror}") from None

        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument("TLS cert_file and key_file go together (mutual TLS); "
                                  "got only one")
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file),
                                            read(self.cert_file))
