"""Client-side exceptions: one class per gRPC status family, carrying ``.code`` and ``.details``.

``from_rpc_error(exc)`` turns a ``grpc.RpcError`` into the matching ``ClientError`` subclass so
callers never handle raw gRPC errors. Errors detected locally (before any call) use the same
classes, with the status the server would have answered (e.g. ``InvalidArgument``).
"""
from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base of every error the client raises. ``str(exc)`` is ``"CODE: details"``."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, *,
                 method: str | None = None) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        self.method = method
        super().__init__(f"{self.code.name}: {details}")


class InvalidArgument(ClientError):
    """Bad input: shape, dtype, values, unknown suite/attack, malformed request."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ClientError):
    """Unknown model, version or audit job."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClientError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(ClientError):
    """Server unreachable, still loading, or shutting down (retried for idempotent calls)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ClientError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ClientError):
    """Queue full or a configured limit exceeded (the message names the limit)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ClientError):
    """Missing or malformed bearer token."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ClientError):
    """Wrong bearer token."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ClientError):
    """Valid request, wrong state (e.g. the report of a job that has not succeeded)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(ClientError):
    default_code = grpc.StatusCode.CANCELLED


class Unimplemented(ClientError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class ServerError(ClientError):
    """INTERNAL, UNKNOWN, DATA_LOSS and any other status without a class of its own."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def error_class(code: grpc.StatusCode) -> type[ClientError]:
    return _BY_CODE.get(code, ServerError)


def from_rpc_error(exc: grpc.RpcError, method: str | None = None) -> ClientError:
    """The ``ClientError`` subclass for a failed call, keeping its status code and message."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_class(code)(details or code.name.lower().replace("_", " "), code, method=method)
