"""Errors the engine raises to its callers.

Bad input is an ``InvalidRequestError`` (a ValueError) that names the offending request field in
``param``, so a server maps it to a 400 for that field without parsing the message text.
"""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before doing any work for it (HTTP 400).

    ``param`` is the request field at fault (``"prompt"``, ``"max_tokens"``, ``"stop"``, ...),
    or None when no single field is (e.g. a duplicate request id).
    """

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class RequestFailedError(RuntimeError):
    """One request could not be completed (its logits held no allowed token, or a step that ran
    it failed); other requests are unaffected. ``status`` is the HTTP status a server should use."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting_requests``); the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; no request can be served (HTTP 500)."""


class ExecutorFailedError(RuntimeError):
    """The executor that runs the model failed and the KV cache it held is gone (e.g. a rank of a
    tensor-parallel group died). The engine fails every request that held KV, empties its block
    pool and restarts the executor. ``subject`` names what failed, for messages."""

    subject = "the executor"

    @property
    def summary(self) -> str:
        """The first line of the message (a traceback may follow it), for request errors."""
        return str(self).split("\n", 1)[0].rstrip(":")
