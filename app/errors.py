"""The one place that maps exceptions to OpenAI-shaped HTTP errors; never a stack trace to the client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import (
    BoomerangError,
    ContextLengthError,
    IntegrityError,
    InvalidPairError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    UnknownSizeError,
)

log = logging.getLogger(__name__)


class AuthError(Exception):
    """Missing or wrong API key."""


STATUS = {
    ContextLengthError: 400,
    InvalidRequestError: 400,
    UnknownSizeError: 404,
    OverloadedError: 429,
    NotReadyError: 503,
    RequestTimeoutError: 504,
    InvalidPairError: 500,
    IntegrityError: 500,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
              503: "service_unavailable", 504: "timeout_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape every failure uses."""

    error: ErrorDetail


def _documented(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse, "description": ERROR_TYPE.get(status, "server_error")}
            for status in statuses}


ERRORS = _documented(400, 401, 404, 413, 429, 500, 503, 504)


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(message: str, status: int, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, code, param), status_code=status, headers=headers)


def status_for(error: BoomerangError) -> int:
    for klass in type(error).__mro__:
        if klass in STATUS:
            return STATUS[klass]
    return 500


def boomerang_error_response(error: BoomerangError) -> JSONResponse:
    status = status_for(error)
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, OverloadedError) else None
    message = error.message if status < 500 or status in (503, 504) else "internal error"
    if status >= 500 and status not in (503, 504):
        log.error("internal error: %s", error.message)
    return error_response(message, status, error.code, error.param, headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "unsupported_field":  # raised for the whole body, about one field
        return first["msg"], first["ctx"]["param"]
    param = location[0] if location else None  # the top-level field, as OpenAI names it
    path = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:])
    return f"{param or 'request'}{path}: {first.get('msg', 'invalid')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BoomerangError)
    async def _boomerang(_: Request, error: BoomerangError) -> JSONResponse:
        return boomerang_error_response(error)

    @app.exception_handler(AuthError)
    async def _auth(_: Request, error: AuthError) -> JSONResponse:
        return error_response(str(error), 401, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(message, 400, "invalid_parameter", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(str(error.detail), error.status_code, None, None, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response("internal error", 500, "internal_error")
