"""Domain errors and the one interceptor that maps them to gRPC status codes.

Errors know nothing about the transport: each ``ServiceError`` subclass has a class-level
``code`` (a ``grpc.StatusCode`` member *name*, so this module imports no grpc) and its message
names the field, the value received and what was expected. ``ErrorInterceptor`` (in
``dcs.server.interceptor``) is the only place that turns them into statuses.
"""
from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see. ``str(exc)`` is the message sent on the wire."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(ServiceError):
    """Bad shape, dtype, size, NaN/Inf, empty or oversized batch, malformed request."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(ServiceError):
    code = "NOT_FOUND"


class JobNotFound(ServiceError):
    code = "NOT_FOUND"


class NotReady(ServiceError):
    """Model not loaded yet, or the server is shutting down."""

    code = "UNAVAILABLE"


class StateUnavailable(ServiceError):
    """The audit state directory cannot be written (read-only, full, broken); retry later."""

    code = "UNAVAILABLE"


class QueueFull(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class LimitExceeded(ServiceError):
    """A configured limit (audit examples, gradients, concurrent jobs) would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(ServiceError):
    """The request is valid but the object is in the wrong state (e.g. cancel a finished job)."""

    code = "FAILED_PRECONDITION"
