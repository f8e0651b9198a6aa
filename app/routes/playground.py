"""The playground page at `/`: static HTML, CSS and JavaScript shipped in app/playground, read once.

Public (the page holds no data; its API calls carry the key), out of the OpenAPI schema, and locked to this
origin by a Content-Security-Policy: the page can load and call nothing but this server."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

FOLDER = Path(__file__).resolve().parent.parent / "playground"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
ASSETS = ("app.css", "app.js", "favicon.svg")


def build_router() -> APIRouter:
    """`GET /` and `GET /playground/<asset>`, the files read into memory now: nothing on any other request."""
    files = {name: (FOLDER / name).read_bytes() for name in ("index.html", *ASSETS)}
    router = APIRouter(include_in_schema=False)

    def serve(name: str) -> Response:
        return Response(files[name], media_type=TYPES[Path(name).suffix], headers=HEADERS)

    @router.get("/")
    async def page() -> Response:
        return serve("index.html")

    def route(name: str):
        return lambda: serve(name)  # no parameter: FastAPI would read one from the query string

    for asset in ASSETS:
        router.add_api_route(f"/playground/{asset}", route(asset), methods=["GET"])
    return router
