"""Every subcommand's --help explains each option and shows its default once, and every default worth showing."""
from __future__ import annotations

import argparse
import re

import pytest

from edet_deploy.cli import DefaultsHelpFormatter, build_parser, main
from edet_deploy.commands import COMMANDS


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_each_default_once(name, capsys):
    sp = _subparsers()[name]
    for action in sp._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = " ".join(sp._get_formatter()._format_action(action).split())  # the option's block, one line
        assert len(re.findall(r"default\b", text)) <= 1, text
        assert "default: None" not in text and "default: False" not in text, text
        if DefaultsHelpFormatter.shows_default(action):
            assert f"default: {action.default}" in text or "default" in (action.help or ""), text
        assert (action.help or "").strip(), f"{name} {action.option_strings or action.dest}: no help text"
    with pytest.raises(SystemExit) as e:  # and the whole page renders
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: edet-deploy" in capsys.readouterr().out


def test_formatter_rules():
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--a", type=int, default=3)
    p.add_argument("--b", help="b (default: computed)")
    p.add_argument("--c", action="store_true", help="flag")
    p.add_argument("--d", default=0, help="zero")
    text = " ".join(p.format_help().split())
    assert "--a A (default: 3)" in text
    assert "b (default: computed) --c" in text
    assert "flag --d" in text and "zero (default: 0)" in text
