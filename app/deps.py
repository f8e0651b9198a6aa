"""FastAPI dependencies: the engine (503 while loading), the serving logic, API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import AuthError
from app.serving import Serving
from app.settings import Settings
from services.engine.interface import Engine
from services.errors import NotReadyError


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None:
        raise NotReadyError(request.app.state.load_error or "the model family is still loading")
    return engine


def get_serving(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> Serving:
    state = request.app.state
    return Serving(engine, state.settings, state.metrics, state.latency)


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """With keys configured, a `Authorization: Bearer <key>` header must carry one of them."""
    if not settings.api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(presented, key.encode())  # constant time, every key compared
    if not matched:
        raise AuthError("missing or invalid API key")


EngineDep = Annotated[Engine, Depends(get_engine)]
ServingDep = Annotated[Serving, Depends(get_serving)]
Authorized = [Depends(require_api_key)]
