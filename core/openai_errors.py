"""The OpenAI-style error a client gets: one body for the router, the simulator and the Ray Serve app,
so clients parse one shape whichever of them answers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

RETRY_AFTER_S = "1"


class ApiError(Exception):
    """An OpenAI-style error the client gets as JSON with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return web.json_response(self.body(), status=self.status, headers=headers)
