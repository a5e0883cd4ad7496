"""The CLI's help texts, from its parser (no command runs)."""

from __future__ import annotations


def test_every_command_has_a_description_and_no_rst_in_help() -> None:
    from reckpt.cli import build_parser

    parser = build_parser()
    assert "``" not in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        text = command.format_help()
        assert command.description, name
        assert "``" not in text, name
