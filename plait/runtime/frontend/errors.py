"""The errors a request can end in, the same on every path: the `Engine` raises them, the HTTP
server answers them with their `status`."""

from __future__ import annotations


class RequestError(Exception):
    """A request did not produce a result. `status` is the HTTP status the server answers with."""

    status = 500


class InvalidRequestError(RequestError, ValueError):
    """The request is malformed or asks for more than the model allows; the message says which
    field and why (HTTP 400)."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param  # the offending field, when one is to blame


class RequestFailed(RequestError, RuntimeError):
    """The server failed while running a valid request (HTTP 500)."""

    status = 500


class SchedulerUnavailable(RequestError, RuntimeError):
    """The scheduler is not ready, has stopped, or stopped answering (HTTP 503)."""

    status = 503


def error_for_status(status: int, message: str) -> RequestError:
    """The error a request that finished with `status_code` (a 4xx or 5xx) stands for."""
    if 400 <= status < 500:
        error: RequestError = InvalidRequestError(message)
    elif status == 503:
        error = SchedulerUnavailable(message)
    else:
        error = RequestFailed(message)
    error.status = status
    return error
