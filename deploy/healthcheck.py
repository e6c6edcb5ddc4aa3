"""gRPC health probe for the container HEALTHCHECK and TLS exec probes (grpc_health_probe is
not packaged in Debian/Ubuntu). Exit 0 when grpc.health.v1 reports SERVING, 1 otherwise.

    python /opt/dcs/healthcheck.py [--addr 127.0.0.1:8001] [--service ""] [--timeout 3]
                                   [--tls-ca CA.pem] [--server-name NAME]
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcs-healthcheck")
    parser.add_argument("--addr", default="127.0.0.1:8001")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", help="PEM CA bundle; enables TLS")
    parser.add_argument("--server-name", help="TLS name to verify instead of the address host")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca:
        with open(args.tls_ca, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.addr)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"health check {args.addr}: {exc.code().name}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if status != "SERVING":
        print(f"health check {args.addr}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
