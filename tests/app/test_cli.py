"""`boomerang serve`'s flags and logs: help and defaults for every flag, real booleans, choices, JSON logs, CORS."""

from __future__ import annotations

import argparse
import json
import logging

import httpx
import pytest

from app.cli import add_arguments
from app.logs import JsonFormatter
from app.main import create_app
from app.settings import Settings
from services.cli import main
from tests.app.fake_engine import FakeEngine
from tests.conftest import LiveServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_every_flag_says_what_it_does_and_its_default():
    actions = [a for a in _parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} == set(Settings.model_fields)
    for action in actions:
        assert action.help and len(action.help) > 12, action.option_strings
        assert "default" in action.help or action.option_strings[0].startswith("--no-"), action.option_strings


def test_booleans_are_booleans_and_choices_are_checked(capsys):
    parser = _parser()
    assert parser.parse_args(["--mix-sizes", "false"]).mix_sizes is False
    assert parser.parse_args(["--mix-sizes", "yes"]).mix_sizes is True
    assert parser.parse_args(["--no-playground"]).playground is False
    assert parser.parse_args(["--weights", "int8"]).weights == "int8"
    for bad in (
        ["--mix-sizes", "maybe"],
        ["--log-format", "xml"],
        ["--overload-policy", "shrink"],
        ["--weights", "q2"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(bad)
        assert exit_info.value.code == 2
    assert "expected true or false" in capsys.readouterr().err
    args = parser.parse_args(["--allowed-origins", "http://a.test", "--allowed-origins", "http://b.test"])
    assert args.allowed_origins == ["http://a.test", "http://b.test"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("boomerang ")


def test_json_logs_are_one_object_per_line():
    record = logging.LogRecord("boomerang.server", logging.WARNING, __file__, 1, "ready: %s", ("tiny",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["logger"] == "boomerang.server" and entry["message"] == "ready: tiny"
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_cors_only_for_the_allowed_origins():
    settings = Settings(allowed_origins=["http://ui.test"])
    with LiveServer(create_app(settings, engine_factory=lambda s, m: FakeEngine())) as live:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = httpx.options(live.url + "/v1/completions", headers={"Origin": "http://ui.test", **preflight})
        assert allowed.headers.get("access-control-allow-origin") == "http://ui.test"
        other = httpx.options(live.url + "/v1/completions", headers={"Origin": "http://evil.test", **preflight})
        assert "access-control-allow-origin" not in other.headers
    with LiveServer(create_app(Settings(), engine_factory=lambda s, m: FakeEngine())) as live:
        plain = httpx.get(live.url + "/health", headers={"Origin": "http://ui.test"})
        assert "access-control-allow-origin" not in plain.headers


def test_a_bad_setting_exits_2_with_one_line(monkeypatch, caplog):
    assert main(["serve", "--port", "70000"]) == 2
    monkeypatch.setenv("BOOMERANG_MAX_N", "0")
    assert main(["serve"]) == 2
    monkeypatch.delenv("BOOMERANG_MAX_N")
    monkeypatch.setenv("BOOMERANG_WEIGHTS", "q2")  # a weight form we do not serve: refused at start
    assert main(["serve"]) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [
        "invalid setting port: Input should be less than or equal to 65535",
        "invalid setting max_n: Input should be greater than or equal to 1",
        "invalid setting weights: Input should be 'float', 'int8' or 'q4'",
    ]
