"""Operations: liveness, readiness, Prometheus metrics. Never behind API keys."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "still loading, or loading failed"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the family is loaded, 503 before (or if loading failed)."""
    state = request.app.state
    if state.engine is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "ready", "family": state.engine.family_name})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus metrics, labelled by size."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
