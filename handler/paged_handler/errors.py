"""The one error shape every route answers with, and how engine errors map onto it.

Messages are written for clients: engine and validation errors carry their own (they name the
field and the allowed values); anything unexpected becomes a fixed sentence, with the details only
in the worker log, so no internal text ever reaches a client.
"""
from __future__ import annotations

from paged.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError

_PHRASES = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 413: "Payload Too Large",
            429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class RequestError(Exception):
    """A request-level failure: HTTP status + the OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def phrase(status: int) -> str:
    return _PHRASES.get(status, "Error")


INTERNAL_ERROR = RequestError("internal error while serving this request; see the server log", 500,
                              "internal_error")


def from_engine_error(exc: BaseException, timeout_s: float | None = None) -> RequestError:
    """The client-facing error for what ``AsyncLLMEngine.generate`` raised."""
    if isinstance(exc, InvalidRequestError):
        return RequestError(exc.message, 400, param=exc.param)
    if isinstance(exc, RequestFailedError):
        if 400 <= exc.status < 500:  # caused by the request's own parameters: say what happened
            return RequestError(str(exc), exc.status)
        return RequestError("the engine failed this request; other requests are unaffected, retry later",
                            exc.status, "internal_error")
    if isinstance(exc, EngineOverloadedError):
        return RequestError(f"server overloaded: {exc}; retry later", 503, "overloaded")
    if isinstance(exc, EngineDeadError):
        return RequestError("the engine stopped after an internal error and is being restarted; retry later",
                            500, "engine_dead")
    if isinstance(exc, TimeoutError):
        return RequestError(f"request exceeded its deadline of {timeout_s} s", 408, "timeout")
    if isinstance(exc, ValueError):  # an engine refusal without a named field
        return RequestError(str(exc)[:500], 400)
    return INTERNAL_ERROR
