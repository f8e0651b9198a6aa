"""The `boomerang` console script: a subcommand whose dependencies are missing does not break the others."""

import sys

from services import cli


def test_a_missing_serving_stack_leaves_training_usable(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "app.cli", None)  # importing it now raises ModuleNotFoundError
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--out", "runs/x", "--max-minutes", "1"])
    assert args.max_minutes == 1.0 and args.handler is cli._train
    assert cli.main(["serve", "--port", "8000"]) == 2
    assert "`boomerang serve` needs the package 'app.cli'" in capsys.readouterr().err
