"""The one client-error type of the server and the OpenAI-shaped body every error reply carries."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and the message, which names the problem."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
