"""Errors the engine raises to its callers (besides ValueError for bad input)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (``max_waiting_requests``); the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an internal error; no request can be served (HTTP 500)."""
