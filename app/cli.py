"""`boomerang serve`: flags over BOOMERANG_* settings, uvicorn with graceful shutdown, exit 2 on bad config."""

from __future__ import annotations

import argparse
import logging
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from app.settings import Settings

LISTS = {"api_keys": "--api-key", "allowed_origins": "--allowed-origins"}  # repeatable flags


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes", "on")


def _help(field) -> str:
    default = field.default_factory() if field.default_factory is not None else field.default
    shown = "none" if default is None or default == [] else str(default).lower() if isinstance(default, bool) \
        else default
    if "(default" in (field.description or ""):
        return field.description
    return f"{field.description} (default: {shown})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in LISTS:
            parser.add_argument(LISTS[name], dest=name, action="append", help=_help(field) + "; repeatable")
            continue
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        kind = _boolean if field.annotation is bool else field.annotation if field.annotation in (int, float) else str
        parser.add_argument(flag, dest=name, type=kind, default=None, choices=choices, help=_help(field))
        if field.annotation is bool:  # `--x false` as for every setting, and `--no-x` as a shorthand
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                                help=f"same as {flag} false")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logs import configure_logging
    from app.main import create_app

    overrides = {name: value for name, value in vars(args).items()
                 if name in Settings.model_fields and value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        logging.getLogger("boomerang").error("invalid setting %s: %s", name, first["msg"])
        return 2
    configure_logging(settings.log_level, settings.log_format)
    holder: dict = {}
    app = create_app(settings, on_fatal=lambda: setattr(holder["server"], "should_exit", True))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, timeout_graceful_shutdown=settings.graceful_timeout_s)
    server = holder["server"] = uvicorn.Server(config)
    server.run()
    if app.state.load_error:
        logging.getLogger("boomerang").error("could not load the family: %s", app.state.load_error)
        return 2
    return 0
