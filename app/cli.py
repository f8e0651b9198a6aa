"""`boomerang serve`: flags over BOOMERANG_* settings, uvicorn with graceful shutdown, exit 2 on bad config."""

from __future__ import annotations

import argparse
import logging

from app.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "api_keys":
            parser.add_argument("--api-key", dest="api_keys", action="append", help=field.description)
            continue
        kind = field.annotation if field.annotation in (int, float, str) else str
        parser.add_argument(flag, dest=name, type=kind, default=None, help=field.description)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    overrides = {name: value for name, value in vars(args).items()
                 if name in Settings.model_fields and value is not None}
    settings = Settings(**overrides)
    holder: dict = {}
    app = create_app(settings, on_fatal=lambda: setattr(holder["server"], "should_exit", True))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.graceful_timeout_s)
    server = holder["server"] = uvicorn.Server(config)
    server.run()
    if app.state.load_error:
        logging.getLogger("boomerang").error("could not load the family: %s", app.state.load_error)
        return 2
    return 0
