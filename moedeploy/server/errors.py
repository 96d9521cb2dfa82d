"""One error shape for every failure: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

Messages are bounded and never carry the request's input or the server's file paths: validation errors
name the field (`param`) and pydantic's description of what is wrong, not the value that was sent.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

MAX_MESSAGE = 300

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 499: "client_disconnected",
         500: "internal_server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error the server answers with: status, message, and where OpenAI has one, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message[:MAX_MESSAGE], "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def response(error: APIError) -> JSONResponse:
    return JSONResponse(body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def _validation(request: Request, ex: RequestValidationError) -> JSONResponse:
    first = ex.errors()[0] if ex.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
    # ("body", "messages", 0, "content", "str") -> messages.0.content: the union member tried is not a field
    loc = [str(part) for part in first.get("loc", ())[1:] if not _type_tag(part)]
    param = ".".join(loc) or None
    if param is None and first.get("type") == "model_attributes_type":
        return response(APIError(400, "the request body must be a JSON object (Content-Type: application/json)"))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return response(APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value"))


def _type_tag(part) -> bool:
    """A location part naming the union member pydantic tried (str, list[int], function-after[...])."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or any(c in part for c in "[-"))


def _http(request: Request, ex: HTTPException) -> JSONResponse:
    return response(APIError(ex.status_code, str(ex.detail), headers=getattr(ex, "headers", None)))


def _api(request: Request, ex: APIError) -> JSONResponse:
    return response(ex)


def _unexpected(request: Request, ex: Exception) -> JSONResponse:
    return response(APIError(500, f"internal error ({type(ex).__name__}); the server keeps serving"))


def install(app) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(APIError, _api)
    app.add_exception_handler(Exception, _unexpected)
