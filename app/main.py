"""The FastAPI application: lifespan loads the family off the event loop; routes, errors and limits wired."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import Metrics
from app.routes import native, ops, playground
from app.routes import openai as openai_routes
from app.settings import Settings
from services.engine.interface import Engine
from services.engine.latency import LatencyModel
from services.errors import BoomerangError

log = logging.getLogger("boomerang.server")
EngineFactory = Callable[[Settings, Metrics], Engine]


def default_engine_factory(settings: Settings, metrics: Metrics) -> Engine:
    """The real engine (imports torch, so only here, inside the lifespan's worker thread)."""
    from services.engine.factory import build_engine

    return build_engine(
        pair=settings.pair,
        teacher=settings.teacher,
        student=settings.student,
        order=settings.order,
        device=settings.device,
        dtype=settings.dtype,
        name=settings.name,
        weights=settings.weights,
        variant_cache_size=settings.variant_cache_size,
        native_kernels=settings.native_kernels,
        limits=settings.engine_limits(),
        threads=settings.threads,
        on_batch=lambda n, size: metrics.batch_size.labels(str(n)).observe(size),
    )


async def in_own_thread(work: Callable[[], object]) -> object:
    """`work()` in a thread that ends with it, awaited. Not `asyncio.to_thread`: a thread's torch work leaves an
    OpenMP thread pool that lives as long as the thread, and an idle pool beside the engine's (more OpenMP
    threads than CPUs) makes every OpenMP barrier of a decode step sleep instead of spin."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: object, failed: bool) -> None:
        if future.done():  # the server stopped while this loaded: nobody will serve with it
            getattr(value, "close", lambda: None)()
            return
        future.set_exception(value) if failed else future.set_result(value)

    def run() -> None:
        try:
            result, failed = work(), False
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            result, failed = error, True
        try:
            loop.call_soon_threadsafe(settle, result, failed)
        except RuntimeError:  # the event loop has closed (shut down during the load)
            getattr(result, "close", lambda: None)()

    threading.Thread(target=run, name="boomerang-load", daemon=True).start()
    return await future


async def _load(app: FastAPI, factory: EngineFactory) -> None:
    state = app.state
    try:
        engine = await in_own_thread(lambda: factory(state.settings, state.metrics))
    except BoomerangError as error:
        state.load_error = error.message
        log.error("error: %s", error.message)
        state.on_fatal()
        return
    state.latency = LatencyModel(engine.models(), state.settings.max_concurrent)
    state.engine = engine
    state.metrics.stats = engine.stats
    log.info("ready: %s, sizes %s", engine.family_name, [m.num_layers for m in engine.models()])


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(app, engine_factory or default_engine_factory))
        yield
        loader.cancel()
        if app.state.engine is not None:
            await asyncio.to_thread(app.state.engine.close)

    app = FastAPI(
        title="Boomerang",
        version="0.1.0",
        lifespan=lifespan,
        description="One teacher and one boomerang student served as a family of sizes.",
    )
    app.state.settings, app.state.metrics = settings, Metrics()
    app.state.engine, app.state.load_error = None, None
    app.state.on_fatal = on_fatal or (lambda: None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["x-boomerang-num-layers", "Retry-After"],
        )
    for router in (ops.router, openai_routes.router, native.router):
        app.include_router(router)
    if settings.playground:
        app.include_router(playground.build_router())
    return app
