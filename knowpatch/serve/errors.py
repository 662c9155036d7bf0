"""The server's error vocabulary: OpenAI-shaped error bodies, and the checks every endpoint
shares (a patch id is a folder name in the store, never a path)."""

from __future__ import annotations

import re

from ..errors import KnowpatchError

PATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_knowpatch(exc: KnowpatchError, status: int = 400) -> ApiError:
    """A KnowpatchError's message starts with the field it names (`field: problem`)."""
    message = str(exc)
    param = message.split(":", 1)[0] if ":" in message else None
    return ApiError(status, message, param if param and " " not in param else None)


def check_id(ref: str, param: str = "id") -> str:
    """A patch id as the API takes it: a folder name in the store, never a path."""
    if not PATCH_ID.match(ref) or ".." in ref:
        raise ApiError(400, f"{param}: {ref!r} is not a patch id (letters, digits, '-', '_', '.'; "
                       "no path)", param)
    return ref
