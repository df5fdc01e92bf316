"""Errors as OpenAI's API reports them: `{"error": {"message", "type", "param", "code"}}`.

Every failure the client can fix is a 4xx naming the field (`param`); a full queue is a 429 with
`Retry-After`; anything else is a 500 in the same shape whose message says only "internal error" and an
error id: the exception and its traceback go to the server log under that id, never to the client.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("minicoder.server")


class APIError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.type, self.code, self.headers)

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def field_path(loc: tuple) -> str | None:
    """A pydantic error location as a field path: ("body", "messages", 0, "role") -> "messages.0.role".

    Union members name themselves in locations ("prompt", "list[str]", 0); those parts are dropped.
    """
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_NOT_AN_OBJECT = ("missing", "model_attributes_type", "dict_type", "model_type")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextPart"}


def install_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                                  code="json_invalid")
        if tuple(first["loc"]) == ("body",) and first["type"] in _NOT_AN_OBJECT:
            return error_response(400, "the body must be a JSON object (and the request should say "
                                  "Content-Type: application/json)", code="invalid_body")
        param = field_path(tuple(first["loc"]))
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if len(errors) > 1 and not all(field_path(tuple(e["loc"])) == param for e in errors):
            message += f" (and {len(errors) - 1} more errors)"
        return error_response(400, message, param, code=first["type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return internal_error_response(exc, f"{request.method} {request.url.path}")


def log_internal_error(exc: BaseException, where: str) -> str:
    """Log `exc` with its traceback under a new error id; return the client's message, which names only the id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s: %s: %s", error_id, where, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return f"internal error (id {error_id}); the server log has the details"


def internal_error_response(exc: BaseException, where: str) -> JSONResponse:
    return error_response(500, log_internal_error(exc, where), type="internal_error", code="internal_error")
