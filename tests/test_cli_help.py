"""Every ``photoz-hpc`` subcommand and option explains itself: a one-line help and a description per command,
a help string per argument, and no help text that renders a doubled ``%%`` (argparse's escape, written
where no ``%`` formatting happens). The list comes from the real parser (``photoz_hpc.cli.build_parser``)."""

from __future__ import annotations

import argparse

import pytest

from photoz_hpc.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


PARSER = build_parser()
SUB = _subparsers(PARSER)
COMMANDS = sorted(SUB.choices)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction))
            and (not a.help or not a.help.strip())]


def test_the_command_list_is_the_parsers():
    assert {"pretrain", "finetune", "calibrate", "export-encoder", "export-qp", "catalogue-verify"} <= set(COMMANDS)


def test_top_level_options_have_help():
    assert _undocumented(PARSER) == []
    assert "%%" not in PARSER.format_help()


def test_every_command_has_a_one_line_help():
    helps = {a.dest: a.help for a in SUB._choices_actions}
    parsers = {id(p): name for name, p in SUB.choices.items()}
    # an alias (demo for quickstart) shares its command's parser and help line
    missing = [name for name, p in SUB.choices.items() if not helps.get(parsers[id(p)])]
    assert missing == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_every_argument_a_help(command):
    parser = SUB.choices[command]
    assert parser.description and parser.description.strip(), f"{command} has no description"
    assert _undocumented(parser) == [], f"{command}: arguments without help"
    text = parser.format_help()
    assert "%%" not in text, f"{command} --help shows a literal '%%'"
