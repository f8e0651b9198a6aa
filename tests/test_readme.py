"""The README's commands and code blocks keep working: every `boomerang` command parses, and the blocks of
"Using it" run as written against a real server on the default pair."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def _default_pair_ready() -> bool:
    from services.store import DEFAULT_PAIR, Manifest, cache_dir

    try:
        manifest = Manifest.read(DEFAULT_PAIR)
        return (cache_dir() / manifest.teacher["cache_name"]).exists()
    except Exception:  # noqa: BLE001 - any reason the pair cannot be read means: not ready
        return False


needs_default_pair = pytest.mark.skipif(not _default_pair_ready(),
                                        reason="the default teacher is not imported (make import-teacher)")


def _commands() -> list[str]:
    inline = re.findall(r"`(boomerang [^`]+)`", README)
    in_blocks = [line.split("#")[0].strip() for lang, body in BLOCKS if lang == "bash"
                 for line in body.splitlines() if line.strip().startswith("boomerang ")]
    return sorted(set(inline + in_blocks))


@pytest.mark.parametrize("command", _commands())
def test_every_boomerang_command_in_the_readme_parses(command):
    build_parser().parse_args(shlex.split(command)[1:])


def test_the_set_up_commands_are_make_targets():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make serve" in README and "make test" in README


@needs_default_pair
def test_the_using_it_blocks_run_against_a_real_server():
    from services.bench.served import ServerProcess

    curl = next(body for lang, body in BLOCKS if lang == "bash" and "curl" in body)
    client = next(body for lang, body in BLOCKS if lang == "python" and "OpenAI(" in body)
    with ServerProcess(["--device", "cpu"]) as server:
        address = server.url.removeprefix("http://")
        shell = "set -euo pipefail\n" + curl.replace("localhost:8000", address)
        result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert '"smollm2-135m-boomerang-16L"' in result.stdout and "data: [DONE]" in result.stdout
        script = client.replace("127.0.0.1:8000", address)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()  # the sampled text may hold newlines of its own
        assert lines[0].startswith("smollm2-135m-boomerang-20L") and lines[-1].startswith("[None, -")


@needs_default_pair
def test_the_python_api_block_runs():
    block = next(body for lang, body in BLOCKS if lang == "python" and "load_family" in body)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == str(list(range(16, 31))) and lines[1].startswith("The quick brown fox")


def _table_row(last_cell: str) -> set[str]:
    """The field names in the README rows whose last cell starts with `last_cell`."""
    rows = [line for line in README.splitlines() if line.startswith("| ") and
            line.rstrip(" |").rsplit("| ", 1)[-1].startswith(last_cell)]
    first_cells = " ".join(row.split(" | ")[0] for row in rows)
    return set(re.findall(r"`(\w+)`", first_cells))


def test_the_readme_s_field_table_says_what_the_server_does_with_each_field():
    from app.fields import HARMLESS, MESSAGE_HARMLESS, MESSAGE_NEUTRAL, NEUTRAL
    from app.schemas import ChatRequest

    assert _table_row("accepted at the value") == set(NEUTRAL)
    assert _table_row("dropped with a logged warning: they") == set(HARMLESS)
    assert _table_row("accepted empty") == set(MESSAGE_NEUTRAL)
    assert _table_row("dropped with a logged warning (the chat") == set(MESSAGE_HARMLESS)
    served = _table_row("served")
    assert set(ChatRequest.model_fields) - {"messages"} <= served | {"guided_json", "guided_regex"}
